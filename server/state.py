"""The server's shared state under one typed AppKey: engine, limits, metrics, drain flag."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from aiohttp import web

from jaxserve.engine.client import EngineClient
from jaxserve.metrics import ServerMetrics
from server.chat_config import ChatConfig
from server.errors import APIError
from server.lora import LoRARegistry
from server.protocol import Limits


@dataclass
class ServerState:
    engine: EngineClient
    # the name clients must send as `model` (defaults to the engine's model_name)
    model_name: str
    limits: Limits
    metrics: ServerMetrics
    api_key: str | None = None
    # encode control-token spellings in chat messages as control tokens (tokenizer.py)
    allow_special_tokens_in_content: bool = False
    # unix time the app was made (the model card's `created`)
    created: int = 0
    # the chat template, its tool support and the output parsers (decided at startup)
    chat: ChatConfig = field(default_factory=ChatConfig)
    # set on SIGTERM: /readyz answers 503 and new generation requests are refused
    draining: bool = False
    # generation/embedding requests being served (the drain waits for 0)
    num_in_flight: int = 0
    # set whenever num_in_flight drops to 0
    idle: asyncio.Event = field(default_factory=asyncio.Event)
    # the LoRA adapters served (empty without --enable-lora) and what `model` selects
    loras: LoRARegistry = field(init=False)

    def __post_init__(self) -> None:
        self.idle.set()
        self.loras = LoRARegistry(self.model_name)

    @contextmanager
    def admit(self) -> Iterator[None]:
        """Counts one request in flight; refuses it while draining or with a dead engine."""
        if self.draining:
            raise APIError(503, "the server is shutting down", code="server_draining")
        dead = self.engine.dead_reason
        if dead is not None:
            raise APIError(503, f"the engine is dead: {dead}", code="engine_dead")
        self.num_in_flight += 1
        self.idle.clear()
        try:
            yield
        finally:
            self.num_in_flight -= 1
            if self.num_in_flight == 0:
                self.idle.set()


STATE_KEY = web.AppKey("jaxserve_state", ServerState)
