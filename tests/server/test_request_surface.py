"""Issue 12's request fields against the fake engine: each one reaches SamplingParams as the
engine takes it (or changes the response as documented), and each bad value is a 400 naming
the field as sent, after which the server serves the next request."""

from __future__ import annotations

import json

import pytest

from jaxserve.structured_output.params import StructuredOutputsParams
from tests.server.fake_engine import SCRIPT

C = "/v1/completions"
CHAT = "/v1/chat/completions"
MSG = [{"role": "user", "content": "hi"}]
SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}


def _body(path: str, **fields) -> dict:
    base = {"prompt": "hi"} if path == C else {"messages": MSG}
    return {**base, "max_tokens": 3, **fields}


def _sent(engine):
    """The SamplingParams of the last request the engine got."""
    return engine.requests[-1][2]


@pytest.mark.parametrize("path", [C, CHAT])
@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"response_format": {"type": "json_object"}}, StructuredOutputsParams(json_object=True)),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "n"}}},
            StructuredOutputsParams(json_object=True),
        ),
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "n", "schema": SCHEMA, "strict": True},
                }
            },
            StructuredOutputsParams(json=SCHEMA),
        ),
        ({"response_format": {"type": "text"}}, None),
        ({"guided_json": SCHEMA}, StructuredOutputsParams(json=SCHEMA)),
        ({"guided_json": json.dumps(SCHEMA)}, StructuredOutputsParams(json=SCHEMA)),
        (
            {"guided_json": SCHEMA, "guided_whitespace_pattern": "[ ]{0,2}"},
            StructuredOutputsParams(json=SCHEMA, whitespace_pattern="[ ]{0,2}"),
        ),
        ({"guided_regex": "[ab]{3}"}, StructuredOutputsParams(regex="[ab]{3}")),
        ({"guided_choice": ["yes", "no"]}, StructuredOutputsParams(choice=("yes", "no"))),
        ({"guided_grammar": 'start: "x"+'}, StructuredOutputsParams(grammar='start: "x"+')),
        (
            {"structured_outputs": {"json_object": True, "disable_any_whitespace": True}},
            StructuredOutputsParams(json_object=True, disable_any_whitespace=True),
        ),
        (
            {"structured_outputs": {"choice": ["zebra-42"]}},
            StructuredOutputsParams(choice=("zebra-42",)),
        ),
    ],
)
async def test_constraint_reaches_the_engine(client, engine, path, fields, expected):
    r = await client.post(path, json=_body(path, **fields))
    assert r.status == 200, await r.text()
    assert _sent(engine).structured_outputs == expected


async def test_choice_output_and_sampling_fields(client, engine):
    r = await client.post(C, json=_body(C, guided_choice=["zebra-42"], max_tokens=20))
    assert (await r.json())["choices"][0]["text"] == "zebra-42"
    r = await client.post(
        CHAT,
        json=_body(
            CHAT,
            logit_bias={"7": -100, "3": 2.5},
            allowed_token_ids=[1, 2, 3, 7],
            bad_words=["fox", "lazy dog"],
            max_completion_tokens=2,
            max_tokens=9,
        ),
    )
    assert r.status == 200
    p = _sent(engine)
    assert p.logit_bias == ((3, 2.5), (7, -100.0))
    assert p.allowed_token_ids == (1, 2, 3, 7)
    assert p.bad_words == ("fox", "lazy dog")
    assert p.max_tokens == 2  # max_completion_tokens wins
    # completions take max_completion_tokens too
    r = await client.post(C, json={"prompt": "hi", "max_completion_tokens": 5})
    assert _sent(engine).max_tokens == 5
    assert len((await r.json())["choices"][0]["text"]) == 5


