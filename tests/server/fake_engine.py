"""FakeEngine: an EngineClient with a real (byte-level, tiny) tokenizer and scripted output.

Each completion "generates" the bytes of its script (SCRIPT, or `engine.script` when a test
sets one, rotated by the completion's index), one token per step, then eos; stop strings go
through the real IncrementalDetokenizer, so the server sees the same deltas, finish reasons
and stop_reasons the real engine would give it.

Constraints are honoured trivially: a `choice` constraint generates its first choice. Prompt
logprobs are made up (rank k has logprob -0.5 * k) but shaped as the engine's.

LoRA (with `enable_lora=True`) follows the EngineClient contract: add_lora refuses a path that
is not a directory holding adapter_config.json (ValueError naming lora_path) and is a no-op for
an id already added; generate refuses an adapter not added (ValueError naming `model`);
remove_lora unregisters at once and returns when the adapter's running requests have ended.
`lora_requests` records the lora_request each generate got, by request id.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from jaxserve.core.outputs import SchedulerStats
from jaxserve.engine.client import EngineClient, EngineDeadError, EngineOverloadedError
from jaxserve.lora.request import LoRARequest
from jaxserve.outputs import CompletionOutput, Logprob, RequestOutput
from jaxserve.sampling_params import SamplingParams
from jaxserve.tokenizer import IncrementalDetokenizer

SCRIPT = "The quick brown fox jumps over the lazy dog. "
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def make_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE without merges: one token per byte (ids 0-255) plus <eos> = 256."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet, key=lambda c: ord(c)))}
    vocab["<eos>"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<eos>", chat_template=CHAT_TEMPLATE
    )


class FakeEngine(EngineClient):
    def __init__(
        self, *, max_model_len: int = 256, step_delay: float = 0.0, enable_lora: bool = False
    ) -> None:
        self.model_name = "fake-model"
        self.lora_enabled = enable_lora
        # the added adapters by id, in the order they were added
        self.loras: dict[int, LoRARequest] = {}
        # seconds add_lora takes (a test can make loads overlap)
        self.add_lora_delay = 0.0
        # request id -> the lora_request its generate() got (None: the base model)
        self.lora_requests: dict[str, LoRARequest | None] = {}
        # ("add" | "remove", lora_int_id) in call order, successful calls only
        self.lora_calls: list[tuple[str, int]] = []
        # request id -> adapter id of the requests running now with an adapter
        self._running_loras: dict[str, int] = {}
        self.max_model_len = max_model_len
        self.tokenizer = make_tokenizer()
        self.eos_token_id = self.tokenizer.eos_token_id
        self.step_delay = step_delay
        # what every completion generates (None: SCRIPT)
        self.script: str | None = None
        # raised by generate() before anything is queued (an engine-side refusal)
        self.refusal: Exception | None = None
        # switches the tests flip
        self.overloaded = False
        self.dead: str | None = None
        self.ready = True
        self.heartbeat = 0.0
        self.health_delay = 0.0
        self.health_error: Exception | None = None
        self._stats = SchedulerStats()
        # what happened
        self.aborted: list[str] = []
        self.requests: list[tuple[str, list[int], SamplingParams]] = []
        self.num_health_checks = 0
        self._seen_prompts: list[list[int]] = []
        self.active: set[str] = set()

    def _script_ids(self, index: int, params: SamplingParams) -> list[int]:
        so = params.structured_outputs
        if so is not None and so.choice is not None:
            return self.tokenizer.encode(so.choice[0], add_special_tokens=False)
        script = SCRIPT if self.script is None else self.script
        ids = self.tokenizer.encode(script, add_special_tokens=False)
        return ids[index:] + ids[:index]

    def _prompt_logprobs(self, ids: list[int], n: int) -> list[dict[int, Logprob] | None]:
        out: list[dict[int, Logprob] | None] = [None]
        for tok in ids[1:]:
            top = {(tok + k) % 256: Logprob(-0.5 * (k + 1), k + 1) for k in range(1, n + 1)}
            top[tok] = Logprob(-0.5, 1)
            out.append(top)
        return out

    def generate(
        self,
        prompt: Any,
        params: SamplingParams,
        request_id: str,
        *,
        priority: int = 0,
        cache_salt: str | None = None,
        lora_request: LoRARequest | None = None,
    ) -> AsyncIterator[RequestOutput]:
        return self._generate(prompt, params, request_id, lora_request)

    async def _generate(
        self, prompt: Any, params: SamplingParams, request_id: str, lora: LoRARequest | None
    ) -> AsyncIterator[RequestOutput]:
        if self.dead is not None:
            raise EngineDeadError(self.dead)
        if self.overloaded:
            raise EngineOverloadedError("waiting queue is full (1/1)")
        if self.refusal is not None:
            raise self.refusal
        if lora is not None and self.loras.get(lora.lora_int_id) != lora:
            raise ValueError(f"model: the LoRA adapter {lora.lora_name!r} is not loaded")
        ids = list(prompt["prompt_token_ids"]) if isinstance(prompt, dict) else None
        if ids is None:
            ids = self.tokenizer.encode(prompt)
        if any(t >= len(self.tokenizer) for t in ids):
            raise ValueError(f"prompt_token_ids holds an id outside [0, {len(self.tokenizer)})")
        if len(ids) >= self.max_model_len:
            raise ValueError(f"prompt has {len(ids)} tokens, over max_model_len")
        # fake prefix cache: a prompt seen before hits on its full 4-token blocks
        cached = (len(ids) - 1) // 4 * 4 if ids in self._seen_prompts else 0
        self._seen_prompts.append(ids)
        self.requests.append((request_id, ids, params))
        self.lora_requests[request_id] = lora
        if lora is not None:
            self._running_loras[request_id] = lora.lora_int_id
        self.active.add(request_id)
        room = self.max_model_len - len(ids)
        max_tokens = room if params.max_tokens is None else min(params.max_tokens, room)
        detoks = [
            IncrementalDetokenizer(
                self.tokenizer,
                ids,
                stop=params.stop,
                include_stop_str_in_output=params.include_stop_str_in_output,
                min_tokens=params.min_tokens,
            )
            for _ in range(params.n)
        ]
        counts = [0] * params.n
        done = [False] * params.n
        try:
            while not all(done):
                await asyncio.sleep(self.step_delay)
                if self.dead is not None:
                    raise EngineDeadError(self.dead)
                outs = []
                for i in range(params.n):
                    if done[i]:
                        continue
                    script = self._script_ids(i, params)
                    step = counts[i]
                    tok = script[step] if step < len(script) else self.eos_token_id
                    if params.ignore_eos and tok == self.eos_token_id:
                        tok = script[step % len(script)]
                    counts[i] += 1
                    finish, stop_reason = None, None
                    text = detoks[i].update([tok])
                    if tok == self.eos_token_id:
                        finish = "stop"
                    elif tok in params.stop_token_ids:
                        finish, stop_reason = "stop", tok
                    elif detoks[i].finished:
                        finish, stop_reason = "stop", detoks[i].stop_reason
                    elif counts[i] >= max_tokens:
                        finish = "length"
                    if finish is not None and not detoks[i].finished:
                        text += detoks[i].flush()
                    logprobs = None
                    if params.logprobs is not None:
                        top = {
                            (tok + k) % 256: Logprob(-0.1 * (k + 1), k + 1)
                            for k in range(params.logprobs)
                        }
                        top[tok] = Logprob(-0.1, 1)
                        logprobs = [top]
                    done[i] = finish is not None
                    outs.append(
                        CompletionOutput(i, text, [tok], None, logprobs, finish, stop_reason)
                    )
                is_first = counts[0] == 1
                yield RequestOutput(
                    request_id,
                    prompt.get("prompt") if isinstance(prompt, dict) else prompt,
                    ids,
                    outs,
                    all(done),
                    num_cached_tokens=cached,
                    prompt_logprobs=self._prompt_logprobs(ids, params.prompt_logprobs)
                    if is_first and params.prompt_logprobs is not None
                    else None,
                )
        finally:
            self.active.discard(request_id)
            self._running_loras.pop(request_id, None)
            if not all(done):
                await self.abort(request_id)

    async def add_lora(self, lora_request: LoRARequest) -> None:
        if not self.lora_enabled:
            return await super().add_lora(lora_request)
        if self.dead is not None:
            raise EngineDeadError(self.dead)
        await asyncio.sleep(self.add_lora_delay)
        if lora_request.lora_int_id in self.loras:
            return
        path = Path(lora_request.lora_path)
        if not path.is_dir():
            raise ValueError(f"lora_path {lora_request.lora_path!r} is not a directory")
        if not (path / "adapter_config.json").is_file():
            raise ValueError(f"lora_path {lora_request.lora_path!r} holds no adapter_config.json")
        self.loras[lora_request.lora_int_id] = lora_request
        self.lora_calls.append(("add", lora_request.lora_int_id))

    async def remove_lora(self, lora_int_id: int) -> None:
        if not self.lora_enabled:
            return await super().remove_lora(lora_int_id)
        if self.dead is not None:
            raise EngineDeadError(self.dead)
        if lora_int_id not in self.loras:
            raise ValueError(f"lora_int_id {lora_int_id} is not a loaded adapter")
        del self.loras[lora_int_id]
        self.lora_calls.append(("remove", lora_int_id))
        # polled: the fake has no scheduler to signal the end of a request
        while lora_int_id in self._running_loras.values():
            await asyncio.sleep(0.001)

    async def list_loras(self) -> list[LoRARequest]:
        return list(self.loras.values())

    async def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)

    async def embed(self, prompt_token_ids: list[int]) -> list[float]:
        if self.dead is not None:
            raise EngineDeadError(self.dead)
        if self.overloaded:
            raise EngineOverloadedError("queue full")
        v = [float(len(prompt_token_ids)), float(sum(prompt_token_ids) % 7), 1.0]
        norm = sum(x * x for x in v) ** 0.5
        return [x / norm for x in v]

    async def check_health(self, timeout: float) -> None:
        self.num_health_checks += 1
        await asyncio.sleep(self.health_delay)
        if self.health_error is not None:
            raise self.health_error

    @property
    def is_ready(self) -> bool:
        return self.ready

    @property
    def dead_reason(self) -> str | None:
        return self.dead

    @property
    def heartbeat_age(self) -> float:
        return self.heartbeat

    @property
    def stats(self) -> SchedulerStats:
        return self._stats

    async def shutdown(self) -> None:
        self.dead = "shut down"
