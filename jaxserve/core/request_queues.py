"""RequestQueues: a scheduler's unfinished requests, where each one is, and how one leaves.

Every unfinished request is in `requests` and in exactly one of `waiting` (queued, or
preempted for recompute) and `running` (holding KV blocks). A request leaves by finishing (a
stop, its length), by an abort, or by failing alone (its bookkeeping or staging raised): each
way frees its blocks and forgets it. core/scheduler.py adds the per-step policy on top.
"""

from __future__ import annotations

import contextlib
import logging

from jaxserve.core.admission import check_new_request_id
from jaxserve.core.kv_cache_manager import KVCacheManager
from jaxserve.core.lora_use import LoRAUse
from jaxserve.core.outputs import EngineCoreOutput
from jaxserve.core.waiting_queue import WaitingQueue
from jaxserve.request import FinishReason, Request, RequestStatus

logger = logging.getLogger(__name__)


class RequestQueues:
    def __init__(
        self, kv_cache_manager: KVCacheManager, waiting: WaitingQueue, max_loras: int | None
    ) -> None:
        """max_loras: LoRA device slots (None: LoRA off)."""
        # the blocks every running request holds
        self.kv_cache_manager = kv_cache_manager
        # req_id -> every unfinished request (waiting or running)
        self.requests: dict[str, Request] = {}
        # queued and preempted requests, in the policy's order
        self.waiting = waiting
        # admitted requests in admission order; the last one is the first preempted (fcfs)
        self.running: list[Request] = []
        # finished or aborted since the last schedule(), reported in the next SchedulerOutput
        self.finished_req_ids: list[str] = []
        # ids of the waiting or running requests added with urgent=True
        self._urgent_req_ids: set[str] = set()
        # req_id -> why it failed alone (its bookkeeping or staging raised); reported as an
        # error output by the next update_from_output (see fail_request)
        self._failed: dict[str, str] = {}
        # unfinished requests per adapter, and the max_loras rule
        self.lora_use = LoRAUse(max_loras)

    def add_request(self, request: Request, *, urgent: bool = False) -> None:
        """Queues a request; ValueError (naming the field) when it cannot be, taking nothing.

        The request meets the admission rules already (EngineCore.add_request ran them); what
        is left is what only the scheduler knows: its ids in use and its policy.
        urgent=True (health probes): the request goes to the front of the waiting queue
        (under "priority", give it a low priority value too) and may take a reserved seat.
        """
        check_new_request_id(request.request_id, self.requests)
        if request.priority != 0 and not urgent and not self.waiting.is_priority:
            # as vLLM: a priority the policy would ignore is refused, not accepted and ignored
            raise ValueError(
                f"priority={request.priority} needs scheduling_policy='priority' "
                "(this engine schedules fcfs)"
            )
        request.status = RequestStatus.WAITING
        self.requests[request.request_id] = request
        self.lora_use.add(request)
        if urgent:
            self._urgent_req_ids.add(request.request_id)
            self.waiting.add_front(request)
        else:
            self.waiting.add(request)

    def abort_requests(self, request_ids: list[str] | str) -> None:
        """Aborts waiting or running requests; unknown or finished ids are ignored."""
        self.finish_requests(request_ids, RequestStatus.FINISHED_ABORTED)

    def finish_requests(
        self,
        request_ids: list[str] | str,
        status: RequestStatus,
        stop_reason: int | str | None = None,
    ) -> None:
        """Ends requests for a reason found outside the core (a stop string, an abort)."""
        if not RequestStatus.is_finished(status):
            raise ValueError(f"status must be a finished status, got {status.name}")
        if isinstance(request_ids, str):
            request_ids = [request_ids]
        finished_running = False
        for req_id in request_ids:
            request = self.requests.get(req_id)
            if request is None:
                continue
            if request.status == RequestStatus.RUNNING:
                finished_running = True
            else:
                self.waiting.remove(request)
            request.status = status
            request.stop_reason = stop_reason
            self._free_request(request)
        if finished_running:
            self.running = [r for r in self.running if not r.is_finished]

    def get_request(self, req_id: str) -> Request | None:
        """The unfinished request with this id, else None."""
        return self.requests.get(req_id)

    def has_unfinished_requests(self) -> bool:
        return bool(self.running) or len(self.waiting) > 0

    def get_num_unfinished_requests(self) -> int:
        return len(self.running) + len(self.waiting)

    def fail_request(self, request: Request, reason: str) -> None:
        """Ends one request that failed alone (its bookkeeping or staging raised) and frees
        its blocks; the next update_from_output reports it as an error output with `reason`
        (short: no traceback). The other requests go on."""
        if request.request_id not in self.requests:
            return  # already finished or aborted
        # wherever the failure left it (a rare path, so O(queue) is fine)
        self.running = [r for r in self.running if r is not request]
        with contextlib.suppress(ValueError):
            self.waiting.remove(request)
        request.status = RequestStatus.FINISHED_ABORTED
        self._free_request(request)
        self._failed[request.request_id] = reason

    def _fail_on_exception(self, request: Request, e: Exception) -> None:
        logger.error("scheduling request %s failed", request.request_id, exc_info=e)
        self.fail_request(
            request, f"the engine could not schedule this request: {type(e).__name__}: {e}"
        )

    def _take_failure_outputs(self) -> list[EngineCoreOutput]:
        """The error outputs of the requests that failed since the last call."""
        if not self._failed:
            return []
        failures, self._failed = self._failed, {}
        return [
            EngineCoreOutput(
                request_id=req_id, new_token_ids=[], finish_reason=FinishReason.ABORT, error=reason
            )
            for req_id, reason in failures.items()
        ]

    def _free_request(self, request: Request) -> None:
        """Frees a finished request's blocks and forgets it (the caller fixes up the queues)."""
        self.kv_cache_manager.free(request)
        del self.requests[request.request_id]
        self.lora_use.remove(request)
        self._urgent_req_ids.discard(request.request_id)
        self.finished_req_ids.append(request.request_id)
