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


# The API key of the live server: every request the live tests send carries it, so the auth
# middleware (and its handling of odd Authorization headers) is on the path of each one.
LIVE_API_KEY = "live-test-key"
LIVE_MODEL = "tiny"


@pytest.fixture(scope="session")
def live_server(tmp_path_factory, tiny_model_dir):
    """One real `python -m server` on loopback with the tiny model, shared by the modules that
    attack it from outside (bad input, schemathesis): starting one costs most of their time."""
    from tests.e2e.server_proc import Server

    srv = Server(
        tmp_path_factory.mktemp("live-server"),
        "--api-key",
        LIVE_API_KEY,
        "--served-model-name",
        LIVE_MODEL,
        model=str(tiny_model_dir),
        base_args=("--max-model-len", "256", "--max-num-batched-tokens", "64"),
    )
    yield srv
    srv.stop()
