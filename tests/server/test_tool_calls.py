"""Tools, tool_choice, tool messages, --chat-template and --reasoning-parser through the chat
endpoint, against the fake engine (its script plays the model's output)."""

from __future__ import annotations

import json

import openai
import pydantic
import pytest

from server.app import make_app
from server.tools.prompting import TOOLS_PROMPT_HEADER
from tests.server.fake_engine import FakeEngine

CHAT = "/v1/chat/completions"
MSG = [{"role": "user", "content": "weather in Paris?"}]
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "the weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}
TIME = {"type": "function", "function": {"name": "get_time"}}
CALL_TEXT = (
    'Let me check.<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
    "</tool_call>"
)


@pytest.fixture
def engine() -> FakeEngine:
    # one token per byte: the tools prompt alone is ~700 tokens
    return FakeEngine(max_model_len=4096)


def _events(text: str) -> list[dict]:
    return [json.loads(line[6:]) for line in text.split("\n") if line[6:7] == "{"]


def _prompt(engine: FakeEngine) -> str:
    return engine.tokenizer.decode(engine.requests[-1][1])


def _join_stream(events: list[dict]) -> tuple[str, list[dict], str | None]:
    """(content, tool calls, finish_reason) of choice 0, folded as the openai SDK does."""
    content, calls, finish = "", {}, None
    for e in events:
        for c in e["choices"]:
            d = c["delta"]
            content += d.get("content") or ""
            for tc in d.get("tool_calls", []):
                call = calls.setdefault(tc["index"], {"function": {"arguments": ""}})
                if "id" in tc:
                    call.update(id=tc["id"], type=tc["type"])
                    call["function"]["name"] = tc["function"]["name"]
                call["function"]["arguments"] += tc["function"]["arguments"]
            finish = c["finish_reason"] or finish
    return content, [calls[i] for i in sorted(calls)], finish


