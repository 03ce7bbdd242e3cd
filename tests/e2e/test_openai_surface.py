"""Issue 12 through the official openai client against one real server on the default model:
response_format (incl. the SDK's parse helper with a pydantic model), guided_choice, tools
(forced, streamed == whole), logit_bias, echo with logprobs, and 400s that leave the server
serving. Greedy throughout, short outputs (the whole module is one server start plus seconds).

These need the engine to enforce SamplingParams.structured_outputs / logit_bias /
prompt_logprobs (issue 12's engine side): the server only passes them on.
"""

from __future__ import annotations

import json

import jsonschema
import openai
import pydantic
import pytest

from tests.e2e.server_proc import MODEL, Server

MSG = [{"role": "user", "content": "What is the weather in Paris? Answer briefly."}]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = Server(tmp_path_factory.mktemp("surface"))
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return server.client(max_retries=0)


class Weather(pydantic.BaseModel):
    city: str = pydantic.Field(max_length=12)
    celsius: int = pydantic.Field(ge=-50, le=60)


def test_response_format_json_schema_and_parse(client):
    parse = getattr(client.chat.completions, "parse", None) or client.beta.chat.completions.parse
    out = parse(model=MODEL, messages=MSG, response_format=Weather, temperature=0, max_tokens=64)
    choice = out.choices[0]
    assert choice.finish_reason == "stop", choice
    assert isinstance(choice.message.parsed, Weather)
    # json_object on the completions endpoint
    c = client.completions.create(
        model=MODEL,
        prompt='The weather in Paris as JSON, with keys "city" and "celsius":',
        max_tokens=64,
        temperature=0,
        extra_body={"response_format": {"type": "json_object"}},
    )
    assert c.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(c.choices[0].text), dict)


def test_guided_choice_the_model_would_not_write(client):
    c = client.completions.create(
        model=MODEL,
        prompt="My favourite animal is",
        max_tokens=16,
        temperature=0,
        extra_body={"guided_choice": ["zebra-42"]},
    )
    assert c.choices[0].text == "zebra-42" and c.choices[0].finish_reason == "stop"


WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "the current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 12}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}


def test_forced_tool_call_whole_and_streamed(client):
    kwargs = dict(
        model=MODEL,
        messages=MSG,
        tools=[WEATHER_TOOL],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        temperature=0,
        max_tokens=64,
    )
    out = client.chat.completions.create(**kwargs)
    choice = out.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), WEATHER_TOOL["function"]["parameters"])
    calls: dict[int, dict] = {}
    finish = None
    for chunk in client.chat.completions.create(**kwargs, stream=True):
        for c in chunk.choices:
            finish = c.finish_reason or finish
            for tc in c.delta.tool_calls or ():
                entry = calls.setdefault(tc.index, {"name": None, "arguments": ""})
                entry["name"] = tc.function.name or entry["name"]
                entry["arguments"] += tc.function.arguments or ""
    assert finish == "tool_calls"
    assert calls == {0: {"name": "get_weather", "arguments": call.function.arguments}}


def test_logit_bias(client, server):
    base = client.completions.create(
        model=MODEL, prompt="The capital of France is", max_tokens=1, temperature=0
    )
    (greedy,) = server.post("/tokenize", {"prompt": base.choices[0].text})["tokens"]
    banned = client.completions.create(
        model=MODEL,
        prompt="The capital of France is",
        max_tokens=1,
        temperature=0,
        logit_bias={str(greedy): -100},
    )
    assert banned.choices[0].text != base.choices[0].text
    (forced,) = server.post("/tokenize", {"prompt": " zebra"})["tokens"][:1]
    out = client.completions.create(
        model=MODEL,
        prompt="The capital of France is",
        max_tokens=1,
        temperature=0,
        logit_bias={str(forced): 100},
    )
    assert out.choices[0].text == server.post("/detokenize", {"tokens": [forced]})["prompt"]


def test_echo_with_logprobs(client, server):
    prompt = "The capital of France is"
    prompt_ids = server.post("/tokenize", {"prompt": prompt})["tokens"]
    out = client.completions.create(
        model=MODEL, prompt=prompt, echo=True, logprobs=2, max_tokens=3, temperature=0
    )
    choice = out.choices[0]
    assert choice.text.startswith(prompt)
    lp = choice.logprobs
    assert len(lp.tokens) == len(prompt_ids) + 3
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert all(x <= 0 for x in lp.token_logprobs[1:])
    # each prompt position holds its top-2 and the prompt token itself
    assert all(2 <= len(top) <= 3 for top in lp.top_logprobs[1:])
    assert lp.text_offset[: len(prompt_ids)] == sorted(lp.text_offset[: len(prompt_ids)])


def test_bad_constraints_are_400s_and_the_server_serves_on(client):
    for extra, param in [
        ({"guided_grammar": "start: undefined_rule"}, "guided_grammar"),
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": {"type": "nope"}},
                }
            },
            "response_format.json_schema.schema",
        ),
        ({"logit_bias": {"99999999": 5}}, "logit_bias"),
    ]:
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(model=MODEL, prompt="x", max_tokens=2, extra_body=extra)
        assert e.value.body["param"] == param
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(
            model=MODEL,
            messages=MSG,
            tools=[WEATHER_TOOL],
            tool_choice={"type": "function", "function": {"name": "unknown"}},
        )
    assert e.value.body["param"] == "tool_choice.function.name"
    ok = client.completions.create(model=MODEL, prompt="Hello", max_tokens=2, temperature=0)
    assert ok.choices[0].finish_reason == "length"
