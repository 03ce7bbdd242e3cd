"""aiohttp test clients against make_app(FakeEngine())."""

from __future__ import annotations

import pytest

from server.app import make_app
from tests.server.fake_engine import FakeEngine


@pytest.fixture
def engine() -> FakeEngine:
    return FakeEngine()


@pytest.fixture
async def client(aiohttp_client, engine):
    return await aiohttp_client(make_app(engine), server_kwargs={"handler_cancellation": True})