async def test_auto_tool_call_whole_and_streamed(client, engine):
    engine.script = CALL_TEXT
    body = {"messages": MSG, "tools": [WEATHER, TIME], "max_tokens": 200}
    r = await client.post(CHAT, json=body)
    out = await r.json()
    assert r.status == 200, out
    # the fake's template ignores tools: they are in the system turn, in the documented format
    prompt = _prompt(engine)
    assert prompt.startswith("<|system|>" + TOOLS_PROMPT_HEADER)
    assert json.dumps(WEATHER) in prompt
    assert engine.requests[-1][2].structured_outputs is None  # auto: parsed, not forced
    choice = out["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    message = choice["message"]
    assert message["content"] == "Let me check."
    (call,) = message["tool_calls"]
    assert call["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}
    assert call["type"] == "function" and call["id"].startswith("call_")
    r = await client.post(CHAT, json={**body, "stream": True})
    content, calls, finish = _join_stream(_events(await r.text()))
    assert content == "Let me check." and finish == "tool_calls"
    assert [c["function"] for c in calls] == [call["function"]]


async def test_forced_calls_are_grammars(client, engine):
    engine.script = CALL_TEXT[len("Let me check.") :]
    for choice in ("required", {"type": "function", "function": {"name": "get_weather"}}):
        r = await client.post(
            CHAT, json={"messages": MSG, "tools": [WEATHER, TIME], "tool_choice": choice}
        )
        assert r.status == 200, await r.text()
        so = engine.requests[-1][2].structured_outputs
        assert so is not None and so.grammar is not None
        assert "call_0" in so.grammar and ("call_1" in so.grammar) == (choice == "required")
        message = (await r.json())["choices"][0]["message"]
        assert message["content"] is None and len(message["tool_calls"]) == 1
    # none: the tools are left out and the output is plain content
    r = await client.post(CHAT, json={"messages": MSG, "tools": [WEATHER], "tool_choice": "none"})
    assert TOOLS_PROMPT_HEADER not in _prompt(engine)
    message = (await r.json())["choices"][0]["message"]
    assert message["content"] == engine.script and "tool_calls" not in message


async def test_tool_history_is_rendered(client, engine):
    messages = [
        *MSG,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21C"},
    ]
    r = await client.post(CHAT, json={"messages": messages, "tools": [WEATHER], "max_tokens": 2})
    assert r.status == 200, await r.text()
    prompt = _prompt(engine)
    assert '<|assistant|><tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}' in (
        prompt
    )
    assert "<|user|><tool_response>\nsunny, 21C\n</tool_response>" in prompt


TOOLS_TEMPLATE = (
    "{% if tools %}TOOLS:{{ tools | tojson }}\n{% endif %}"
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


async def test_chat_template_flag_renders_tools(aiohttp_client):
    engine = FakeEngine(max_model_len=4096)
    body = {"messages": MSG, "tools": [WEATHER], "max_tokens": 2}
    # auto: a template that renders tools in no format a parser knows cannot be parsed
    client = await aiohttp_client(make_app(engine, chat_template=TOOLS_TEMPLATE))
    r = await client.post(CHAT, json=body)
    assert r.status == 400 and (await r.json())["error"]["param"] == "tools"
    client = await aiohttp_client(
        make_app(engine, chat_template=TOOLS_TEMPLATE, tool_call_parser="hermes")
    )
    r = await client.post(CHAT, json=body)
    assert r.status == 200, await r.text()
    prompt = _prompt(engine)
    assert prompt.startswith("TOOLS:[") and TOOLS_PROMPT_HEADER not in prompt


async def test_reasoning_parser(aiohttp_client):
    engine = FakeEngine()
    engine.script = "<think>\nweighing it\n</think>\n\nThe answer."
    client = await aiohttp_client(make_app(engine, reasoning_parser="deepseek_r1"))
    r = await client.post(CHAT, json={"messages": MSG, "max_tokens": 200})
    message = (await r.json())["choices"][0]["message"]
    assert message["reasoning_content"] == "weighing it"
    assert message["content"] == "The answer."
    r = await client.post(CHAT, json={"messages": MSG, "max_tokens": 200, "stream": True})
    deltas = [c["delta"] for e in _events(await r.text()) for c in e["choices"]]
    assert "".join(d.get("reasoning_content", "") for d in deltas) == "weighing it"
    assert "".join(d.get("content") or "" for d in deltas) == "The answer."
    assert all("<think>" not in (d.get("content") or "") for d in deltas)
    # the message goes back as history as it came (reasoning_content and all)
    history = [*MSG, message, {"role": "user", "content": "and?"}]
    r = await client.post(CHAT, json={"messages": history, "max_tokens": 2})
    assert r.status == 200, await r.text()


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        (
            {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "x"}}},
            "tool_choice.function.name",
        ),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": [WEATHER, WEATHER]}, "tools[1].function.name"),
        (
            {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": 1}}}]},
            "tools[0].function.parameters",
        ),
        (
            {
                "tools": [WEATHER],
                "tool_choice": "required",
                "response_format": {"type": "json_object"},
            },
            "tool_choice",
        ),
        (
            {"messages": [*MSG, {"role": "tool", "content": "r"}]},
            "messages[1].tool_call_id",
        ),
        ({"messages": [{"role": "user", "content": None}]}, "messages[0].content"),
        ({"tools": [WEATHER], "parallel_tool_calls": "yes"}, "parallel_tool_calls"),
    ],
)
async def test_tool_errors_name_the_field(client, engine, fields, param):
    r = await client.post(CHAT, json={"messages": MSG, "max_tokens": 2, **fields})
    body = await r.json()
    assert r.status == 400 and body["error"]["param"] == param, body
    assert not engine.requests
    assert (await client.post(CHAT, json={"messages": MSG, "max_tokens": 2})).status == 200


class Weather(pydantic.BaseModel):
    city: str
    celsius: int


