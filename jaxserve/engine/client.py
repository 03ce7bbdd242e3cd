"""EngineClient: what the API server needs from an engine, whatever process the core runs in.

The server (server/) is written against this interface only; AsyncLLM implements it with the
engine core in its own process, and tests implement it with a fake.
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from typing import Any

from jaxserve.core.outputs import SchedulerStats
from jaxserve.engine.processor import ProcessedPrompt, PromptType
from jaxserve.lora.request import LoRARequest
from jaxserve.outputs import RequestOutput
from jaxserve.sampling_params import SamplingParams


class EngineDeadError(RuntimeError):
    """The engine core process died, is restarting, or stopped answering; in-flight requests
    fail with it (the server answers 503 with Retry-After). The message is short and safe to
    show a client: never a traceback or a path."""


class EngineOverloadedError(RuntimeError):
    """The waiting queue is full (the server answers 429 with Retry-After)."""


class EngineClient(ABC):
    # name the model is served under (the `model` field of requests and /v1/models)
    model_name: str
    # longest prompt + output a request may have
    max_model_len: int
    # the model's tokenizer (HF), used by the API process for prompts and chat templates
    tokenizer: Any

    @abstractmethod
    def generate(
        self,
        prompt: PromptType | ProcessedPrompt,
        params: SamplingParams,
        request_id: str,
        *,
        priority: int = 0,
        cache_salt: str | None = None,
        lora_request: LoRARequest | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Streams the request's outputs as deltas (only what is new); the last has finished.

        `lora_request`: the adapter it runs with (None: the base model); it must have been
        added with add_lora (else ValueError naming `model`).

        Raises ValueError (bad input, naming the field) before anything is queued,
        EngineOverloadedError when the queue is full, EngineDeadError if the engine dies.
        Closing the iterator early (a client disconnect) aborts the request in the engine.
        """

    @abstractmethod
    async def abort(self, request_id: str) -> None:
        """Ends the request and frees its KV blocks (unknown ids are ignored)."""

    @abstractmethod
    async def embed(self, prompt_token_ids: list[int]) -> list[float]:
        """The pooled, L2-normalized final hidden state of the prompt."""

    # engine serves LoRA adapters (EngineArgs.enable_lora); False: the add/remove calls raise
    lora_enabled: bool = False

    async def add_lora(self, lora_request: LoRARequest) -> None:
        """Reads and checks the adapter in the engine (PEFT format) and registers it, so
        requests may select it; raises ValueError naming what is wrong with the adapter (the
        engine is unchanged then). Re-adding a registered id is a no-op."""
        raise ValueError("this engine does not serve LoRA adapters (start it with --enable-lora)")

    async def remove_lora(self, lora_int_id: int) -> None:
        """Unregisters the adapter: new requests may no longer select it; its running
        requests finish first, then its device slot and host copy are freed. Unknown ids raise
        ValueError."""
        raise ValueError("this engine does not serve LoRA adapters (start it with --enable-lora)")

    async def list_loras(self) -> list[LoRARequest]:
        """The registered adapters, in the order they were added."""
        return []

    @abstractmethod
    async def check_health(self, timeout: float) -> None:
        """A real one-token generation through the engine, ahead of user traffic; raises on
        failure or when `timeout` seconds pass."""

    @property
    @abstractmethod
    def is_ready(self) -> bool:
        """Weights loaded and warmup done."""

    @property
    @abstractmethod
    def dead_reason(self) -> str | None:
        """None while the engine core is alive; else why it is not."""

    @property
    def unavailable_reason(self) -> str | None:
        """None while requests can be served; else a short reason (dead, or restarting).

        Unlike dead_reason, set while the engine heals itself (a restarting core): /readyz
        and /health answer 503 with it, /livez does not."""
        return self.dead_reason

    async def wait_dead(self) -> str:
        """Returns the reason once the engine is dead for good and cannot heal (the server
        then exits non-zero). By default it never returns."""
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    @property
    @abstractmethod
    def heartbeat_age(self) -> float:
        """Seconds since the engine core last reported progress (a step, or idle)."""

    @property
    @abstractmethod
    def stats(self) -> SchedulerStats:
        """The latest scheduler stats the core reported."""

    @abstractmethod
    async def shutdown(self) -> None:
        """Stops the engine core and frees its resources."""
