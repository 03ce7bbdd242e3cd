"""Tokenization and chat-template rendering of big inputs run off the event loop, so a few
huge bodies cannot hold /livez (issue 10: four 7 MB chat bodies held it for 7 s)."""

from __future__ import annotations

import asyncio
import threading
import time
import urllib.request

import pytest

from server import request_io

BIG = "hello world " * 50_000  # 600 KB: ~0.7 s to render and encode with the fake tokenizer


@pytest.fixture
def encode_threads(engine):
    """The thread ids each tokenizer.encode call ran on."""
    threads: list[int] = []
    encode = engine.tokenizer.encode

    def recording(*args, **kwargs):
        threads.append(threading.get_ident())
        return encode(*args, **kwargs)

    engine.tokenizer.encode = recording
    return threads


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/tokenize", {"prompt": "{text}"}),
        ("/tokenize", {"messages": [{"role": "user", "content": "{text}"}]}),
        ("/v1/completions", {"prompt": ["a", "{text}"], "max_tokens": 1}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "{text}"}]}),
        ("/v1/embeddings", {"input": "{text}"}),
    ],
)
async def test_only_small_text_is_tokenized_on_the_loop(client, encode_threads, path, body):
    loop_thread = threading.get_ident()
    for size, on_loop in ((10, True), (request_io.OFFLOAD_CHARS + 1, False)):
        encode_threads.clear()
        text = "x" * size
        sent = {k: _fill(v, text) for k, v in body.items()}
        r = await client.post(path, json=sent)
        assert r.status in (200, 400), await r.text()  # 400: too long for the fake model
        assert encode_threads, "nothing was tokenized"
        assert all((t == loop_thread) == on_loop for t in encode_threads), (size, path)


async def test_only_short_id_lists_are_decoded_on_the_loop(client, engine):
    threads: list[int] = []
    decode = engine.tokenizer.decode

    def recording(*args, **kwargs):
        threads.append(threading.get_ident())
        return decode(*args, **kwargs)

    engine.tokenizer.decode = recording
    for num_tokens, on_loop in ((10, True), (request_io.OFFLOAD_CHARS, False)):
        threads.clear()
        r = await client.post("/detokenize", json={"tokens": [72] * num_tokens})
        assert (await r.json())["prompt"] == "i" * num_tokens
        assert threads and all((t == threading.get_ident()) == on_loop for t in threads)


def _fill(value, text):
    if value == "{text}":
        return text
    if isinstance(value, list):
        return [_fill(v, text) for v in value]
    if isinstance(value, dict):
        return {k: _fill(v, text) for k, v in value.items()}
    return value


def _poll_livez(url: str, stop: threading.Event, latencies: list[float]) -> None:
    """From another thread (the test client shares the server's loop, so it cannot see the
    loop stall): GET /livez back to back, recording how long each took."""
    while not stop.is_set():
        start = time.perf_counter()
        with urllib.request.urlopen(url, timeout=30) as r:
            assert r.status == 200
        latencies.append(time.perf_counter() - start)
        time.sleep(0.01)


async def test_livez_answers_while_big_chats_render(client):
    body = {"messages": [{"role": "user", "content": BIG}]}
    stop, latencies = threading.Event(), []
    poller = threading.Thread(
        target=_poll_livez, args=(str(client.make_url("/livez")), stop, latencies)
    )
    poller.start()
    try:
        replies = await asyncio.gather(
            *(client.post("/v1/chat/completions", json=body) for _ in range(4))
        )
    finally:
        stop.set()
        await asyncio.to_thread(poller.join)
    assert all(r.status == 400 for r in replies)  # far over the fake model's max_model_len
    assert len(latencies) >= 3
    # rendering all four on the loop held it for seconds; off it, /livez waits for no render
    assert max(latencies) < 0.5, latencies
