"""Input processing: prompt -> validated token ids -> one EngineCoreRequest per completion (n).

Everything a user can get wrong is checked here, before a request is queued or registered, and
raises ValueError naming the field; the rules themselves are core/admission.py's (the core runs
them again on what it receives).
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from jaxserve.core.admission import (
    EngineCoreRequest,
    RequestLimits,
    check_prompt_len,
    validate_core_request,
)
from jaxserve.lora.request import LoRARequest
from jaxserve.sampling_params import SamplingParams, as_token_ids, check_text, is_int

# Without a tokenizer (a load_format="dummy" model) requests are token ids in, token ids out.
_NO_TOKENIZER = "{field} needs a tokenizer and this model has none: give prompt_token_ids"

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
        limits: RequestLimits,
        eos_token_id: int | None,
        seed: int = 0,
    ) -> None:
        self.tokenizer = tokenizer
        # the engine's sizes (vocabulary, max_model_len, KV capacity) requests must fit
        self.limits = limits
        self.eos_token_id = eos_token_id
        # draws the seeds of requests that give none (so every request's sampling is seeded)
        self._rng = random.Random(seed)

    def process_prompt(self, prompt: PromptType) -> ProcessedPrompt:
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("prompt must not be empty")
            if self.tokenizer is None:
                raise ValueError(_NO_TOKENIZER.format(field="a text prompt"))
            ids = self.tokenizer.encode(check_text(prompt, "prompt"))
            text: str | None = prompt
        elif isinstance(prompt, Mapping):
            if "prompt_token_ids" in prompt:
                raw = prompt["prompt_token_ids"]
                if isinstance(raw, (str, bytes)) or not isinstance(raw, Sequence):
                    raise ValueError("prompt_token_ids must be a list of token ids")
                ids = as_token_ids(raw, self.limits.vocab_size, "prompt_token_ids")
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
        check_prompt_len(len(ids), self.limits.max_model_len)
        return ProcessedPrompt(prompt=text, prompt_token_ids=list(ids))

    def _bad_words_ids(self, words: tuple[str, ...]) -> tuple[tuple[int, ...], ...]:
        """Each word's token ids, as it stands alone and after a space (vLLM's two spellings:
        the model meets a word mid-text far more often than at the start)."""
        seqs: list[tuple[int, ...]] = []
        for word in words:
            for text in (word, " " + word.lstrip()):
                ids = tuple(self.tokenizer.encode(text, add_special_tokens=False))
                if ids and ids not in seqs:
                    seqs.append(ids)
        return tuple(seqs)

    def make_requests(
        self,
        request_id: str,
        prompt: ProcessedPrompt,
        params: SamplingParams,
        *,
        priority: int = 0,
        cache_salt: str | None = None,
        arrival_time: float | None = None,
        lora_request: LoRARequest | None = None,
    ) -> list[EngineCoreRequest]:
        """One core request per completion; children of n > 1 get ids f"{request_id}:{i}".

        Raises ValueError naming the field when the request breaks an admission rule.
        """
        if not isinstance(params, SamplingParams):
            raise ValueError(f"sampling_params must be SamplingParams, got {type(params)}")
        if lora_request is not None and not isinstance(lora_request, LoRARequest):
            raise ValueError(f"lora_request must be a LoRARequest, got {type(lora_request)}")
        if not is_int(priority):  # its range is an admission rule
            raise ValueError(f"priority must be an integer, got {priority!r}")
        priority = int(priority)
        if self.tokenizer is None and (params.stop or params.bad_words):
            raise ValueError(_NO_TOKENIZER.format(field="stop" if params.stop else "bad_words"))
        if params.bad_words and not params.bad_words_token_ids:
            params = params.with_updates(bad_words_token_ids=self._bad_words_ids(params.bad_words))
        max_tokens = self.limits.resolve_max_tokens(len(prompt.prompt_token_ids), params.max_tokens)
        base_seed = params.seed if params.seed is not None else None
        requests = []
        # the prompt's logprobs are the same for every child: only the first computes them (so
        # the others keep their prefix-cache hits)
        sibling_params = (
            params.with_updates(prompt_logprobs=None)
            if params.prompt_logprobs is not None and params.n > 1
            else params
        )
        for i in range(params.n):
            # With a user seed, child i uses seed + i so the n completions differ but repeat.
            seed = base_seed + i if base_seed is not None else self._rng.getrandbits(31)
            requests.append(
                EngineCoreRequest(
                    request_id=request_id if params.n == 1 else f"{request_id}:{i}",
                    prompt_token_ids=prompt.prompt_token_ids,
                    sampling_params=params if i == 0 else sibling_params,
                    eos_token_id=self.eos_token_id,
                    sampling_seed=seed % (1 << 31),
                    arrival_time=arrival_time,
                    priority=priority,
                    cache_salt=cache_salt,
                    max_tokens=max_tokens,
                    lora_request=lora_request,
                )
            )
        # the n completions differ only in id and seed: one check covers them all
        validate_core_request(requests[0], self.limits)
        return requests
