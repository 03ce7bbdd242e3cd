"""The tool Structs decode what the openai client sends and refuse odd shapes; the decoded
values go through definitions.py unchanged in meaning."""

from __future__ import annotations

import msgspec
import pytest

from server.tools.definitions import ToolChoice, parse_tool_request
from server.tools.protocol import MessageToolCall, Tool, ToolChoiceField, Tools


def test_decode_and_check():
    tools = msgspec.json.decode(
        b'[{"type": "function", "function": {"name": "get_weather", "description": "d",'
        b' "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]',
        type=Tools,
    )
    choice = msgspec.json.decode(
        b'{"type": "function", "function": {"name": "get_weather"}}', type=ToolChoiceField
    )
    req = parse_tool_request(msgspec.to_builtins(tools), msgspec.to_builtins(choice))
    assert req.choice == ToolChoice("function", "get_weather")
    assert msgspec.json.decode(b'"required"', type=ToolChoiceField) == "required"
    call = msgspec.json.decode(
        b'{"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}',
        type=MessageToolCall,
    )
    assert call.function.arguments == "{}"


@pytest.mark.parametrize(
    "raw,type_",
    [
        (b'{"type": "function", "function": {"name": "has space"}}', Tool),
        (b'{"type": "function", "function": {"name": "f", "strict": true, "x": 2}}', Tool),
        (b'{"type": "code_interpreter"}', Tool),
        (b'"sometimes"', ToolChoiceField),
        (b'{"id": "c", "function": {"name": "f", "arguments": {}}}', MessageToolCall),
    ],
)
def test_refused(raw, type_):
    with pytest.raises(msgspec.ValidationError):
        msgspec.json.decode(raw, type=type_)
