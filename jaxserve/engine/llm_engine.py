"""LLMEngine: the in-process engine client: InputProcessor -> EngineCore -> OutputProcessor.

The offline `LLM` drives it step by step; nothing here starts a thread or an event loop, so it
behaves the same in a script and inside Jupyter's running asyncio loop.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax

from jaxserve.config import EngineArgs
from jaxserve.engine.dp import make_engine_core
from jaxserve.engine.output_processor import OutputProcessor
from jaxserve.engine.processor import InputProcessor, ProcessedPrompt, PromptType
from jaxserve.lora.request import LoRARequest
from jaxserve.model.loader import load_tokenizer
from jaxserve.outputs import RequestOutput, RequestOutputKind
from jaxserve.sampling_params import SamplingParams


class LLMEngine:
    def __init__(
        self,
        args: EngineArgs,
        *,
        show_progress: bool = True,
        devices: Sequence[jax.Device] | None = None,
    ) -> None:
        """`devices`: the devices this engine replica owns (default jax.devices()[:TP])."""
        self.args = args
        self.core = make_engine_core(args, show_progress=show_progress, devices=devices)
        # --tokenizer wins over the model's own (as in the server's API process)
        self.tokenizer: Any = (
            load_tokenizer(args.tokenizer) if args.tokenizer else self.core.model.tokenizer
        )
        self.input_processor = InputProcessor(
            self.tokenizer,
            limits=self.core.limits,
            eos_token_id=self.core.spec.eos_token_id,
            seed=args.seed,
        )
        self.output_processor = OutputProcessor(self.tokenizer)

    def process_prompt(self, prompt: PromptType) -> ProcessedPrompt:
        return self.input_processor.process_prompt(prompt)

    def add_request(
        self,
        request_id: str,
        prompt: PromptType | ProcessedPrompt,
        params: SamplingParams,
        *,
        priority: int = 0,
        cache_salt: str | None = None,
        output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE,
        lora_request: LoRARequest | None = None,
    ) -> None:
        """Validates and queues one request (raises ValueError naming the field when bad).

        output_kind: what the request's RequestOutputs carry (all so far, what is new since the
        last one, or one output at the end).
        """
        processed = prompt if isinstance(prompt, ProcessedPrompt) else self.process_prompt(prompt)
        requests = self.input_processor.make_requests(
            request_id,
            processed,
            params,
            priority=priority,
            cache_salt=cache_salt,
            lora_request=lora_request,
        )
        self.output_processor.add_request(
            request_id,
            processed,
            params,
            [r.request_id for r in requests],
            output_kind=output_kind,
        )
        for r in requests:
            self.core.add_request(r)

    def abort_request(self, request_id: str) -> None:
        self.core.abort_requests(self.output_processor.abort_request(request_id))

    def has_unfinished_requests(self) -> bool:
        return self.output_processor.has_unfinished_requests()

    def step(self) -> list[RequestOutput]:
        """One engine step; returns the outputs of the requests that changed."""
        core_outputs = self.core.step()
        processed = self.output_processor.process_outputs(core_outputs.outputs)
        for core_id, stop_str in processed.stopped_by_string.items():
            self.core.finish_requests([core_id], stop_str)
        return processed.request_outputs

    def close(self) -> None:
        self.core.close()
