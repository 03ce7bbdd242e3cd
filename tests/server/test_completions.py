"""/v1/completions and /v1/chat/completions against the FakeEngine: shapes, usage, streams."""

from __future__ import annotations

import json

from tests.server.fake_engine import SCRIPT


def parse_sse(raw: bytes) -> list:
    assert raw.endswith(b"data: [DONE]\n\n")
    frames = raw.decode().split("\n\n")
    assert frames[-1] == ""
    events = []
    for frame in frames[:-1]:
        assert frame.startswith("data: ") and "\n" not in frame
        payload = frame[len("data: ") :]
        events.append(payload if payload == "[DONE]" else json.loads(payload))
    assert events[-1] == "[DONE]"
    return events[:-1]


async def test_completion_non_streaming(client):
    r = await client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 5})
    assert r.status == 200
    body = await r.json()
    assert body["id"].startswith("cmpl-") and body["object"] == "text_completion"
    assert body["model"] == "fake-model" and isinstance(body["created"], int)
    (choice,) = body["choices"]
    assert choice == {
        "index": 0,
        "text": SCRIPT[:5],
        "logprobs": None,
        "finish_reason": "length",
        "stop_reason": None,
    }
    assert body["usage"] == {
        "prompt_tokens": 2,
        "completion_tokens": 5,
        "total_tokens": 7,
        "prompt_tokens_details": {"cached_tokens": 0},
    }


async def test_cached_tokens_reported(client):
    prompt = "a prompt of some length"
    await client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 1})
    r = await client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 1})
    body = await r.json()
    assert body["usage"]["prompt_tokens_details"]["cached_tokens"] == (len(prompt) - 1) // 4 * 4


async def test_eos_finishes_with_stop(client):
    r = await client.post("/v1/completions", json={"prompt": "x", "max_tokens": 100})
    (choice,) = (await r.json())["choices"]
    assert choice["text"] == SCRIPT and choice["finish_reason"] == "stop"


async def test_stop_string_and_stop_token(client, engine):
    r = await client.post(
        "/v1/completions", json={"prompt": "x", "stop": ["fox"], "max_tokens": 40}
    )
    (choice,) = (await r.json())["choices"]
    assert choice["text"] == "The quick brown " and choice["stop_reason"] == "fox"
    stop_id = engine.tokenizer.encode("q", add_special_tokens=False)[0]
    r = await client.post("/v1/completions", json={"prompt": "x", "stop_token_ids": [stop_id]})
    (choice,) = (await r.json())["choices"]
    assert choice["finish_reason"] == "stop" and choice["stop_reason"] == stop_id


async def test_multiple_prompts_and_n(client, engine):
    r = await client.post(
        "/v1/completions",
        json={"prompt": ["ab", "cde"], "n": 2, "max_tokens": 3, "temperature": 0.5},
    )
    body = await r.json()
    assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
    assert body["choices"][1]["text"] == SCRIPT[1:4]  # completion index 1 of prompt 0
    assert body["choices"][2]["text"] == SCRIPT[:3]  # completion index 0 of prompt 1
    assert body["usage"]["prompt_tokens"] == 2 + 3
    assert body["usage"]["completion_tokens"] == 4 * 3
    assert body["usage"]["total_tokens"] == 5 + 12
    assert len(engine.requests) == 2 and engine.requests[0][2].n == 2


async def test_echo_and_logprobs(client):
    r = await client.post("/v1/completions", json={"prompt": "Say", "echo": True, "max_tokens": 2})
    assert (await r.json())["choices"][0]["text"] == "Say" + SCRIPT[:2]
    r = await client.post("/v1/completions", json={"prompt": "Say", "logprobs": 2, "max_tokens": 3})
    lp = (await r.json())["choices"][0]["logprobs"]
    assert lp["tokens"] == list(SCRIPT[:3])
    assert lp["text_offset"] == [0, 1, 2]
    assert len(lp["token_logprobs"]) == 3 and len(lp["top_logprobs"][0]) >= 2


async def test_completion_stream_exact_bytes(client):
    r = await client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2, "stream": True})
    assert r.status == 200
    assert r.headers["Content-Type"] == "text/event-stream"
    assert r.headers["Cache-Control"] == "no-cache"
    assert r.headers["X-Accel-Buffering"] == "no"
    raw = await r.read()
    events = parse_sse(raw)
    cid, created = events[0]["id"], events[0]["created"]

    def frame(text: str, finish: str | None) -> str:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
        if finish:
            choice["stop_reason"] = None
        env = {"id": cid, "object": "text_completion", "created": created, "model": "fake-model"}
        return "data: " + json.dumps({**env, "choices": [choice]}, separators=(",", ":")) + "\n\n"

    expected = frame("T", None) + frame("h", "length") + "data: [DONE]\n\n"
    assert raw.decode() == expected


