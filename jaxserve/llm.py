"""The offline API: LLM(model=...).generate(prompts, SamplingParams(...)), as in vLLM.

Everything runs in the caller's thread: generate() steps the engine until its prompts finish;
`async for out in llm.stream(...)` steps it from the awaiting coroutine, one step per wait, and
yields to the event loop between steps, so it works inside Jupyter's running loop and several
streams (and a generate() call) share the same steps. Every step's outputs are routed to the
request that owns them, whoever drove the step.
"""

from __future__ import annotations

import contextlib
import gc
import itertools
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from tqdm.auto import tqdm

from jaxserve.config import DEFAULT_MODEL, EngineArgs
from jaxserve.describe import describe
from jaxserve.engine.llm_engine import LLMEngine
from jaxserve.engine.processor import ProcessedPrompt, PromptType
from jaxserve.lora.request import LoRARequest
from jaxserve.outputs import RequestOutput, RequestOutputKind
from jaxserve.sampling_params import SamplingParams
from jaxserve.stats import Counters, RunRecorder, RunStats, engine_stats
from jaxserve.stream import RequestStream
from jaxserve.tokenizer import apply_chat_template


@dataclass
class _Tracked:
    """The API-side record of one request in flight."""

    # receives every RequestOutput of the request (a stream's queue, generate's results)
    sink: Callable[[RequestOutput], None]
    # DELTA: each output's tokens are new; else each holds all so far (counts are diffed)
    output_kind: RequestOutputKind
    # generated tokens already counted (CUMULATIVE and FINAL_ONLY outputs)
    num_counted: int = 0