async def test_openai_sdk_tools_and_parse(client, engine):
    oai = openai.AsyncOpenAI(base_url=str(client.make_url("/v1")), api_key="x", max_retries=0)
    async with oai:
        engine.script = CALL_TEXT
        tool = openai.pydantic_function_tool(Weather, name="get_weather")
        out = await oai.chat.completions.create(
            model="fake-model", messages=MSG, tools=[tool], max_tokens=200
        )
        # a strict tool under auto: a lazy grammar holds every opened call to the schema
        assert engine.requests[-1][2].structured_outputs.grammar is not None
        (call,) = out.choices[0].message.tool_calls
        assert call.function.name == "get_weather" and out.choices[0].finish_reason == "tool_calls"
        # the agent loop: the SDK's message object goes back as it came, then the result
        history = [
            *MSG,
            out.choices[0].message,
            {"role": "tool", "tool_call_id": call.id, "content": "sunny"},
        ]
        engine.script = "It is sunny."
        out = await oai.chat.completions.create(
            model="fake-model", messages=history, tools=[tool], max_tokens=200
        )
        assert out.choices[0].message.content == "It is sunny."
        assert "<tool_response>\nsunny\n</tool_response>" in _prompt(engine)
        engine.script = CALL_TEXT
        stream = await oai.chat.completions.create(
            model="fake-model", messages=MSG, tools=[WEATHER], max_tokens=200, stream=True
        )
        names = [
            tc.function.name
            async for chunk in stream
            for c in chunk.choices
            for tc in c.delta.tool_calls or ()
            if tc.function.name
        ]
        assert names == ["get_weather"]
        engine.script = '{"city": "Paris", "celsius": 21}'
        parse = getattr(oai.chat.completions, "parse", None) or oai.beta.chat.completions.parse
        parsed = await parse(
            model="fake-model", messages=MSG, response_format=Weather, max_tokens=200
        )
        assert parsed.choices[0].message.parsed == Weather(city="Paris", celsius=21)
        so = engine.requests[-1][2].structured_outputs
        assert json.loads(so.json)["properties"]["celsius"]["type"] == "integer"


async def test_parallel_tool_calls_false_keeps_one_call(client, engine):
    second = CALL_TEXT.replace("Paris", "Rome")[len("Let me check.") :]
    engine.script = CALL_TEXT + second
    body = {"messages": MSG, "tools": [WEATHER], "max_tokens": 400}
    for parallel, cities in ((None, ["Paris", "Rome"]), (False, ["Paris"])):
        fields = {} if parallel is None else {"parallel_tool_calls": parallel}
        r = await client.post(CHAT, json={**body, **fields})
        calls = (await r.json())["choices"][0]["message"]["tool_calls"]
        assert [json.loads(c["function"]["arguments"])["city"] for c in calls] == cities
        r = await client.post(CHAT, json={**body, **fields, "stream": True})
        _, streamed, finish = _join_stream(_events(await r.text()))
        assert [c["function"] for c in streamed] == [c["function"] for c in calls]
        assert finish == "tool_calls"


def test_server_flags(tmp_path):
    import argparse

    from server.args import add_server_args

    parser = argparse.ArgumentParser()
    add_server_args(parser)
    path = tmp_path / "t.jinja"
    path.write_text(TOOLS_TEMPLATE)
    ns = parser.parse_args(["--chat-template", str(path), "--tool-call-parser", "llama3_json"])
    assert ns.chat_template == TOOLS_TEMPLATE and ns.tool_call_parser == "llama3_json"
    assert parser.parse_args(["--chat-template", "{{ x }}"]).chat_template == "{{ x }}"
    ns = parser.parse_args([])
    assert (ns.chat_template, ns.tool_call_parser, ns.reasoning_parser) == (None, "auto", None)
    for bad in (["--chat-template", str(tmp_path / "missing")], ["--tool-call-parser", "x"]):
        with pytest.raises(SystemExit):
            parser.parse_args(bad)


