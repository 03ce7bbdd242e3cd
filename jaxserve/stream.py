"""RequestStream: one request's outputs as an async iterator that drives the offline engine.

There is no background task or thread: waiting for the next output runs one engine step
(LLM._step, which routes every request's outputs to its queue) and then yields to the event
loop, so whichever stream awaits drives the engine, every stream's request advances in that
step, and nothing is bound to one event loop (asyncio.run twice, Jupyter's loop, all work).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable

from jaxserve.outputs import RequestOutput


class RequestStream:
    """`async for out in llm.stream(...)`: one request's RequestOutputs as its tokens arrive.

    aclose(), abort(), leaving `async with`, or dropping the stream before its last output
    (`break` out of the loop) aborts the request and frees its KV blocks at once.
    """

    def __init__(
        self,
        request_id: str,
        outputs: deque[RequestOutput],
        *,
        step: Callable[[], None],
        abort: Callable[[str], None],
        is_live: Callable[[], bool],
    ) -> None:
        self.request_id = request_id
        # filled by the engine's steps; a separate object, so the engine's side holds no
        # reference to the stream and dropping the stream runs __del__ at once
        self._outputs = outputs
        # runs one engine step (raises RuntimeError once the LLM is closed)
        self._step = step
        # ends a request in flight (by id) and frees its blocks
        self._abort = abort
        # False once the request was aborted from outside or its LLM closed
        self._is_live = is_live
        # True once the final output was read or the request was aborted
        self._done = False

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        while not self._outputs:
            if self._done:
                raise StopAsyncIteration
            if not self._is_live():
                self._done = True
                raise RuntimeError(f"request {self.request_id!r} was aborted or its LLM closed")
            self._step()
            # Let other tasks (other streams' consumers) run between steps.
            await asyncio.sleep(0)
        out = self._outputs.popleft()
        if out.finished:
            self._done = True
        return out

    def abort(self) -> None:
        """Ends the request now and frees its KV blocks (no-op once it finished)."""
        if not self._done:
            self._done = True
            self._outputs.clear()
            self._abort(self.request_id)

    async def aclose(self) -> None:
        self.abort()

    async def __aenter__(self) -> RequestStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.abort()

    def __del__(self) -> None:
        # `break` out of `async for` drops the stream: abort so no KV block stays held.
        if not getattr(self, "_done", True):
            self.abort()

    def __repr__(self) -> str:
        state = "done" if self._done else "running"
        return f"RequestStream({self.request_id!r}, {state})"
