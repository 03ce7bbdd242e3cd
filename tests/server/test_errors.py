"""Malformed requests: each gets a 4xx OpenAI error naming the field, and the server lives on."""

from __future__ import annotations

import pytest

from server.app import make_app

MSG = [{"role": "user", "content": "hi"}]
C, CHAT, EMB = "/v1/completions", "/v1/chat/completions", "/v1/embeddings"

# (path, body (dict or raw bytes), status, the field that must be named)
CASES = [
    (C, b"{not json", 400, None),
    (C, b"[1, 2]", 400, None),
    (C, b'{"prompt": "x", "temperature": NaN}', 400, None),
    (C, {}, 400, "prompt"),
    (C, {"prompt": 5}, 400, "prompt"),
    (C, {"prompt": ""}, 400, "prompt"),
    (C, {"prompt": []}, 400, "prompt"),
    (C, {"prompt": [1, "a"]}, 400, "prompt"),
    (C, {"prompt": [[1, 2], [-1]]}, 400, "prompt[1]"),
    (C, {"prompt": "x", "max_tokens": "10"}, 400, "max_tokens"),
    (C, {"prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    (C, {"prompt": "x", "max_tokens": 10**9}, 400, "max_tokens"),
    (C, {"prompt": "x", "max_tokens": 1.5}, 400, "max_tokens"),
    (C, {"prompt": "x", "n": 0}, 400, "n"),
    (C, {"prompt": "x", "n": 10000}, 400, "n"),
    (C, {"prompt": "x", "n": True}, 400, "n"),
    (C, {"prompt": "x", "temperature": -1}, 400, "temperature"),
    (C, {"prompt": "x", "temperature": "hot"}, 400, "temperature"),
    (C, {"prompt": "x", "top_p": 0}, 400, "top_p"),
    (C, {"prompt": "x", "top_p": 1.5}, 400, "top_p"),
    (C, {"prompt": "x", "top_k": -5}, 400, "top_k"),
    (C, {"prompt": "x", "min_p": 2}, 400, "min_p"),
    (C, {"prompt": "x", "presence_penalty": 3}, 400, "presence_penalty"),
    (C, {"prompt": "x", "frequency_penalty": -3}, 400, "frequency_penalty"),
    (C, {"prompt": "x", "repetition_penalty": 0}, 400, "repetition_penalty"),
    (C, {"prompt": "x", "seed": -1}, 400, "seed"),
    (C, {"prompt": "x", "stop": 5}, 400, "stop"),
    (C, {"prompt": "x", "stop": [""]}, 400, "stop"),
    (C, {"prompt": "x", "stop": ["a"] * 100}, 400, "stop"),
    (C, {"prompt": "x", "stop": ["a" * 10000]}, 400, "stop"),
    (C, {"prompt": "x", "stop_token_ids": ["a"]}, 400, "stop_token_ids"),
    (C, {"prompt": "x", "logprobs": 21}, 400, "logprobs"),
    (C, {"prompt": "x", "logprobs": -1}, 400, "logprobs"),
    (C, {"prompt": "x", "echo": "yes"}, 400, "echo"),
    (C, {"prompt": "x", "min_tokens": 20, "max_tokens": 5}, 400, "min_tokens"),
    (C, {"prompt": "x", "best_of": 2}, 400, "best_of"),
    (C, {"prompt": "x", "logit_bias": {"x": 1}}, 400, "logit_bias"),
    (C, {"prompt": "x", "stream": "true"}, 400, "stream"),
    (C, {"prompt": "x", "stream_options": {"include_usage": True}}, 400, "stream_options"),
    (C, {"prompt": "x", "stream": True, "stream_options": {"x": 1}}, 400, "stream_options.x"),
    (C, {"prompt": "x", "model": "gpt-4"}, 404, "model"),
    (C, {"prompt": "x", "model": 3}, 400, "model"),
    (C, {"prompt": "x" * 300}, 400, "prompt"),
    (C, {"prompt": [500, 501]}, 400, "prompt"),
    (C, {"prompt": ["x"] * 100}, 400, "prompt"),
    (C, {"prompt": "x", "priority": "high"}, 400, "priority"),
    (C, {"prompt": "x", "cache_salt": ""}, 400, "cache_salt"),
    (CHAT, {}, 400, "messages"),
    (CHAT, {"messages": []}, 400, "messages"),
    (CHAT, {"messages": "hi"}, 400, "messages"),
    (CHAT, {"messages": ["hi"]}, 400, "messages[0]"),
    (CHAT, {"messages": [{"content": "hi"}]}, 400, "messages[0].role"),
    (CHAT, {"messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content"),
    (CHAT, {"messages": [{"role": "user"}]}, 400, "messages[0].content"),
    (
        CHAT,
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
        400,
        "messages[0].content[0]",
    ),
    (
        CHAT,
        {"messages": [{"role": "user", "content": "x", "tool_calls": []}]},
        400,
        "messages[0].tool_calls",
    ),
    (CHAT, {"messages": MSG, "top_logprobs": 3}, 400, "top_logprobs"),
    (CHAT, {"messages": MSG, "logprobs": True, "top_logprobs": 50}, 400, "top_logprobs"),
    (CHAT, {"messages": MSG, "logprobs": 5}, 400, "logprobs"),
    (CHAT, {"messages": MSG, "max_completion_tokens": 0}, 400, "max_completion_tokens"),
    (
        CHAT,
        {"messages": MSG, "tools": [{"type": "function", "function": {"name": "a b"}}]},
        400,
        "tools[0].function.name",
    ),
    (CHAT, {"messages": [{"role": "user", "content": "x" * 300}]}, 400, "messages"),
    (EMB, {}, 400, "input"),
    (EMB, {"input": {"a": 1}}, 400, "input"),
    (EMB, {"input": "x", "encoding_format": "int8"}, 400, "encoding_format"),
    (EMB, {"input": "x", "dimensions": 8}, 400, "dimensions"),
    ("/tokenize", {}, 400, "prompt"),
    ("/tokenize", {"prompt": 5}, 400, "prompt"),
    ("/detokenize", {"tokens": "abc"}, 400, "tokens"),
    ("/detokenize", {"tokens": [99999]}, 400, "tokens[0]"),
]


@pytest.mark.parametrize(("path", "body", "status", "field"), CASES)
async def test_malformed_request(client, path, body, status, field):
    if isinstance(body, bytes):
        r = await client.post(path, data=body, headers={"Content-Type": "application/json"})
    else:
        r = await client.post(path, json=body)
    assert r.status == status, await r.text()
    err = (await r.json())["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["message"]
    if field is not None:
        assert err["param"] == field or field in err["message"], err
    # and the server still serves a normal request
    ok = await client.post(C, json={"prompt": "ok", "max_tokens": 2})
    assert ok.status == 200


def test_enough_cases():
    assert len(CASES) >= 30


async def test_oversize_body_is_413(aiohttp_client, engine):
    client = await aiohttp_client(make_app(engine, max_body_bytes=1024))
    r = await client.post(C, json={"prompt": "x" * 5000})
    assert r.status == 413
    assert (await r.json())["error"]["code"] == "body_too_large"
    assert (await client.post(C, json={"prompt": "ok"})).status == 200


async def test_unknown_route_and_method(client):
    r = await client.get("/v1/nothing")
    assert r.status == 404 and "error" in await r.json()
    r = await client.get(C)
    assert r.status == 405 and "error" in await r.json()


async def test_engine_value_error_is_400(client, engine):
    engine.max_model_len = 10**6  # the server's own length check passes; the engine's fails
    r = await client.post(C, json={"prompt": [256, 1000]})
    assert r.status == 400
    assert (await r.json())["error"]["param"] == "prompt"


async def test_auth(aiohttp_client, engine):
    client = await aiohttp_client(make_app(engine, api_key="s3cret"))
    assert (await client.post(C, json={"prompt": "x"})).status == 401
    r = await client.get("/v1/models", headers={"Authorization": "Bearer wrong"})
    assert r.status == 401 and (await r.json())["error"]["code"] == "invalid_api_key"
    assert (await client.post("/tokenize", json={"prompt": "x"})).status == 401
    ok = await client.post(C, json={"prompt": "x"}, headers={"Authorization": "Bearer s3cret"})
    assert ok.status == 200
    for path in ("/livez", "/readyz", "/health", "/metrics", "/version", "/openapi.json"):
        assert (await client.get(path)).status == 200, path


async def test_overload_is_429_with_retry_after(client, engine):
    engine.overloaded = True
    for stream in (False, True):
        r = await client.post(C, json={"prompt": "x", "stream": stream})
        assert r.status == 429
        assert int(r.headers["Retry-After"]) >= 1
        assert (await r.json())["error"]["type"] == "rate_limit_error"
    r = await client.post(EMB, json={"input": "x"})
    assert r.status == 429 and "Retry-After" in r.headers
    engine.overloaded = False
    assert (await client.post(C, json={"prompt": "x"})).status == 200


async def test_dead_engine_is_503(client, engine):
    engine.dead = "core process exited with code -9"
    for path, body in ((C, {"prompt": "x"}), (CHAT, {"messages": MSG}), (EMB, {"input": "x"})):
        r = await client.post(path, json=body)
        assert r.status == 503
        assert "-9" in (await r.json())["error"]["message"]


async def test_bug_is_openai_shaped_500(client, engine, caplog):
    async def broken(_ids):
        raise KeyError("oops")

    engine.embed = broken
    r = await client.post(EMB, json={"input": "x"})
    assert r.status == 500
    assert (await r.json())["error"]["type"] == "internal_server_error"
    assert "oops" in caplog.text
