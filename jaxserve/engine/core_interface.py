"""EngineCoreInterface: what LLMEngine, the engine-core process and the embed queue call on
an engine core, whether it is one EngineCore or a DPEngineCore of several replicas.

A typing.Protocol, so both classes are checked against one declaration (EngineCore satisfies
it with its own scheduler and runner; DPEngineCore routes requests and aggregates replicas).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    from jaxserve.core.admission import EngineCoreRequest, RequestLimits
    from jaxserve.core.outputs import EngineCoreOutputs, SchedulerStats
    from jaxserve.core.scheduler import Scheduler
    from jaxserve.engine.core import EngineCore
    from jaxserve.lora.request import LoRARequest
    from jaxserve.model.loader import LoadedModel
    from jaxserve.model.spec import ModelSpec
    from jaxserve.runner.model_runner import ModelRunner


@runtime_checkable  # isinstance() checks the members exist (tests do it for both cores)
class EngineCoreInterface(Protocol):
    # the loaded model: its spec and tokenizer (the params moved into the runners)
    model: LoadedModel
    # the model's spec
    spec: ModelSpec
    # the resolved longest prompt + output
    max_model_len: int
    # the sizes every request is checked against (core/admission.py)
    limits: RequestLimits
    # replica 0's runner (every replica has the same shapes, blocks and buckets)
    runner: ModelRunner
    # seconds from construction to ready, and of that, warmup (summed over replicas)
    startup_seconds: float
    warmup_seconds: float

    @property
    def replicas(self) -> Sequence[EngineCore]:
        """The EngineCores that step (one, or data_parallel_size of them)."""
        ...

    @property
    def num_replicas(self) -> int: ...

    @property
    def schedulers(self) -> list[Scheduler]:
        """One scheduler per replica, in replica order."""
        ...

    def add_request(
        self, request: EngineCoreRequest, *, urgent: bool = False, replica: int | None = None
    ) -> None:
        """Checks and queues a request (ValueError naming the field, nothing taken)."""
        ...

    def abort_requests(self, request_ids: Iterable[str]) -> None: ...

    def finish_requests(self, request_ids: Iterable[str], stop_reason: str) -> None: ...

    def add_lora(self, lora_request: LoRARequest) -> None:
        """Reads and checks an adapter (ValueError naming what is wrong)."""
        ...

    def remove_lora(self, lora_int_id: int) -> None:
        """Refuses new requests on it; frees it once its last request ends."""
        ...

    def list_loras(self) -> list[LoRARequest]: ...

    def has_unfinished_requests(self) -> bool: ...

    def step(self) -> EngineCoreOutputs:
        """One schedule -> execute -> update_from_output (on every replica with work)."""
        ...

    def make_stats(self) -> SchedulerStats: ...

    def close(self) -> None:
        """Frees every device buffer; the core is unusable after."""
        ...


__all__ = ["EngineCoreInterface"]
