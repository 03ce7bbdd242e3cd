"""Disconnects abort engine requests; SIGTERM drains in-flight requests, then exits 0."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket

import aiohttp

from server.args import add_server_args
from server.serve import serve
from tests.server.fake_engine import FakeEngine


async def test_disconnect_mid_stream_aborts(client, engine):
    engine.step_delay = 0.02
    r = await client.post(
        "/v1/completions", json={"prompt": ["ab", "cd"], "max_tokens": 200, "stream": True}
    )
    assert r.status == 200
    await r.content.readuntil(b"\n\n")
    r.close()  # drop the connection mid-stream
    for _ in range(100):
        if len(engine.aborted) == 2:
            break
        await asyncio.sleep(0.02)
    assert sorted(engine.aborted) == sorted(req_id for req_id, _, _ in engine.requests)
    assert not engine.active


async def test_disconnect_non_streaming_aborts(client, engine):
    engine.step_delay = 0.02
    task = asyncio.create_task(
        client.post("/v1/completions", json={"prompt": "ab", "max_tokens": 200})
    )
    await _wait_active(engine)
    task.cancel()
    for _ in range(100):
        if engine.aborted:
            break
        await asyncio.sleep(0.02)
    assert len(engine.aborted) == 1


async def _wait_active(engine: FakeEngine) -> None:
    for _ in range(500):
        if engine.active:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the request never reached the engine")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ns(port: int, shutdown_timeout: float) -> argparse.Namespace:
    # the real parser: every server flag gets its default, as `jaxserve serve` would
    parser = argparse.ArgumentParser()
    add_server_args(parser)
    return parser.parse_args(
        ["--port", str(port), "--max-body-bytes", str(1 << 20)]
        + ["--shutdown-timeout", str(shutdown_timeout)]
    )


async def test_sigterm_drains_then_exits():
    engine = FakeEngine(step_delay=0.01)
    port = _free_port()
    server = asyncio.create_task(serve(_ns(port, 10.0), engine))
    base = f"http://127.0.0.1:{port}"
    async with aiohttp.ClientSession() as session:
        for _ in range(100):
            try:
                async with session.get(base + "/livez") as r:
                    if r.status == 200:
                        break
            except aiohttp.ClientConnectionError:
                await asyncio.sleep(0.02)
        in_flight = asyncio.create_task(
            session.post(base + "/v1/completions", json={"prompt": "x", "max_tokens": 30})
        )
        await _wait_active(engine)
        os.kill(os.getpid(), signal.SIGTERM)
        await asyncio.sleep(0.05)
        async with session.get(base + "/readyz") as r:
            assert r.status == 503
        async with session.post(base + "/v1/completions", json={"prompt": "x"}) as r:
            assert r.status == 503
        r = await in_flight
        assert r.status == 200  # the in-flight request finished during the drain
        body = await r.json()
        assert body["choices"][0]["finish_reason"] == "length"
    assert await asyncio.wait_for(server, 5) == 0
    assert engine.dead == "shut down"


async def test_second_sigterm_skips_the_drain():
    engine = FakeEngine(step_delay=0.05)
    port = _free_port()
    server = asyncio.create_task(serve(_ns(port, 60.0), engine))
    async with aiohttp.ClientSession() as session:
        for _ in range(100):
            try:
                async with session.get(f"http://127.0.0.1:{port}/livez"):
                    break
            except aiohttp.ClientConnectionError:
                await asyncio.sleep(0.02)
        in_flight = asyncio.create_task(
            session.post(
                f"http://127.0.0.1:{port}/v1/completions",
                json={"prompt": "x", "max_tokens": 200, "ignore_eos": True},
            )
        )
        await _wait_active(engine)
        os.kill(os.getpid(), signal.SIGTERM)
        await asyncio.sleep(0.05)
        os.kill(os.getpid(), signal.SIGTERM)
        assert await asyncio.wait_for(server, 5) == 0
        in_flight.cancel()
    assert engine.aborted  # the request cut short was aborted in the engine
