"""Input processing: prompt -> validated token ids -> one core Request per completion (n).

Everything a user can get wrong is checked here, before a request reaches the scheduler, and
raises ValueError naming the field; the engine never sees a bad request.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from jaxserve.request import Request
from jaxserve.sampling_params import (
    PRIORITY_RANGE,
    SamplingParams,
    as_token_ids,
    check_text,
    is_int,
)

# A prompt: text, or vLLM's {"prompt_token_ids": [...]} / {"prompt": "..."}.
PromptType = str | Mapping[str, Any]


@dataclass
class ProcessedPrompt:
    # the prompt text, when given as text
    prompt: str | None
    # validated token ids
    prompt_token_ids: list[int]


class InputProcessor:
    def __init__(
        self,
        tokenizer: Any,
        *,
        vocab_size: int,
        max_model_len: int,
        eos_token_id: int | None,
        seed: int = 0,
    ) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.max_model_len = max_model_len
        self.eos_token_id = eos_token_id
        # draws the seeds of requests that give none (so every request's sampling is seeded)
        self._rng = random.Random(seed)

    def process_prompt(self, prompt: PromptType) -> ProcessedPrompt:
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("prompt must not be empty")
            ids = self.tokenizer.encode(check_text(prompt, "prompt"))
            text: str | None = prompt
        elif isinstance(prompt, Mapping):
            if "prompt_token_ids" in prompt:
                raw = prompt["prompt_token_ids"]
                if isinstance(raw, (str, bytes)) or not isinstance(raw, Sequence):
                    raise ValueError("prompt_token_ids must be a list of token ids")
                ids = as_token_ids(raw, self.vocab_size, "prompt_token_ids")
                text = prompt.get("prompt")
                if text is not None:
                    check_text(text, "prompt")
            elif "prompt" in prompt:
                return self.process_prompt(prompt["prompt"])
            else:
                raise ValueError("prompt must be a dict with 'prompt' or 'prompt_token_ids'")
        else:
            raise ValueError(
                f"prompt must be a string or a dict with prompt_token_ids, got {type(prompt)}"
            )
        if not ids:
            raise ValueError("prompt must not be empty (it has 0 tokens)")
        if len(ids) >= self.max_model_len:
            raise ValueError(
                f"prompt has {len(ids)} tokens, which leaves no room to generate within "
                f"max_model_len={self.max_model_len}"
            )
        return ProcessedPrompt(prompt=text, prompt_token_ids=list(ids))

    def check_params(self, params: SamplingParams) -> None:
        if not isinstance(params, SamplingParams):
            raise ValueError(f"sampling_params must be SamplingParams, got {type(params)}")
        for tid in params.stop_token_ids:
            if tid >= self.vocab_size:
                raise ValueError(f"stop_token_ids holds {tid}, outside [0, {self.vocab_size})")

    def resolve_max_tokens(self, prompt: ProcessedPrompt, params: SamplingParams) -> int:
        """max_tokens capped by the room max_model_len leaves (None: all of it)."""
        room = self.max_model_len - len(prompt.prompt_token_ids)
        return room if params.max_tokens is None else min(params.max_tokens, room)

    def make_requests(
        self,
        request_id: str,
        prompt: ProcessedPrompt,
        params: SamplingParams,
        *,
        priority: int = 0,
        cache_salt: str | None = None,
        arrival_time: float | None = None,
    ) -> list[Request]:
        """One core request per completion; children of n > 1 get ids f"{request_id}:{i}"."""
        self.check_params(params)
        if not is_int(priority) or priority not in PRIORITY_RANGE:
            raise ValueError(
                f"priority must be an integer in {PRIORITY_RANGE.describe()}, got {priority!r}"
            )
        priority = int(priority)
        if cache_salt is not None:
            check_text(cache_salt, "cache_salt")
        max_tokens = self.resolve_max_tokens(prompt, params)
        base_seed = params.seed if params.seed is not None else None
        requests = []
        for i in range(params.n):
            # With a user seed, child i uses seed + i so the n completions differ but repeat.
            seed = base_seed + i if base_seed is not None else self._rng.getrandbits(31)
            requests.append(
                Request(
                    request_id if params.n == 1 else f"{request_id}:{i}",
                    prompt.prompt_token_ids,
                    params,
                    self.eos_token_id,
                    sampling_seed=seed % (1 << 31),
                    arrival_time=arrival_time,
                    priority=priority,
                    cache_salt=cache_salt,
                    max_tokens=max_tokens,
                )
            )
        return requests