async def test_echo_with_logprobs(client, engine):
    r = await client.post(C, json={"prompt": "Say", "echo": True, "logprobs": 2, "max_tokens": 3})
    assert r.status == 200, await r.text()
    assert _sent(engine).prompt_logprobs == 2
    choice = (await r.json())["choices"][0]
    assert choice["text"] == "Say" + SCRIPT[:3]
    lp = choice["logprobs"]
    assert lp["tokens"] == list("Say" + SCRIPT[:3])
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert lp["token_logprobs"][1:3] == [-0.5, -0.5]
    # the prompt token itself and its top-2 (the fake computed exactly those)
    assert lp["top_logprobs"][1] == {"a": -0.5, "b": -1.0}
    assert lp["text_offset"] == [0, 1, 2, 3, 4, 5]
    assert "prompt_logprobs" not in choice
    # streamed: the prompt's tokens and logprobs come in the first chunk
    r = await client.post(
        C, json={"prompt": "Say", "echo": True, "logprobs": 1, "max_tokens": 2, "stream": True}
    )
    events = [json.loads(line[6:]) for line in (await r.text()).split("\n") if line[6:7] == "{"]
    first = events[0]["choices"][0]
    assert first["text"] == "Say" + SCRIPT[0]
    assert first["logprobs"]["tokens"] == list("Say" + SCRIPT[0])
    assert first["logprobs"]["top_logprobs"][1] == {"a": -0.5}


async def test_prompt_logprobs_vllm_shape(client, engine):
    r = await client.post(C, json={"prompt": "ab", "prompt_logprobs": 2, "max_tokens": 1})
    choice = (await r.json())["choices"][0]
    assert choice["prompt_logprobs"][0] is None
    entry = choice["prompt_logprobs"][1]
    assert sorted(v["rank"] for v in entry.values()) == [1, 2]
    own = [v for v in entry.values() if v["decoded_token"] == "b"]
    assert own == [{"logprob": -0.5, "rank": 1, "decoded_token": "b"}]
    assert choice["logprobs"] is None  # prompt_logprobs alone adds no sample logprobs
    r = await client.post(CHAT, json={"messages": MSG, "prompt_logprobs": 0, "max_tokens": 1})
    body = await r.json()
    assert len(body["prompt_logprobs"]) == body["usage"]["prompt_tokens"]
    assert body["prompt_logprobs"][0] is None
    assert all(len(e) == 1 for e in body["prompt_logprobs"][1:])


async def test_continuous_usage_and_user(client, engine, caplog):
    caplog.set_level("INFO", logger="server.generation")
    r = await client.post(
        CHAT,
        json=_body(
            CHAT,
            stream=True,
            user="alice",
            stream_options={"include_usage": True, "continuous_usage_stats": True},
        ),
    )
    events = [json.loads(line[6:]) for line in (await r.text()).split("\n") if line[6:7] == "{"]
    assert all("usage" in e for e in events)
    tokens = [e["usage"]["completion_tokens"] for e in events]
    assert tokens == sorted(tokens) and tokens[-1] == 3
    assert any("from user 'alice'" in rec.getMessage() for rec in caplog.records)