async def test_stream_include_usage(client):
    r = await client.post(
        "/v1/completions",
        json={
            "prompt": ["ab", "cde"],
            "max_tokens": 4,
            "stream": True,
            "stream_options": {"include_usage": True},
        },
    )
    events = parse_sse(await r.read())
    usage_event = events[-1]
    assert usage_event["choices"] == []
    assert usage_event["usage"]["prompt_tokens"] == 5
    assert usage_event["usage"]["completion_tokens"] == 8
    assert usage_event["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}
    texts: dict[int, str] = {}
    for e in events[:-1]:
        for c in e["choices"]:
            texts[c["index"]] = texts.get(c["index"], "") + c["text"]
    assert texts == {0: SCRIPT[:4], 1: SCRIPT[:4]}


async def test_chat_non_streaming(client, engine):
    r = await client.post(
        "/v1/chat/completions",
        json={"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 4},
    )
    assert r.status == 200
    body = await r.json()
    assert body["id"].startswith("chatcmpl-") and body["object"] == "chat.completion"
    (choice,) = body["choices"]
    assert choice["message"] == {"role": "assistant", "content": SCRIPT[:4]}
    assert choice["finish_reason"] == "length"
    prompt_ids = engine.requests[0][1]
    assert engine.tokenizer.decode(prompt_ids) == "<|user|>hi\n<|assistant|>"
    assert body["usage"]["prompt_tokens"] == len(prompt_ids)


async def test_chat_text_parts_and_logprobs(client):
    r = await client.post(
        "/v1/chat/completions",
        json={
            "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
            "max_tokens": 2,
            "logprobs": True,
            "top_logprobs": 2,
        },
    )
    body = await r.json()
    content = body["choices"][0]["logprobs"]["content"]
    assert [c["token"] for c in content] == ["T", "h"]
    assert content[0]["bytes"] == [ord("T")] and len(content[0]["top_logprobs"]) == 2


async def test_chat_stream(client):
    r = await client.post(
        "/v1/chat/completions",
        json={
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 3,
            "n": 2,
            "stream": True,
            "stream_options": {"include_usage": True},
        },
    )
    events = parse_sse(await r.read())
    assert all(e["object"] == "chat.completion.chunk" for e in events)
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert events[1]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    text: dict[int, str] = {}
    finish = {}
    for e in events[2:-1]:
        (c,) = e["choices"]
        text[c["index"]] = text.get(c["index"], "") + c["delta"].get("content", "")
        if c["finish_reason"]:
            finish[c["index"]] = c["finish_reason"]
    assert text == {0: SCRIPT[:3], 1: SCRIPT[1:4]}
    assert finish == {0: "length", 1: "length"}
    assert events[-1]["usage"]["completion_tokens"] == 6


async def test_models_tokenize_detokenize_version(client):
    body = await (await client.get("/v1/models")).json()
    assert body["data"][0]["id"] == "fake-model" and body["data"][0]["max_model_len"] == 256
    r = await client.get("/v1/models/other")
    assert r.status == 404
    body = await (await client.post("/tokenize", json={"prompt": "abc"})).json()
    assert body["count"] == 3 and body["max_model_len"] == 256
    back = await (await client.post("/detokenize", json={"tokens": body["tokens"]})).json()
    assert back == {"prompt": "abc"}
    body = await (
        await client.post("/tokenize", json={"messages": [{"role": "user", "content": "x"}]})
    ).json()
    assert body["count"] == len("<|user|>x\n<|assistant|>")
    assert "version" in await (await client.get("/version")).json()


async def test_embeddings(client):
    r = await client.post("/v1/embeddings", json={"input": [[5, 6], [1, 2, 3]]})
    body = await r.json()
    assert body["object"] == "list" and [d["index"] for d in body["data"]] == [0, 1]
    v = body["data"][0]["embedding"]
    assert abs(sum(x * x for x in v) - 1.0) < 1e-6
    assert body["usage"] == {"prompt_tokens": 5, "total_tokens": 5}
    r = await client.post("/v1/embeddings", json={"input": "ab", "encoding_format": "base64"})
    assert isinstance((await r.json())["data"][0]["embedding"], str)


async def test_user_is_recorded_not_ignored(client, caplog):
    import logging

    caplog.set_level(logging.DEBUG, logger="server")
    r = await client.post("/v1/completions", json={"prompt": "x", "max_tokens": 1, "user": "u-42"})
    assert r.status == 200
    r = await client.post(
        "/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}], "user": "u-7"}
    )
    assert r.status == 200
    r = await client.post("/v1/embeddings", json={"input": "x", "user": "u-9"})
    assert r.status == 200
    assert all(f"'u-{n}'" in caplog.text for n in (42, 7, 9)), caplog.text
    r = await client.post("/v1/completions", json={"prompt": "x", "user": "u" * 257})
    assert r.status == 400 and (await r.json())["error"]["param"] == "user"
