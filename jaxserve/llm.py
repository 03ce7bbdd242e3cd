"""The offline API: LLM(model=...).generate(prompts, SamplingParams(...)), as in vLLM."""

from __future__ import annotations

import gc
import itertools
from collections.abc import Sequence
from typing import Any

from tqdm.auto import tqdm

from jaxserve.config import DEFAULT_MODEL, EngineArgs
from jaxserve.engine.llm_engine import LLMEngine
from jaxserve.engine.processor import PromptType
from jaxserve.outputs import RequestOutput
from jaxserve.sampling_params import SamplingParams
from jaxserve.tokenizer import apply_chat_template


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

    def _engine(self) -> LLMEngine:
        if self.engine is None:
            raise RuntimeError("this LLM is closed; create a new one")
        return self.engine

    def get_tokenizer(self) -> Any:
        return self._engine().tokenizer

    def generate(
        self,
        prompts: PromptType | Sequence[PromptType],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        use_tqdm: bool = True,
        priority: Sequence[int] | None = None,
    ) -> list[RequestOutput]:
        """Runs the prompts to completion; outputs come back in input order."""
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
        # Validate everything first, so a bad prompt leaves nothing half-queued.
        processed = [engine.process_prompt(p) for p in prompts]
        for p in params:
            engine.input_processor.check_params(p)
        ids = [f"gen-{next(self._counter)}" for _ in prompts]
        for i, (rid, prompt, p) in enumerate(zip(ids, processed, params, strict=True)):
            engine.add_request(rid, prompt, p, priority=0 if priority is None else priority[i])
        return self._run(ids, use_tqdm)

    def _run(self, ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        engine = self._engine()
        results: dict[str, RequestOutput] = {}
        bar = tqdm(total=len(ids), desc="Processed prompts", disable=not use_tqdm)
        try:
            while len(results) < len(ids):
                for out in engine.step():
                    if out.finished:
                        results[out.request_id] = out
                        bar.update(1)
        except BaseException:
            # An interrupted generate (KeyboardInterrupt in a notebook) leaves nothing queued.
            for rid in ids:
                if rid not in results:
                    engine.abort_request(rid)
            raise
        finally:
            bar.close()
        return [results[rid] for rid in ids]

    def chat(
        self,
        messages: Sequence[dict[str, Any]] | Sequence[Sequence[dict[str, Any]]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        use_tqdm: bool = True,
        chat_template: str | None = None,
        add_generation_prompt: bool = True,
    ) -> list[RequestOutput]:
        """generate() over conversations rendered with the model's chat template."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        prompts = [
            {
                "prompt_token_ids": apply_chat_template(
                    self.get_tokenizer(),
                    list(conv),
                    add_generation_prompt=add_generation_prompt,
                    chat_template=chat_template,
                )
            }
            for conv in conversations
        ]
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)

    @property
    def stats(self) -> dict[str, Any]:
        core = self._engine().core
        s = core.last_stats
        return {
            "num_steps": core.runner.num_steps,
            "num_compiles_after_warmup": core.num_compiles_after_warmup,
            "kv_cache_usage": s.kv_cache_usage,
            "peak_kv_cache_usage": core.peak_kv_cache_usage,
            "prefix_cache_queries": s.prefix_cache_queries,
            "prefix_cache_hits": s.prefix_cache_hits,
            "num_preemptions": s.num_preemptions,
            "num_blocks": core.runner.num_blocks,
        }

    def close(self) -> None:
        """Frees every device buffer this LLM holds; a new LLM can be made after."""
        if self.engine is not None:
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
        core = self.engine.core
        return (
            f"LLM(model={self.args.model!r}, dtype={core.dtype.name}, "
            f"max_model_len={core.max_model_len}, kv_blocks={core.runner.num_blocks}, "
            f"block_size={core.runner.block_size})"
        )