async def test_chat_template_kwargs_and_continue_final_message(client, engine):
    engine.tokenizer.chat_template = (
        "{% if greeting %}{{ greeting }}{% endif %}"
        "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}"
        "{% if not loop.last or not continue_final_message %}\n{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    r = await client.post(CHAT, json=_body(CHAT, chat_template_kwargs={"greeting": "HELLO"}))
    assert r.status == 200, await r.text()
    prompt = engine.tokenizer.decode(engine.requests[-1][1])
    assert prompt.startswith("HELLO<|user|>hi")
    msgs = [*MSG, {"role": "assistant", "content": "The answer is"}]
    r = await client.post(CHAT, json={"messages": msgs, "continue_final_message": True})
    assert r.status == 200, await r.text()
    prompt = engine.tokenizer.decode(engine.requests[-1][1])
    assert prompt.endswith("<|assistant|>The answer is")


BAD = [
    (C, {"logit_bias": {"257": 1}}, "logit_bias"),
    (C, {"logit_bias": {"x": 1}}, "logit_bias"),
    (C, {"logit_bias": {"1": -101}}, "logit_bias"),
    (C, {"logit_bias": {str(i): 1 for i in range(300)}}, "logit_bias"),
    (CHAT, {"allowed_token_ids": [999]}, "allowed_token_ids"),
    (CHAT, {"allowed_token_ids": []}, "allowed_token_ids"),
    (CHAT, {"bad_words": ["a"] * 200}, "bad_words"),
    (C, {"prompt_logprobs": 21}, "prompt_logprobs"),
    (C, {"prompt_logprobs": 1, "stream": True}, "prompt_logprobs"),
    (CHAT, {"response_format": {"type": "json"}}, "response_format.type"),
    (CHAT, {"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
    (
        CHAT,
        {"response_format": {"type": "json_schema", "json_schema": {"name": "a b"}}},
        "response_format.json_schema.name",
    ),
    (
        C,
        {
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "n", "schema": {"type": "object", "minProperties": "x"}},
            }
        },
        "response_format.json_schema.schema",
    ),
    (
        CHAT,
        {
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "n", "schema": {"type": 5}},
            }
        },
        "response_format.json_schema.schema",
    ),
    (C, {"guided_json": "{not json"}, "guided_json"),
    (C, {"guided_regex": "(unclosed"}, "guided_regex"),
    (C, {"guided_grammar": "start: missing_rule"}, "guided_grammar"),
    (C, {"guided_choice": []}, "guided_choice"),
    (C, {"structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs"),
    (C, {"structured_outputs": {"regex": "[z-a]"}}, "structured_outputs.regex"),
    (C, {"structured_outputs": {"json": {}, "backend": "x"}}, "structured_outputs.backend"),
    (C, {"guided_regex": "a", "guided_choice": ["b"]}, "guided_choice"),
    (
        CHAT,
        {"response_format": {"type": "json_object"}, "structured_outputs": {"regex": "a"}},
        "structured_outputs",
    ),
    (C, {"guided_whitespace_pattern": " "}, "guided_whitespace_pattern"),
    (C, {"guided_regex": "a", "guided_whitespace_pattern": " "}, "guided_whitespace_pattern"),
    (C, {"guided_json": {}, "guided_whitespace_pattern": "("}, "guided_whitespace_pattern"),
    (C, {"guided_decoding_backend": "xgrammar"}, "guided_decoding_backend"),
    (CHAT, {"chat_template_kwargs": {"messages": 1}}, "chat_template_kwargs.messages"),
    (CHAT, {"chat_template_kwargs": {"a-b": 1}}, "chat_template_kwargs"),
    (CHAT, {"chat_template_kwargs": {"a": [1]}}, "chat_template_kwargs"),
    (CHAT, {"continue_final_message": True}, "messages[0].role"),
    (
        CHAT,
        {
            "messages": [*MSG, {"role": "assistant", "content": "x"}],
            "continue_final_message": True,
            "add_generation_prompt": True,
        },
        "continue_final_message",
    ),
    (C, {"max_completion_tokens": 0}, "max_completion_tokens"),
    (C, {"max_completion_tokens": 10_000}, "max_completion_tokens"),
    (
        CHAT,
        {"stream": True, "stream_options": {"continuous_usage_stats": "yes"}},
        "stream_options.continuous_usage_stats",
    ),
    (CHAT, {"user": "u" * 300}, "user"),
]


@pytest.mark.parametrize(("path", "fields", "param"), BAD)
async def test_bad_value_names_the_field(client, engine, path, fields, param):
    r = await client.post(path, json=_body(path, **fields))
    body = await r.json()
    assert r.status == 400, body
    assert body["error"]["param"] == param, body
    assert not engine.requests  # refused before the engine saw it
    r = await client.post(path, json=_body(path))
    assert r.status == 200


async def test_engine_refusal_names_the_field_as_sent(client, engine):
    """The engine checks what needs the tokenizer (a choice the vocab cannot spell) and names
    StructuredOutputsParams' field; the 400 names the field the client sent."""
    engine.refusal = ValueError("structured_outputs.choice[1] holds characters the vocab lacks")
    r = await client.post(C, json=_body(C, guided_choice=["a", "b"]))
    body = await r.json()
    assert r.status == 400 and body["error"]["param"] == "guided_choice[1]", body
    assert body["error"]["message"].startswith("guided_choice[1] holds")
    r = await client.post(CHAT, json=_body(CHAT, structured_outputs={"choice": ["a", "b"]}))
    assert (await r.json())["error"]["param"] == "structured_outputs.choice[1]"
    engine.refusal = ValueError("structured_outputs.json cannot be compiled: too deep")
    schema = {"type": "json_schema", "json_schema": {"name": "n", "schema": SCHEMA}}
    r = await client.post(CHAT, json=_body(CHAT, response_format=schema))
    assert (await r.json())["error"]["param"] == "response_format.json_schema.schema"
    engine.refusal = None
    assert (await client.post(C, json=_body(C))).status == 200
