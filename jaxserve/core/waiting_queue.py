"""WaitingQueue: the requests waiting for admission, in the order the scheduling policy says.

The scheduler admits from its front; preempted requests go back ahead of the others (FCFS)
or by their key (priority). Plain host Python, never jax.
"""

from __future__ import annotations

import heapq
import itertools
from collections import deque
from collections.abc import Iterator

from jaxserve.request import Request


class WaitingQueue:
    """Requests waiting for admission: FCFS, or by (priority, arrival_time) under "priority"."""

    def __init__(self, policy: str) -> None:
        self.is_priority = policy == "priority"
        # fcfs: admission order, preempted requests pushed back at the front
        self._fifo: deque[Request] = deque()
        # priority: a heap of (priority, arrival_time, insertion count, request)
        self._heap: list[tuple[int, float, int, Request]] = []
        self._counter = itertools.count()

    def add(self, request: Request) -> None:
        if self.is_priority:
            self._push(request)
        else:
            self._fifo.append(request)

    def add_front(self, request: Request) -> None:
        """Requeues a preempted request ahead of the others (under priority, its key decides)."""
        if self.is_priority:
            self._push(request)
        else:
            self._fifo.appendleft(request)

    def add_front_in_order(self, requests: list[Request]) -> None:
        """Puts requests taken from the front back there, in the order they were taken."""
        for request in reversed(requests):
            self.add_front(request)

    def peek(self) -> Request:
        return self._heap[0][3] if self.is_priority else self._fifo[0]

    def pop(self) -> Request:
        return heapq.heappop(self._heap)[3] if self.is_priority else self._fifo.popleft()

    def remove(self, request: Request) -> None:
        """O(len) removal, for aborts only."""
        if self.is_priority:
            self._heap = [entry for entry in self._heap if entry[3] is not request]
            heapq.heapify(self._heap)
        else:
            self._fifo.remove(request)

    def __len__(self) -> int:
        return len(self._heap) if self.is_priority else len(self._fifo)

    def __iter__(self) -> Iterator[Request]:
        """Requests in admission order (sorts the heap: for tests and debugging)."""
        if self.is_priority:
            return (entry[3] for entry in sorted(self._heap, key=lambda e: e[:3]))
        return iter(self._fifo)

    def _push(self, request: Request) -> None:
        key = (request.priority, request.arrival_time, next(self._counter), request)
        heapq.heappush(self._heap, key)
