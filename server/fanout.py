"""Runs one engine request per prompt and merges their delta streams into one.

NOTE on cancellation: each engine stream is drained by its own task, so a slow prompt never
holds back a fast one. Leaving the `async with` (normally, by error, or because aiohttp
cancelled the handler on a client disconnect) cancels those tasks, and each task closes its
engine iterator in a finally: closing is what aborts the request in the engine (the
EngineClient contract), freeing its KV blocks.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from jaxserve.engine.client import EngineClient
from jaxserve.lora.request import LoRARequest
from jaxserve.outputs import RequestOutput
from jaxserve.sampling_params import SamplingParams


@dataclass
class EnginePrompt:
    # the prompt text, or None when the client sent token ids
    text: str | None
    token_ids: list[int]

    def as_engine_input(self) -> dict[str, Any]:
        prompt: dict[str, Any] = {"prompt_token_ids": self.token_ids}
        if self.text is not None:
            prompt["prompt"] = self.text
        return prompt


# (prompt index, output) on success, (prompt index, exception) on failure,
# (prompt index, None) when that prompt's stream ended
_Item = tuple[int, RequestOutput | BaseException | None]


class Fanout:
    def __init__(
        self,
        engine: EngineClient,
        prompts: list[EnginePrompt],
        params: SamplingParams,
        request_id: str,
        *,
        priority: int = 0,
        cache_salt: str | None = None,
        lora_request: LoRARequest | None = None,
    ) -> None:
        self._engine = engine
        self._prompts = prompts
        self._params = params
        # engine request ids: one per prompt
        self.request_ids = [f"{request_id}-{i}" for i in range(len(prompts))]
        self._priority = priority
        self._cache_salt = cache_salt
        # passed only when set, so the base model's call is the one every engine takes
        self._lora_kwargs = {} if lora_request is None else {"lora_request": lora_request}
        self._queue: asyncio.Queue[_Item] = asyncio.Queue()
        self._tasks: list[asyncio.Task] = []

    async def __aenter__(self) -> Fanout:
        self._tasks = [asyncio.create_task(self._pump(i, p)) for i, p in enumerate(self._prompts)]
        return self

    async def __aexit__(self, *exc: object) -> None:
        for task in self._tasks:
            task.cancel()
        # shielded: a second cancellation of the handler must not skip the aborts
        await asyncio.shield(asyncio.gather(*self._tasks, return_exceptions=True))

    async def _pump(self, index: int, prompt: EnginePrompt) -> None:
        stream: AsyncIterator[RequestOutput] | None = None
        try:
            stream = self._engine.generate(
                prompt.as_engine_input(),
                self._params,
                self.request_ids[index],
                priority=self._priority,
                cache_salt=self._cache_salt,
                **self._lora_kwargs,
            )
            async for out in stream:
                self._queue.put_nowait((index, out))
            self._queue.put_nowait((index, None))
        except asyncio.CancelledError:
            raise
        except Exception as e:  # handed to the consumer, which maps it to an HTTP error
            self._queue.put_nowait((index, e))
        finally:
            aclose = getattr(stream, "aclose", None)
            if aclose is not None:
                await aclose()

    async def outputs(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        """(prompt index, delta) as they arrive; the first engine error is raised."""
        num_open = len(self._tasks)
        while num_open:
            index, item = await self._queue.get()
            if item is None:
                num_open -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield index, item
