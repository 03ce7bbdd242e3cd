"""schemathesis against /openapi.json of the real server (the `live_server` of conftest.py):
requests generated from the very Structs that validate them, valid and invalid. Zero 5xx,
and every response matches its documented status, content type and schema.

Driven through hypothesis directly (operation.as_strategy) rather than schemathesis' pytest
plugin, whose lazy fixture loader does not run under pytest 9.

The LoRA routes (server/lora_api.py) exist only with --enable-lora, which the live server (the
tiny model, no adapters) does not have: they are fuzzed against the fake engine's app served
on loopback instead (test_lora_api), which is what they talk to the engine through anyway.
"""

from __future__ import annotations

import asyncio
import threading

import pytest
import schemathesis
from aiohttp import web
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)

from server import lora_api
from server.app import ROUTES, make_app
from tests.server.conftest import LIVE_API_KEY
from tests.server.fake_engine import FakeEngine

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]
# examples per operation and mode: the generation endpoints run the (tiny) model for the valid
# ones, so this bounds the time; max_tokens is bounded by max_model_len on the server
MAX_EXAMPLES = {"POST": 25, "GET": 5}


@pytest.fixture(scope="module")
def live_schema(live_server):
    return schemathesis.openapi.from_url(f"{live_server.url}/openapi.json")


# Generation length: chat's default is "until max_model_len", and n multiplies it; valid
# examples get at most this many tokens and completions, so the run stays seconds long.
MAX_GENERATED = 4


def bound_generation(case):
    """Caps what a valid generation example makes the model do (values stay schema-valid)."""
    body = case.body
    if isinstance(body, dict) and ("prompt" in body or "messages" in body):
        for name in ("max_tokens", "max_completion_tokens"):
            if isinstance(body.get(name), int):
                body[name] = max(1, min(body[name], MAX_GENERATED))
        if "messages" in body and body.get("max_completion_tokens") is None:
            body["max_tokens"] = min(body.get("max_tokens") or MAX_GENERATED, MAX_GENERATED)
        if isinstance(body.get("n"), int):
            body["n"] = min(body["n"], 2)
        if isinstance(body.get("min_tokens"), int):
            body["min_tokens"] = min(body["min_tokens"], 1)
    return case


# GETs without parameters have no invalid form: positive only
PARAMS = [(m, p, GenerationMode.POSITIVE) for m, p, _ in ROUTES] + [
    (m, p, GenerationMode.NEGATIVE) for m, p, _ in ROUTES if m == "POST"
]


@pytest.mark.parametrize(("method", "path", "mode"), PARAMS)
def test_api(live_schema, live_server, method, path, mode):
    _fuzz(live_schema, live_server.url, method, path, mode)


@pytest.fixture(scope="module")
def lora_server_url():
    """make_app(FakeEngine(enable_lora=True)) on a loopback port, its loop in a thread."""
    loop = asyncio.new_event_loop()
    runner = web.AppRunner(make_app(FakeEngine(enable_lora=True), api_key=LIVE_API_KEY))
    loop.run_until_complete(runner.setup())
    site = web.TCPSite(runner, "127.0.0.1", 0)
    loop.run_until_complete(site.start())
    port = runner.addresses[0][1]
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{port}"
    asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(10)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)
    loop.close()


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
@pytest.mark.parametrize(("method", "path"), [(m, p) for m, p, _ in lora_api.ROUTES])
def test_lora_api(lora_server_url, method, path, mode):
    schema = schemathesis.openapi.from_url(f"{lora_server_url}/openapi.json")
    _fuzz(schema, lora_server_url, method, path, mode)


def _fuzz(schema, url: str, method: str, path: str, mode: GenerationMode) -> None:
    operation = schema[path][method]
    auth = {"Authorization": f"Bearer {LIVE_API_KEY}"}
    cases = operation.as_strategy(mode, headers=auth)
    if mode == GenerationMode.POSITIVE:
        cases = cases.map(bound_generation)

    @given(case=cases)
    @settings(
        max_examples=MAX_EXAMPLES[method],
        deadline=None,
        suppress_health_check=list(HealthCheck),
        derandomize=True,
        database=None,
    )
    def run(case):
        # invalid requests must also be refused (4xx): the schema and the validation are one
        checks = CHECKS if mode == GenerationMode.POSITIVE else [*CHECKS, negative_data_rejection]
        case.call_and_validate(base_url=url, checks=checks, timeout=60)

    run()
