"""The real server process on loopback with the default model, driven by the openai client
and raw aiohttp: the API surface, usage accounting, disconnects, load, and lifecycle."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import time

import aiohttp
import openai
import pytest

from tests.e2e.server_proc import MODEL, Server


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = Server(tmp_path_factory.mktemp("serve"), "--max-num-seqs", "32")
    yield srv
    srv.stop()


def wait_for(predicate, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return False


def test_completions_chat_models_embeddings(server):
    client = server.client()
    assert [m.id for m in client.models.list().data] == [MODEL]
    out = client.completions.create(
        model=MODEL, prompt="The capital of France is", max_tokens=16, temperature=0
    )
    assert "Paris" in out.choices[0].text
    ntok = server.post("/tokenize", {"prompt": "The capital of France is"})["count"]
    assert out.usage.prompt_tokens == ntok
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens
    chat = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "What is 2+2?"}],
        max_tokens=16,
        temperature=0,
    )
    assert chat.choices[0].message.role == "assistant" and chat.choices[0].message.content
    assert chat.choices[0].finish_reason in ("stop", "length")
    emb = client.embeddings.create(model=MODEL, input=["hello", "world"])
    vecs = [d.embedding for d in emb.data]
    assert len(vecs) == 2 and len(vecs[0]) == 576 and vecs[0] != vecs[1]
    assert abs(sum(x * x for x in vecs[0]) - 1.0) < 1e-4


def test_streaming_equals_non_streaming_with_usage(server):
    client = server.client()
    kw = dict(model=MODEL, prompt="Once upon a time", max_tokens=24, temperature=0)
    whole = client.completions.create(**kw)
    chunks = list(
        client.completions.create(**kw, stream=True, stream_options={"include_usage": True})
    )
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == whole.choices[0].text
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_n_seed_logprobs(server):
    client = server.client()
    kw = dict(
        model=MODEL,
        prompt="My favourite food is",
        max_tokens=12,
        temperature=1.0,
        seed=42,
        n=2,
        logprobs=2,
    )
    a = client.completions.create(**kw)
    b = client.completions.create(**kw)
    assert len(a.choices) == 2 and a.choices[0].text != a.choices[1].text
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    lp = a.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs)
    assert all(len(top) >= 2 for top in lp.top_logprobs)
    chat = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Hi"}],
        max_tokens=5,
        logprobs=True,
        top_logprobs=3,
    )
    assert all(len(t.top_logprobs) == 3 for t in chat.choices[0].logprobs.content)


def test_cached_tokens_on_repeated_prompt(server):
    client = server.client()
    prompt = "Tell me a long story about a dragon. " * 8
    client.completions.create(model=MODEL, prompt=prompt, max_tokens=2)
    again = client.completions.create(model=MODEL, prompt=prompt, max_tokens=2)
    assert again.usage.prompt_tokens_details.cached_tokens > 0


def test_sse_framing(server):
    async def go():
        body = {"model": MODEL, "prompt": "Hi", "max_tokens": 3, "stream": True}
        async with aiohttp.ClientSession() as s:
            async with s.post(f"{server.url}/v1/completions", json=body) as r:
                assert r.headers["Content-Type"].startswith("text/event-stream")
                raw = await r.read()
        events = raw.split(b"\n\n")
        assert events[-1] == b"" and events[-2] == b"data: [DONE]"
        assert all(e.startswith(b"data: {") for e in events[:-2])

    asyncio.run(go())


def test_disconnects_free_kv_blocks(server):
    async def one(session):
        body = {
            "model": MODEL,
            "prompt": "Count to one hundred:",
            "max_tokens": 200,
            "stream": True,
            "ignore_eos": True,
        }
        async with session.post(f"{server.url}/v1/completions", json=body) as r:
            async for _ in r.content:  # first event, then hang up mid-stream
                break

    async def go():
        async with aiohttp.ClientSession() as s:
            await asyncio.gather(*(one(s) for _ in range(50)))

    asyncio.run(go())
    assert wait_for(lambda: server.metric("jaxserve_kv_cache_usage_perc") == 0.0, 15)
    assert wait_for(lambda: server.metric("jaxserve_num_requests_running") == 0.0, 5)


def test_200_requests_at_concurrency_32(server):
    prompts = ["The sun is", "Cats are", "Python is a", "The ocean"]
    client = server.client()
    ref = {
        p: client.completions.create(model=MODEL, prompt=p, max_tokens=8, temperature=0)
        .choices[0]
        .text
        for p in prompts
    }

    async def go():
        sem = asyncio.Semaphore(32)
        aclient = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="none")

        async def one(i):
            async with sem:
                p = prompts[i % 4]
                r = await aclient.completions.create(
                    model=MODEL, prompt=p, max_tokens=8, temperature=0
                )
                return p, r.choices[0].text

        return await asyncio.gather(*(one(i) for i in range(200)))

    results = asyncio.run(go())
    assert len(results) == 200
    assert all(text == ref[p] for p, text in results)
    assert wait_for(lambda: server.metric("jaxserve_kv_cache_usage_perc") == 0.0, 10)


def test_malformed_requests_then_still_serving(server):
    from tests.server.test_errors import CASES  # the same cases the app's unit tests use

    # Over-length text depends on the tokenizer; for the real one, give the ids directly.
    # Token ids valid for the fake's small vocabulary may be valid here too: keep only the
    # cases that do not depend on the vocabulary, and add real-vocabulary ones.
    def vocab_dependent(body) -> bool:
        if not isinstance(body, dict):
            return False
        ids = json.dumps([body.get(k) for k in ("prompt", "tokens", "input")])
        return len(json.dumps(body)) > 200 or any(int(n) > 255 for n in re.findall(r"\d+", ids))

    cases = [c for c in CASES if not vocab_dependent(c[1])]
    cases.append(("/v1/completions", {"prompt": [1, 49152]}, 400, "prompt"))
    cases.append(("/detokenize", {"tokens": [49152]}, 400, "tokens[0]"))
    cases.append(("/v1/completions", {"prompt": [100] * 600}, 400, "prompt"))
    cases.append(
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "hi " * 600}]},
            400,
            "messages",
        )
    )

    async def go():
        async with aiohttp.ClientSession() as s:
            for path, body, status, field in cases:
                kw = {"json": body} if isinstance(body, dict) else {"data": body}
                if not isinstance(body, dict):
                    kw["headers"] = {"Content-Type": "application/json"}
                async with s.post(f"{server.url}{path}", **kw) as r:
                    reply = await r.json()
                    assert r.status == status, (path, body, reply)
                    err = reply["error"]
                    if field is not None:
                        assert err["param"] == field or field in err["message"], err

    asyncio.run(go())
    out = server.client().completions.create(model=MODEL, prompt="Hi", max_tokens=2)
    assert out.usage.completion_tokens == 2
    with pytest.raises(openai.NotFoundError):
        server.client().completions.create(model="nope", prompt="Hi", max_tokens=2)


def test_sigterm_drains_then_exits_zero(tmp_path):
    srv = Server(tmp_path, "--no-warmup", "--shutdown-timeout", "60")

    async def go():
        aclient = openai.AsyncOpenAI(base_url=f"{srv.url}/v1", api_key="none", max_retries=0)
        task = asyncio.ensure_future(
            aclient.completions.create(
                model=MODEL,
                prompt="Tell me a story",
                max_tokens=40,
                extra_body={"ignore_eos": True},
            )
        )
        await asyncio.sleep(2)
        srv.proc.send_signal(signal.SIGTERM)
        await asyncio.sleep(0.5)
        async with aiohttp.ClientSession() as s:
            async with s.get(f"{srv.url}/readyz") as r:
                assert r.status == 503
        return await task

    out = asyncio.run(go())
    assert out.choices[0].finish_reason == "length" and out.usage.completion_tokens == 40
    assert srv.proc.wait(60) == 0


def test_api_key_and_overload(tmp_path):
    srv = Server(
        tmp_path,
        "--no-warmup",
        "--api-key",
        "sekret",
        "--max-num-seqs",
        "2",
        "--max-waiting-requests",
        "2",
    )
    try:
        with pytest.raises(openai.AuthenticationError):
            srv.client(api_key="wrong", max_retries=0).completions.create(
                model=MODEL, prompt="Hi", max_tokens=1
            )

        async def go():
            body = {"model": MODEL, "prompt": "Hello there", "max_tokens": 30}
            headers = {"Authorization": "Bearer sekret"}
            async with aiohttp.ClientSession(headers=headers) as s:

                async def one():
                    async with s.post(f"{srv.url}/v1/completions", json=body) as r:
                        return r.status, r.headers.get("Retry-After")

                return await asyncio.gather(*(one() for _ in range(12)))

        results = asyncio.run(go())
        codes = [c for c, _ in results]
        assert 200 in codes and 429 in codes
        assert all(ra is not None for c, ra in results if c == 429)
    finally:
        srv.stop()
