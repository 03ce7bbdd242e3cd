"""Connection hygiene on the real listener (server/connections.py), over raw sockets.

Half-sent heads and bodies, idle keep-alive connections and connections past the bound are
closed; the Server header names no versions; malformed HTTP is one rate-limited WARNING.
Timeouts are a few tenths of a second here, so every test takes about a second.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time

import pytest

from server.app import make_app
from server.connections import ConnectionLimits, start_http
from tests.server.fake_engine import FakeEngine

TIMEOUT_S = 0.3
GET_LIVEZ = b"GET /livez HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"


@pytest.fixture
async def listen():
    """start(**limits) -> (port, engine): a FakeEngine app behind start_http on port 0."""
    runners = []

    async def start(**limits):
        engine = FakeEngine()
        app = make_app(engine, bind_host="127.0.0.1")
        defaults = dict(
            header_timeout_s=TIMEOUT_S, body_timeout_s=TIMEOUT_S, keep_alive_timeout_s=5.0
        )
        runner, site = await start_http(
            app,
            "127.0.0.1",
            0,
            ConnectionLimits(**{**defaults, **limits}),
            shutdown_timeout_s=0.1,
        )
        runners.append(runner)
        return site.port, engine

    yield start
    for runner in runners:
        await runner.cleanup()


async def _connect(port: int):
    return await asyncio.open_connection("127.0.0.1", port)


async def _read_to_eof(reader: asyncio.StreamReader, limit_s: float = 5.0) -> bytes:
    return await asyncio.wait_for(reader.read(), limit_s)


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    status_line, *lines = head.decode().split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines if line)
    body = await reader.readexactly(int(headers.get("Content-Length", 0)))
    return int(status_line.split()[1]), headers, body


def _status_and_body(raw: bytes) -> tuple[int, dict]:
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


async def _healthy(port: int) -> bool:
    reader, writer = await _connect(port)
    writer.write(GET_LIVEZ)
    status, _, _ = await _read_response(reader)
    writer.close()
    return status == 200


async def test_a_half_sent_head_is_closed_after_the_header_timeout(listen):
    port, _ = await listen()
    reader, writer = await _connect(port)
    start = time.monotonic()
    writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # no blank line
    raw = await _read_to_eof(reader)
    elapsed = time.monotonic() - start
    status, body = _status_and_body(raw)
    assert status == 408 and "--header-timeout" in body["error"]["message"]
    assert TIMEOUT_S * 0.8 <= elapsed < TIMEOUT_S + 1.0
    assert await _healthy(port)


async def test_a_trickled_head_does_not_extend_the_deadline(listen):
    port, _ = await listen()
    reader, writer = await _connect(port)
    start = time.monotonic()
    closed = asyncio.ensure_future(_read_to_eof(reader))
    for byte in b"GET /livez HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: aaaaaaaaaaaaaaaaaaaa":
        if closed.done():
            break
        writer.write(bytes([byte]))
        await asyncio.sleep(0.02)  # a byte every 20 ms: active, yet never done
    raw = await closed
    assert _status_and_body(raw)[0] == 408
    assert time.monotonic() - start < TIMEOUT_S + 1.0


async def test_a_half_sent_body_is_closed_after_the_body_timeout(listen):
    port, engine = await listen()
    reader, writer = await _connect(port)
    start = time.monotonic()
    writer.write(
        b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n"
        b'{"prompt": "hi"'  # 15 of the 100 bytes
    )
    raw = await _read_to_eof(reader)
    elapsed = time.monotonic() - start
    status, body = _status_and_body(raw)
    assert status == 408 and "--body-timeout" in body["error"]["message"]
    assert TIMEOUT_S * 0.8 <= elapsed < TIMEOUT_S + 1.0
    assert engine.requests == [] and engine.active == set()
    assert await _healthy(port)


async def test_a_complete_slow_request_is_not_cut(listen):
    # the body deadline only runs while the body is incomplete: a stream that lasts longer
    # than every timeout goes on to its end
    port, engine = await listen()
    engine.step_delay = 0.02
    reader, writer = await _connect(port)
    body = json.dumps({"prompt": "hi", "max_tokens": 40, "stream": True}).encode()
    writer.write(
        b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
        b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
    )
    start = time.monotonic()
    raw = await _read_to_eof(reader)
    assert time.monotonic() - start > TIMEOUT_S * 2
    assert raw.startswith(b"HTTP/1.1 200") and b"data: [DONE]" in raw
    assert raw.endswith(b"0\r\n\r\n")  # the chunked stream's proper end


async def test_an_idle_keep_alive_connection_is_closed(listen):
    port, _ = await listen(keep_alive_timeout_s=TIMEOUT_S, header_timeout_s=5.0)
    reader, writer = await _connect(port)
    writer.write(GET_LIVEZ)
    status, headers, _ = await _read_response(reader)
    assert status == 200 and headers.get("Connection", "").lower() != "close"
    start = time.monotonic()
    assert await _read_to_eof(reader) == b""  # closed by the server, nothing more sent
    assert TIMEOUT_S * 0.8 <= time.monotonic() - start < TIMEOUT_S + 1.5
    # and one that never sends a byte
    reader, writer = await _connect(port)
    assert await _read_to_eof(reader) == b""


async def test_a_head_begun_late_in_the_idle_time_gets_the_whole_header_timeout(listen):
    port, _ = await listen(keep_alive_timeout_s=0.4, header_timeout_s=0.8)
    reader, writer = await _connect(port)
    await asyncio.sleep(0.3)  # idle, within the keep-alive timeout
    writer.write(b"GET /livez HTTP/1.1\r\n")
    await asyncio.sleep(0.3)  # past the keep-alive timeout, within the header timeout
    writer.write(b"Host: 127.0.0.1\r\n\r\n")
    assert (await _read_response(reader))[0] == 200


async def test_the_connection_bound_refuses_when_none_is_idle(listen):
    port, _ = await listen(max_connections=2, header_timeout_s=5.0)
    busy = []
    for _ in range(2):  # two connections in the middle of a head: not idle
        reader, writer = await _connect(port)
        writer.write(b"GET /livez HTTP/1.1\r\n")
        busy.append((reader, writer))
    await asyncio.sleep(0.05)
    reader, writer = await _connect(port)
    status, body = _status_and_body(await _read_to_eof(reader))
    assert status == 503 and body["error"]["code"] == "too_many_connections"
    # the two in progress are untouched: they finish their requests
    for reader, writer in busy:
        writer.write(b"Host: 127.0.0.1\r\n\r\n")
        assert (await _read_response(reader))[0] == 200


async def test_the_connection_bound_evicts_the_longest_idle(listen):
    port, _ = await listen(max_connections=2)
    idle = []
    for _ in range(2):
        reader, writer = await _connect(port)
        writer.write(GET_LIVEZ)
        assert (await _read_response(reader))[0] == 200  # now idle, kept alive
        idle.append((reader, writer))
        await asyncio.sleep(0.02)
    reader, writer = await _connect(port)
    writer.write(GET_LIVEZ)
    assert (await _read_response(reader))[0] == 200  # the new one is served
    # the oldest idle one made room, long before its 5 s keep-alive would have closed it
    assert await _read_to_eof(idle[0][0], limit_s=1.0) == b""
    idle[1][1].write(GET_LIVEZ)
    assert (await _read_response(idle[1][0]))[0] == 200  # the younger one still works


async def test_no_response_names_software_versions(listen):
    port, _ = await listen()
    reader, writer = await _connect(port)
    writer.write(GET_LIVEZ)
    _, headers, _ = await _read_response(reader)
    assert headers["Server"] == "jaxserve"
    # aiohttp's own answer to malformed HTTP, which bypasses the app
    reader, writer = await _connect(port)
    writer.write(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nBad Header Line\r\n\r\n")
    raw = await _read_to_eof(reader)
    assert re.match(rb"HTTP/1\.[01] 400", raw)
    server = re.search(rb"\r\nServer: ([^\r]*)", raw)
    assert server is not None and not re.search(rb"\d", server.group(1)), raw


async def test_malformed_http_is_one_rate_limited_warning(listen, caplog):
    port, _ = await listen()
    caplog.set_level(logging.DEBUG)
    for _ in range(5):
        reader, writer = await _connect(port)
        writer.write(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nBad Header Line\r\n\r\n")
        assert re.match(rb"HTTP/1\.[01] 400", await _read_to_eof(reader))
    records = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(records) == 1, [r.getMessage() for r in records]
    assert records[0].levelno == logging.WARNING and records[0].exc_info is None
    assert "malformed HTTP request" in records[0].getMessage()
    assert "\n" not in records[0].getMessage()  # one line, whatever the client sent


def test_limits_refuse_nonsense():
    with pytest.raises(ValueError, match="header_timeout_s"):
        ConnectionLimits(header_timeout_s=0)
    with pytest.raises(ValueError, match="max_connections"):
        ConnectionLimits(max_connections=0)
