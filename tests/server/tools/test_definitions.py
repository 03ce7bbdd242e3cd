"""`tools` / `tool_choice` / `parallel_tool_calls`: accepted shapes, and refusals whose
message starts with the field's path (the server's 400 `param`)."""

from __future__ import annotations

import pytest

from server.tools.definitions import ToolChoice, parse_tool_request

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}
NOW = {"type": "function", "function": {"name": "now"}}


def test_accepted():
    req = parse_tool_request([WEATHER, NOW], None, None)
    assert req.tool_names == ["get_weather", "now"]
    assert req.choice == ToolChoice("auto") and req.is_parallel
    # no parameters: takes none
    assert req.tools[1].parameters["properties"] == {}
    assert req.tools[0].to_openai() == WEATHER
    assert parse_tool_request(None).choice == ToolChoice("none")
    assert parse_tool_request([WEATHER], "required", False).choice.is_forced
    named = parse_tool_request([WEATHER, NOW], {"type": "function", "function": {"name": "now"}})
    assert named.choice == ToolChoice("function", "now") and named.choice.is_forced
    assert not parse_tool_request([WEATHER], "none").choice.is_forced


def _fn(**function):
    return {"type": "function", "function": {"name": "f", **function}}


@pytest.mark.parametrize(
    "tools,tool_choice,parallel,field,words",
    [
        ({"a": 1}, None, None, "tools", "list"),
        ([WEATHER, "x"], None, None, "tools[1]", "object"),
        ([{"type": "retrieval"}], None, None, "tools[0].type", "function"),
        ([{"type": "function"}], None, None, "tools[0].function", "name"),
        ([_fn(name="bad name!")], None, None, "tools[0].function.name", "letters"),
        ([WEATHER, NOW, WEATHER], None, None, "tools[2].function.name", "tools[0]"),
        ([_fn(description=3)], None, None, "tools[0].function.description", "string"),
        ([NOW, _fn(parameters=[1])], None, None, "tools[1].function.parameters", "JSON Schema"),
        (
            [_fn(parameters={"type": "string"})],
            None,
            None,
            "tools[0].function.parameters",
            "object",
        ),
        (
            [_fn(parameters={"type": "object", "properties": {"a": {"type": "objekt"}}})],
            None,
            None,
            "tools[0].function.parameters",
            "not a valid JSON Schema",
        ),
        (
            [_fn(parameters={"type": "object", "required": "a"})],
            None,
            None,
            "tools[0].function.parameters",
            "not a valid JSON Schema",
        ),
        ([WEATHER], "sometimes", None, "tool_choice", "'auto'"),
        (None, "required", None, "tool_choice", "needs tools"),
        ([WEATHER], {"type": "function", "function": {}}, None, "tool_choice.function.name", ""),
        (
            [WEATHER],
            {"type": "function", "function": {"name": "get_wether"}},
            None,
            "tool_choice.function.name",
            "get_weather",
        ),
        ([WEATHER], {"name": "get_weather"}, None, "tool_choice", "function"),
        ([WEATHER], None, "yes", "parallel_tool_calls", "boolean"),
    ],
)
def test_refused_naming_the_field(tools, tool_choice, parallel, field, words):
    with pytest.raises(ValueError) as e:
        parse_tool_request(tools, tool_choice, parallel)
    message = str(e.value)
    assert message.startswith(field + " "), message
    assert words in message
