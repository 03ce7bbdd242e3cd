"""LoRAUse: which adapters the scheduler's requests use, and the max_loras admission rule.

A step can only run adapters that sit in a device slot, and there are max_loras slots: so the
running requests may use at most max_loras distinct adapters. A waiting request whose adapter
would be one too many is skipped (it stays at its place in the queue; requests behind it, on
the base model or a resident adapter, go ahead), as in vLLM. Plain host Python.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

from jaxserve.request import Request


class LoRAUse:
    def __init__(self, max_loras: int | None) -> None:
        """max_loras: device slots (None: LoRA off, every request is on the base model)."""
        self.max_loras = max_loras
        # adapter id -> unfinished (waiting or running) requests on it
        self.refs: Counter[int] = Counter()

    def add(self, request: Request) -> None:
        if request.lora_int_id:
            self.refs[request.lora_int_id] += 1

    def remove(self, request: Request) -> None:
        lid = request.lora_int_id
        if lid:
            self.refs[lid] -= 1
            if self.refs[lid] <= 0:
                del self.refs[lid]

    @staticmethod
    def running_ids(running: Iterable[Request]) -> set[int]:
        """The adapters of the running requests (each holds a device slot)."""
        return {r.lora_int_id for r in running if r.lora_int_id}

    def fits(self, request: Request, running_ids: set[int]) -> bool:
        """Can `request` run next to requests using `running_ids`?"""
        lid = request.lora_int_id
        if not lid or lid in running_ids or self.max_loras is None:
            return True
        return len(running_ids) < self.max_loras