async def test_constraint_with_an_open_reasoning_block_is_refused(aiohttp_client):
    engine = FakeEngine()
    template = (
        "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
        "<|assistant|>{% if think is not defined or think %}<think>\n{% endif %}"
    )
    client = await aiohttp_client(
        make_app(engine, chat_template=template, reasoning_parser="qwen3")
    )
    fmt = {"response_format": {"type": "json_object"}}
    r = await client.post(CHAT, json={"messages": MSG, "max_tokens": 2, **fmt})
    body = await r.json()
    assert r.status == 400 and body["error"]["param"] == "response_format", body
    assert not engine.requests
    r = await client.post(
        CHAT,
        json={"messages": MSG, "max_tokens": 2, "chat_template_kwargs": {"think": False}, **fmt},
    )
    assert r.status == 200, await r.text()


async def test_tokenize_renders_as_chat_does(client, engine):
    msgs = [*MSG, {"role": "assistant", "content": "It is"}]
    body = {"messages": msgs, "tools": [WEATHER], "continue_final_message": True}
    r = await client.post("/tokenize", json=body)
    tokens = (await r.json())["tokens"]
    assert r.status == 200
    r = await client.post(CHAT, json={**body, "max_tokens": 1})
    assert r.status == 200, await r.text()
    assert engine.requests[-1][1] == tokens
    text = engine.tokenizer.decode(tokens)
    assert TOOLS_PROMPT_HEADER in text and text.endswith("It is")
    r = await client.post("/tokenize", json={**body, "tools": [WEATHER, WEATHER]})
    assert (await r.json())["error"]["param"] == "tools[1].function.name"


async def test_llama3_json_parser(aiohttp_client):
    engine = FakeEngine(max_model_len=4096)
    with pytest.raises(ValueError, match="ignores tools"):
        make_app(engine, tool_call_parser="llama3_json")
    client = await aiohttp_client(
        make_app(engine, chat_template=TOOLS_TEMPLATE, tool_call_parser="llama3_json")
    )
    engine.script = '{"name": "get_weather", "parameters": {"city": "Paris"}}'
    body = {"messages": MSG, "tools": [WEATHER], "max_tokens": 200}
    r = await client.post(CHAT, json=body)
    choice = (await r.json())["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["tool_calls"][0]["function"]["arguments"] == '{"city": "Paris"}'
    r = await client.post(CHAT, json={**body, "stream": True})
    _, calls, finish = _join_stream(_events(await r.text()))
    assert finish == "tool_calls" and [c["function"] for c in calls] == [
        choice["message"]["tool_calls"][0]["function"]
    ]
    r = await client.post(CHAT, json={**body, "tool_choice": "required"})
    assert '"parameters"' in engine.requests[-1][2].structured_outputs.grammar


def test_a_constraint_starts_after_a_one_token_reasoning_end():
    import dataclasses

    from jaxserve.sampling_params import SamplingParams
    from jaxserve.structured_output.params import StructuredOutputsParams
    from server.generation import constrain_the_answer_only
    from server.tools.chat_output import ChatOutputParsers
    from server.tools.reasoning import ReasoningParser, ReasoningTags
    from server.validate import ChatRequest

    so = StructuredOutputsParams(json_object=True)
    fields = {
        f.name: None for f in dataclasses.fields(ChatRequest) if f.default is f.default_factory
    }
    req = ChatRequest(**{**fields, "params": SamplingParams(max_tokens=5, structured_outputs=so)})
    parser = ReasoningParser(ReasoningTags(start_token_id=6, end_token_id=7))
    opened = ChatOutputParsers(None, parser, starts_in_reasoning=True)
    got = constrain_the_answer_only(req, opened).params.structured_outputs
    assert got == dataclasses.replace(so, after_token_id=7)
    closed = ChatOutputParsers(None, parser, starts_in_reasoning=False)
    assert constrain_the_answer_only(req, closed) is req
