"""THE property of the tool-call parsers: streaming a text in any deltas gives exactly the
non-streamed parse (content byte for byte; names, arguments, ids, order of the calls)."""

from __future__ import annotations

import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from server.tools.base import ToolParser
from server.tools.calls import ParsedToolCalls, ToolCall
from server.tools.hermes import HermesToolParser
from server.tools.llama3_json import Llama3JsonToolParser
from tests.server.tools.strategies import NAMES, hermes_outputs, llama3_outputs, splits


def stream_parse(parser: ToolParser, deltas: list[str], id_prefix: str) -> ParsedToolCalls:
    """Streams `deltas` and folds what comes out the way a client does (joins content,
    joins tool-call deltas per index)."""
    stream = parser.stream(id_prefix)
    outs = [stream.feed(d) for d in deltas] + [stream.finish()]
    content = "".join(o.content for o in outs)
    calls: dict[int, dict] = {}
    for o in outs:
        for d in o.tool_calls:
            if d["index"] not in calls:
                assert set(d) == {"index", "id", "type", "function"}, d
                assert d["type"] == "function" and d["function"]["arguments"] == ""
                assert d["index"] == len(calls), "indexes come in order, from 0"
                calls[d["index"]] = {"id": d["id"], "name": d["function"]["name"], "args": ""}
            else:
                assert set(d) == {"index", "function"} and set(d["function"]) == {"arguments"}
                calls[d["index"]]["args"] += d["function"]["arguments"]
    tool_calls = [ToolCall(c["id"], c["name"], c["args"]) for c in calls.values()]
    assert stream.tool_calls == tool_calls and stream.content == (content or None)
    return ParsedToolCalls(content or None, tool_calls)


def check_invariants(parser: ToolParser, text: str, parsed: ParsedToolCalls) -> None:
    for i, call in enumerate(parsed.tool_calls):
        assert call.id == f"call_t_{i}"
        assert isinstance(json.loads(call.arguments), dict)
        call.arguments.encode("utf-8")
        assert call.name in NAMES
    if not parsed.tool_calls:
        assert parsed.content == (text or None), "no calls: the text is the content, as is"


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data(), st.booleans())
def test_hermes_stream_equals_parse(data, is_known_names):
    parser = HermesToolParser(NAMES if is_known_names else None)
    text = data.draw(hermes_outputs())
    parsed = parser.parse(text, "call_t")
    if is_known_names:
        check_invariants(parser, text, parsed)
    deltas = data.draw(splits(text))
    assert stream_parse(parser, deltas, "call_t") == parsed


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data(), st.booleans())
def test_llama3_stream_equals_parse(data, is_known_names):
    parser = Llama3JsonToolParser(NAMES if is_known_names else None)
    text = data.draw(llama3_outputs())
    parsed = parser.parse(text, "call_t")
    if is_known_names:
        check_invariants(parser, text, parsed)
    deltas = data.draw(splits(text))
    assert stream_parse(parser, deltas, "call_t") == parsed
