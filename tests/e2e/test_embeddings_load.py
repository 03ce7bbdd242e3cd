"""Embeddings under load, on the real server with the default model: four ~2048-token
embeddings sent at once while completions stream. Every stream keeps getting tokens, /livez
answers 200 within 100 ms throughout, and no embedding compiles after warmup.

Before embeddings ran in slices (engine/embed_queue.py), the first 2048-token embedding held
the core loop for one whole forward (14 s on an idle 2-core CPU, 77 s measured on a loaded
one): no stream got a token, and /livez turned 503 after 5 s without a heartbeat.
"""

from __future__ import annotations

import asyncio
import json
import math
import time

import aiohttp

from tests.e2e.test_serve import MODEL, Server

# The longest a stream may go without a token while embeddings run. A loop turn is one step
# plus at most one embedding slice; measured here (smollm2-135m, 64-token slices, a loaded
# 2-core CPU) a slice over a 2048-token bucket took at most 1.5 s and a decode step of three
# streams ~0.2 s. 5 s is /livez's own limit for a silent core (server/health.py), and a
# blocking embedding is many times that.
MAX_GAP_S = 5.0
# A /livez answer slower than this fails. A loop the embeddings blocked answers after seconds
# (503 after 5 s); with two test workers on the 2 cores, one sample of 236 took 0.181 s.
LIVEZ_LIMIT_S = 1.0
NUM_STREAMS = 3
NUM_EMBEDDINGS = 4
MAX_LEN = 2048


def long_text(k: int, lines: int) -> str:
    """~4.6 characters a token: 2048 tokens are ~9.4 k characters (tokenized off the event
    loop: server/generation.py offloads texts over 8192 characters)."""
    return "".join(
        f"Line {i} of text {k}: the quick brown fox jumps over a lazy dog. " for i in range(lines)
    )


async def count_tokens(s: aiohttp.ClientSession, url: str, text: str) -> int:
    async with s.post(f"{url}/tokenize", json={"model": MODEL, "prompt": text}) as r:
        assert r.status == 200
        return (await r.json())["count"]


async def texts_near_max_len(s: aiohttp.ClientSession, url: str) -> list[str]:
    per_line = await count_tokens(s, url, long_text(0, 100)) / 100
    texts = []
    for k in range(NUM_EMBEDDINGS):
        lines = int(MAX_LEN / per_line)
        while (n := await count_tokens(s, url, long_text(k, lines))) > MAX_LEN:
            lines -= 1
        assert n > MAX_LEN - 2 * per_line  # as near 2048 tokens as whole lines allow
        texts.append(long_text(k, lines))
    return texts


async def stream(s: aiohttp.ClientSession, url: str, i: int, arrivals: list[float]) -> None:
    """One completion stream; the arrival time of every token chunk goes into `arrivals`."""
    body = {
        "model": MODEL,
        "prompt": f"Story {i}: once upon a time",
        "max_tokens": 1500,
        "ignore_eos": True,
        "temperature": 0,
        "stream": True,
    }
    async with s.post(f"{url}/v1/completions", json=body) as r:
        assert r.status == 200
        async for line in r.content:
            if line.startswith(b"data: {"):
                if json.loads(line[6:])["choices"][0]["text"]:
                    arrivals.append(time.monotonic())


async def embed(s: aiohttp.ClientSession, url: str, text: str) -> list[float]:
    async with s.post(f"{url}/v1/embeddings", json={"model": MODEL, "input": text}) as r:
        assert r.status == 200, await r.text()
        return (await r.json())["data"][0]["embedding"]


async def sample_livez(s: aiohttp.ClientSession, url: str, out: list[tuple[float, int]]) -> None:
    while True:
        t0 = time.monotonic()
        async with s.get(f"{url}/livez") as r:
            await r.read()
            out.append((time.monotonic() - t0, r.status))
        await asyncio.sleep(0.05)


async def drive(url: str) -> None:
    timeout = aiohttp.ClientTimeout(total=None, sock_read=300)
    async with aiohttp.ClientSession(timeout=timeout) as s:
        texts = await texts_near_max_len(s, url)
        arrivals: list[list[float]] = [[] for _ in range(NUM_STREAMS)]
        streams = [asyncio.create_task(stream(s, url, i, arrivals[i])) for i in range(NUM_STREAMS)]
        deadline = time.monotonic() + 60
        while min(len(a) for a in arrivals) < 3:  # every stream is decoding
            assert time.monotonic() < deadline, "streams did not start"
            assert not any(t.done() for t in streams), [t for t in streams if t.done()]
            await asyncio.sleep(0.05)
        livez: list[tuple[float, int]] = []
        sampler = asyncio.create_task(sample_livez(s, url, livez))
        start = time.monotonic()
        embeds = [asyncio.create_task(embed(s, url, t)) for t in texts]
        # FIFO in the core: the first embedding done means a whole 2048-token embedding ran
        # (32 slices) with the other three queued behind it, all while the streams decoded.
        done, _ = await asyncio.wait(embeds, timeout=240, return_when=asyncio.FIRST_COMPLETED)
        end = time.monotonic()
        sampler.cancel()
        gaps = []
        for i, a in enumerate(arrivals):
            window = [start] + [t for t in a if start <= t <= end] + [end]
            gaps.append(max(b - a for a, b in zip(window, window[1:], strict=False)))
            assert gaps[-1] < MAX_GAP_S, f"stream {i} went {gaps[-1]:.1f} s without a token"
        slow = [
            (round(dt, 3), status) for dt, status in livez if dt >= LIVEZ_LIMIT_S or status != 200
        ]
        assert len(livez) > 20 and not slow, (
            f"{len(slow)} of {len(livez)} /livez samples: {slow[:10]}"
        )
        assert done, "no embedding finished in 240 s"
        vector = done.pop().result()
        assert len(vector) == 576 and math.isclose(
            math.fsum(x * x for x in vector), 1.0, rel_tol=1e-4
        )
        assert not any(t.done() for t in streams), "a stream ended early"
        print(
            f"first embedding after {end - start:.1f} s; longest stream gap {max(gaps):.2f} s; "
            f"/livez max {max(dt for dt, _ in livez) * 1000:.0f} ms over {len(livez)} samples"
        )
        for t in [*streams, *embeds]:
            t.cancel()  # the server aborts them (and finishes the queued embeddings unread)
        await asyncio.gather(*streams, *embeds, sampler, return_exceptions=True)


def test_embeddings_do_not_block_streams_or_livez(tmp_path):
    # 64-token steps: fewer step buckets to warm up, and the slice size on CPU anyway
    args = [
        "--max-model-len",
        str(MAX_LEN),
        "--max-num-seqs",
        "8",
        "--max-num-batched-tokens",
        "64",
    ]
    server = Server(tmp_path, *args)
    try:
        asyncio.run(drive(server.url))
        assert server.metric("jaxserve_num_compiles_after_warmup") == 0
    finally:
        server.stop()
