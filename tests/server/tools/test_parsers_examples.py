"""The tool-call parsers on the documented cases, ids and finish_reason."""

from __future__ import annotations

import pytest

from server.tools.calls import finish_reason_with_tools, tool_call_id_prefix
from server.tools.hermes import HermesToolParser
from server.tools.llama3_json import Llama3JsonToolParser

NAMES = ["get_weather", "now"]


def _calls(parsed):
    return [(c.id, c.name, c.arguments) for c in parsed.tool_calls]


@pytest.mark.parametrize(
    "text,content,calls",
    [
        # content before, two parallel calls; the "\n" between them is not content
        (
            'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
            '</tool_call>\n<tool_call>\n{"name": "now"}\n</tool_call>',
            "Let me check.\n",
            [("c_0", "get_weather", '{"city": "Paris"}'), ("c_1", "now", "{}")],
        ),
        # unclosed at the end but complete: a call (models stop right after the JSON)
        ('<tool_call>{"name": "now", "arguments": {}}', None, [("c_0", "now", "{}")]),
        # malformed JSON, unknown function, non-object arguments: content, as written
        ("<tool_call>{oops}</tool_call> ok", "<tool_call>{oops}</tool_call> ok", []),
        (
            '<tool_call>{"name": "rm_rf"}</tool_call>',
            '<tool_call>{"name": "rm_rf"}</tool_call>',
            [],
        ),
        (
            '<tool_call>{"name": "now", "arguments": 3}',
            '<tool_call>{"name": "now", "arguments": 3}',
            [],
        ),
        # a malformed call does not hide a good one after it
        (
            '<tool_call>{"name": "now", </tool_call>\n<tool_call>{"name": "now"}</tool_call>',
            '<tool_call>{"name": "now", </tool_call>\n',
            [("c_0", "now", "{}")],
        ),
        # double-encoded arguments are decoded; non-ASCII is kept
        (
            '<tool_call>{"name": "get_weather", "arguments": "{\\"city\\": \\"Zürich\\"}"}'
            "</tool_call>",
            None,
            [("c_0", "get_weather", '{"city": "Zürich"}')],
        ),
        ("No tools needed.\n", "No tools needed.\n", []),
    ],
)
def test_hermes(text, content, calls):
    parsed = HermesToolParser(NAMES).parse(text, "c")
    assert parsed.content == content
    assert _calls(parsed) == calls


@pytest.mark.parametrize(
    "text,content,calls",
    [
        (
            '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}; '
            '{"name": "now", "parameters": {}}',
            None,
            [("c_0", "get_weather", '{"city": "Paris"}'), ("c_1", "now", "{}")],
        ),
        ('\n{"name": "now", "arguments": {}};', None, [("c_0", "now", "{}")]),
        # JSON that is not only calls is content, unchanged
        (
            '{"name": "now", "parameters": {}} and more',
            '{"name": "now", "parameters": {}} and more',
            [],
        ),
        ('{"answer": 42}', '{"answer": 42}', []),
        ("Paris is sunny.", "Paris is sunny.", []),
    ],
)
def test_llama3_json(text, content, calls):
    parsed = Llama3JsonToolParser(NAMES).parse(text, "c")
    assert parsed.content == content
    assert _calls(parsed) == calls


def test_llama3_stream_holds_a_call_turn_and_streams_content():
    parser = Llama3JsonToolParser(NAMES)
    stream = parser.stream("c")
    assert not stream.feed('{"name": "now", ') and not stream.feed('"parameters": {}}')
    end = stream.finish()
    assert end.content == "" and end.tool_calls[0]["function"]["name"] == "now"
    stream = parser.stream("c")
    assert stream.feed("Paris").content == "Paris"
    assert stream.feed(" is").content == " is"


def test_hermes_stream_releases_each_call_at_its_closing_tag():
    stream = HermesToolParser(NAMES).stream("c")
    assert stream.feed("Sure.\n<tool_").content == "Sure.\n"
    assert not stream.feed('call>{"name": "now"}</tool')
    out = stream.feed("_call>")
    assert [d["index"] for d in out.tool_calls] == [0, 0]
    assert out.tool_calls[0]["id"] == "c_0" and out.tool_calls[1]["function"]["arguments"] == "{}"


def test_ids_and_finish_reason():
    prefix = tool_call_id_prefix("chatcmpl-1", 0)
    assert prefix == tool_call_id_prefix("chatcmpl-1", 0)
    assert prefix.startswith("call_") and len(prefix) == 5 + 24
    assert len({prefix, tool_call_id_prefix("chatcmpl-1", 1), tool_call_id_prefix("x", 0)}) == 3
    assert finish_reason_with_tools("stop", 2) == "tool_calls"
    assert finish_reason_with_tools("stop", 0) == "stop"
    assert finish_reason_with_tools("length", 1) == "length"
    assert finish_reason_with_tools(None, 1) is None