class LLM:
    """An engine in this process. `with LLM() as llm:` or `close()` frees its device memory.

    Takes vLLM's engine argument names (max_model_len, max_num_seqs, enable_prefix_caching,
    kv_cache_memory, ...); an unknown one raises TypeError listing the known ones.
    """

    def __init__(self, model: str = DEFAULT_MODEL, **kwargs: Any) -> None:
        show_progress = kwargs.pop("show_progress", True)
        self.args = EngineArgs.from_kwargs(model=model, **kwargs)
        self.engine: LLMEngine | None = LLMEngine(self.args, show_progress=show_progress)
        self._counter = itertools.count()
        # request id -> its record, for every request in flight (generate's and streams')
        self._tracked: dict[str, _Tracked] = {}
        # API-side cumulative counters (the core counts steps, hits, preemptions, compiles)
        self._num_requests = 0
        self._prompt_tokens = 0
        self._generation_tokens = 0
        # runs being recorded (a generate() call, `with llm.measure()` bodies)
        self._recorders: list[RunRecorder] = []
        # True while engine.step() runs: an abort then (a stream dropped by the garbage
        # collector mid-step) waits for the step to end instead of editing the scheduler
        self._stepping = False
        self._deferred_aborts: list[str] = []
        # what the last generate() call did (tokens, steps, hits, KV usage per step)
        self.last_run: RunStats | None = None

    def _engine(self) -> LLMEngine:
        if self.engine is None:
            raise RuntimeError("this LLM is closed; create a new one")
        return self.engine

    def get_tokenizer(self) -> Any:
        return self._engine().tokenizer

    # ---- requests in, steps, outputs routed ------------------------------------------------

    def _add(
        self,
        prompt: ProcessedPrompt,
        params: SamplingParams,
        *,
        prefix: str,
        priority: int,
        output_kind: RequestOutputKind,
        sink: Callable[[RequestOutput], None],
        lora_request: LoRARequest | None = None,
    ) -> str:
        engine = self._engine()
        request_id = f"{prefix}-{next(self._counter)}"
        try:
            engine.add_request(
                request_id,
                prompt,
                params,
                priority=priority,
                output_kind=output_kind,
                lora_request=lora_request,
            )
        except BaseException:
            engine.abort_request(request_id)  # a failed add leaves nothing half-queued
            raise
        self._tracked[request_id] = _Tracked(sink, output_kind)
        self._num_requests += 1
        self._prompt_tokens += len(prompt.prompt_token_ids)
        return request_id

    def _step(self) -> None:
        """One engine step; its outputs go to their requests' sinks.

        Called only by a caller waiting for output, so a core with nothing to run means a
        request was lost: that raises instead of spinning forever (a hung notebook cell).
        """
        engine = self._engine()
        if not engine.core.has_unfinished_requests():
            raise RuntimeError(
                f"the engine core has no request to run, yet {sorted(self._tracked)} wait "
                "for output"
            )
        stats_before = engine.core.last_stats
        self._stepping = True
        try:
            outputs = engine.step()
        finally:
            self._stepping = False
            for request_id in self._deferred_aborts:
                engine.abort_request(request_id)
            self._deferred_aborts.clear()
        if engine.core.last_stats is not stats_before:
            # a step's outputs came back (async scheduling: none on the first call)
            used = engine.core.last_stats.num_used_blocks
            for recorder in self._recorders:
                recorder.on_step(used)
        for out in outputs:
            tracked = self._tracked.get(out.request_id)
            if tracked is None:
                continue  # aborted while the step ran
            num_tokens = sum(len(c.token_ids) for c in out.outputs)
            if tracked.output_kind is RequestOutputKind.DELTA:
                self._generation_tokens += num_tokens
            else:
                self._generation_tokens += num_tokens - tracked.num_counted
                tracked.num_counted = num_tokens
            if out.finished:
                del self._tracked[out.request_id]
            tracked.sink(out)

    def _abort(self, request_id: str) -> None:
        """Ends a request in flight and frees its KV blocks (now, or right after this step)."""
        if self._tracked.pop(request_id, None) is None or self.engine is None:
            return  # finished, already aborted, or the engine is gone
        if self._stepping:
            self._deferred_aborts.append(request_id)
        else:
            self.engine.abort_request(request_id)

    # ---- the offline API ---------------------------------------------------------------------

    def generate(
        self,
        prompts: PromptType | Sequence[PromptType],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        use_tqdm: bool = True,
        priority: Sequence[int] | None = None,
        lora_request: LoRARequest | Sequence[LoRARequest | None] | None = None,
    ) -> list[RequestOutput]:
        """Runs the prompts to completion; outputs come back in input order.

        lora_request: the adapter every prompt runs with, or one per prompt (None: the base
        model); the engine needs enable_lora=True, and reads an adapter on first use.

        What the call did (tokens, steps, prefix hits, KV usage per step) is in `last_run`.
        """
        engine = self._engine()
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        prompts = list(prompts)
        if sampling_params is None:
            sampling_params = SamplingParams()
        params = (
            [sampling_params] * len(prompts)
            if isinstance(sampling_params, SamplingParams)
            else list(sampling_params)
        )
        if len(params) != len(prompts):
            raise ValueError(
                f"sampling_params has {len(params)} entries for {len(prompts)} prompts"
            )
        if priority is not None and len(priority) != len(prompts):
            raise ValueError(f"priority has {len(priority)} entries for {len(prompts)} prompts")
        loras = (
            list(lora_request)
            if isinstance(lora_request, (list, tuple))
            else [lora_request] * len(prompts)
        )
        if len(loras) != len(prompts):
            raise ValueError(f"lora_request has {len(loras)} entries for {len(prompts)} prompts")
        # Prompts are checked first; a request refused while adding aborts those before it
        # (the except below), so a bad one mid-batch leaves nothing queued either way.
        processed = [engine.process_prompt(p) for p in prompts]
        results: dict[str, RequestOutput] = {}

        def keep_final(out: RequestOutput) -> None:
            if out.finished:
                results[out.request_id] = out

        with self.measure() as recorder:
            ids: list[str] = []
            try:
                for i, (prompt, p) in enumerate(zip(processed, params, strict=True)):
                    prio = 0 if priority is None else priority[i]
                    ids.append(
                        self._add(
                            prompt,
                            p,
                            prefix="gen",
                            priority=prio,
                            # one output per request, at its end: no per-step copies
                            output_kind=RequestOutputKind.FINAL_ONLY,
                            sink=keep_final,
                            lora_request=loras[i],
                        )
                    )
                self._run(ids, results, use_tqdm)
            except BaseException:
                # A bad request mid-batch or an interrupted generate (KeyboardInterrupt in a
                # notebook) leaves nothing queued.
                for rid in ids:
                    self._abort(rid)
                raise
        self.last_run = recorder.result
        return [results[rid] for rid in ids]

    def _run(self, ids: list[str], results: dict[str, RequestOutput], use_tqdm: bool) -> None:
        bar = tqdm(total=len(ids), desc="Processed prompts", disable=not use_tqdm)
        try:
            while len(results) < len(ids):
                done = len(results)
                self._step()
                bar.update(len(results) - done)
        finally:
            bar.close()

    def stream(
        self,
        prompt: PromptType,
        sampling_params: SamplingParams | None = None,
        *,
        delta: bool = False,
        priority: int = 0,
        lora_request: LoRARequest | None = None,
    ) -> RequestStream:
        """`async for out in llm.stream(prompt, params)`: RequestOutputs as tokens arrive.

        Each output is cumulative, like vLLM's AsyncLLM.generate (the last one equals what
        generate() returns); delta=True yields only what is new since the previous one
        (vLLM's RequestOutputKind.DELTA). The request is validated and queued now; iterating
        drives the engine. Streams running concurrently (asyncio tasks) share every step.
        Leaving the loop early (`break`, aclose(), an exception) aborts the request and frees
        its KV blocks.
        """
        engine = self._engine()
        params = SamplingParams() if sampling_params is None else sampling_params
        processed = engine.process_prompt(prompt)
        queue: deque[RequestOutput] = deque()
        request_id = self._add(
            processed,
            params,
            prefix="stream",
            priority=priority,
            output_kind=RequestOutputKind.DELTA if delta else RequestOutputKind.CUMULATIVE,
            sink=queue.append,
            lora_request=lora_request,
        )
        return RequestStream(
            request_id,
            queue,
            step=self._step,
            abort=self._abort,
            is_live=lambda: request_id in self._tracked,
        )

    def chat(
        self,
        messages: Sequence[dict[str, Any]] | Sequence[Sequence[dict[str, Any]]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        use_tqdm: bool = True,
        chat_template: str | None = None,
        add_generation_prompt: bool = True,
        allow_special_tokens_in_content: bool = False,
        lora_request: LoRARequest | Sequence[LoRARequest | None] | None = None,
    ) -> list[RequestOutput]:
        """generate() over conversations rendered with the model's chat template.

        Control-token spellings inside the messages are encoded as text unless
        `allow_special_tokens_in_content` (see tokenizer.apply_chat_template).
        """
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        prompts = [
            {
                "prompt_token_ids": apply_chat_template(
                    self.get_tokenizer(),
                    list(conv),
                    add_generation_prompt=add_generation_prompt,
                    chat_template=chat_template,
                    allow_special_tokens_in_content=allow_special_tokens_in_content,
                )
            }
            for conv in conversations
        ]
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm, lora_request=lora_request)

    # ---- what the engine did -----------------------------------------------------------------

    def _counters(self) -> Counters:
        return Counters.from_engine(
            self._engine().core.make_stats(),
            self._num_requests,
            self._prompt_tokens,
            self._generation_tokens,
        )

    @contextlib.contextmanager
    def measure(self) -> Iterator[RunRecorder]:
        """`with llm.measure() as run:` records what the body did; `run.result` after it.

        For streams and multi-call workloads (generate() records itself in `last_run`).
        """
        recorder = RunRecorder(self._counters(), self._engine().core.make_stats().num_total_blocks)
        self._recorders.append(recorder)
        try:
            yield recorder
        finally:
            self._recorders.remove(recorder)
            if self.engine is not None:
                recorder.finish(self._counters())

    @property
    def stats(self) -> dict[str, Any]:
        """Cumulative counters since this LLM was made, and the KV cache now (JSON-ready)."""
        return engine_stats(self._engine().core, self._counters())

    # ---- lifecycle ---------------------------------------------------------------------------

    def close(self) -> None:
        """Frees every device buffer this LLM holds; a new LLM can be made after.

        Requests in flight end with it (a stream still open raises RuntimeError when read).
        """
        if self.engine is not None:
            self._tracked.clear()
            self._deferred_aborts.clear()
            self.engine.close()
            self.engine = None
            gc.collect()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        if self.engine is None:
            return f"LLM(model={self.args.model!r}, closed)"
        return describe(self)
