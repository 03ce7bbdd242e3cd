"""Forced tool calls: the grammar for tool_choice "required" / a named function, walked with
llguidance over random allowed tokens of the default model's tokenizer until it stops, always
decodes to calls that the same format's parser reads back and whose arguments validate
against the function's schema (jsonschema)."""

from __future__ import annotations

import json
import random

import jsonschema
import llguidance
import numpy as np
import pytest

from server.tools.definitions import parse_tool_request
from server.tools.grammar import MAX_PARALLEL_CALLS, forced_tool_grammar, tool_grammar
from server.tools.hermes import HermesToolParser
from server.tools.llama3_json import Llama3JsonToolParser

# Bounded schemas (short strings, bounded numbers and arrays), so a random walk ends soon.
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather in a city",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "maxLength": 6},
                    "unit": {"enum": ["c", "f"]},
                    "days": {"type": "integer", "minimum": 1, "maximum": 7},
                },
                "required": ["city", "unit"],
                "additionalProperties": False,
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "add",
            "parameters": {
                "type": "object",
                "properties": {
                    "xs": {
                        "type": "array",
                        "items": {"$ref": "#/$defs/small"},
                        "minItems": 1,
                        "maxItems": 3,
                    },
                    "exact": {"type": "boolean"},
                },
                "required": ["xs", "exact"],
                "additionalProperties": False,
                "$defs": {"small": {"type": "integer", "minimum": -9, "maximum": 99}},
            },
        },
    },
    {"type": "function", "function": {"name": "now"}},
]
PARSERS = [HermesToolParser, Llama3JsonToolParser]


def walk(
    ll_tokenizer, grammar: str, seed: int, max_steps: int = 400, prefix_ids: list[int] = ()
) -> list[int]:
    """`prefix_ids`, then random allowed tokens (EOS half the time it is allowed) until the
    matcher stops."""
    matcher = llguidance.LLMatcher(ll_tokenizer, grammar)
    assert not matcher.is_error(), matcher.get_error()
    assert matcher.consume_tokens(list(prefix_ids)), matcher.get_error()
    rng = random.Random(seed)
    eos = ll_tokenizer.eos_token
    ids: list[int] = list(prefix_ids)
    for _ in range(max_steps):
        if matcher.is_stopped():
            return ids
        mask = np.frombuffer(matcher.compute_bitmask(), dtype=np.uint32)
        bits = np.unpackbits(mask.view(np.uint8), bitorder="little")
        allowed = np.flatnonzero(bits[: ll_tokenizer.vocab_size])
        assert len(allowed) > 0, "the grammar never dead-ends"
        others = [t for t in allowed.tolist() if t != eos] if len(allowed) < 4096 else None
        if eos in allowed and (rng.random() < 0.5 or not others):
            token = eos
        elif others is not None:
            token = rng.choice(others)
        else:
            token = int(rng.choice(allowed.tolist()))
            if token == eos:
                continue
        assert matcher.consume_token(token), matcher.get_error()
        if token != eos:
            ids.append(token)
    raise AssertionError("the forced grammar did not finish")


@pytest.mark.parametrize("parser_cls", PARSERS)
@pytest.mark.parametrize(
    "tool_choice,parallel",
    [
        ("required", True),
        ("required", False),
        ({"type": "function", "function": {"name": "add"}}, True),
    ],
)
def test_forced_calls_parse_and_validate(
    tokenizer, ll_tokenizer, parser_cls, tool_choice, parallel
):
    req = parse_tool_request(TOOLS, tool_choice, parallel)
    parser = parser_cls(req.tool_names)
    grammar = forced_tool_grammar(parser, req.tools, req.choice, is_parallel=req.is_parallel)
    assert grammar is not None
    schemas = {t.name: t.parameters for t in req.tools}
    counts = []
    for seed in range(6):
        text = tokenizer.decode(walk(ll_tokenizer, grammar, seed), skip_special_tokens=True)
        parsed = parser.parse(text, "call_x")
        assert parsed.tool_calls, text
        assert parsed.content is None, text
        counts.append(len(parsed.tool_calls))
        for call in parsed.tool_calls:
            if req.choice.mode == "function":
                assert call.name == "add"
            jsonschema.validate(json.loads(call.arguments), schemas[call.name])
        # the stream reads the same calls out of the same text
        stream = parser.stream("call_x")
        for piece in (text[: len(text) // 3], text[len(text) // 3 :]):
            stream.feed(piece)
        stream.finish()
        assert stream.tool_calls == parsed.tool_calls
    assert max(counts) <= (MAX_PARALLEL_CALLS if parallel and tool_choice == "required" else 1)


def test_nothing_forced_for_auto_and_none():
    for choice in ("auto", "none"):
        req = parse_tool_request(TOOLS, choice)
        assert (
            forced_tool_grammar(HermesToolParser(), req.tools, req.choice, is_parallel=True) is None
        )


def test_a_schema_llguidance_cannot_enforce_names_the_tool():
    tools = [
        TOOLS[2],
        {
            "type": "function",
            "function": {
                "name": "odd",
                # valid JSON Schema (jsonschema accepts it), but not enforceable
                "parameters": {"type": "object", "properties": {"a": {"$ref": "#/$defs/nope"}}},
            },
        },
    ]
    req = parse_tool_request(tools, "required")
    with pytest.raises(ValueError, match=r"^tools\[1\]\.function\.parameters"):
        forced_tool_grammar(HermesToolParser(), req.tools, req.choice, is_parallel=True)


def _strict(tool: dict) -> dict:
    return {"type": "function", "function": {**tool["function"], "strict": True}}


def test_strict_tools_under_auto_hold_every_opened_call(tokenizer, ll_tokenizer):
    """tool_choice "auto" with strict tools: the text is free, but a `<tool_call>` the model
    opens (here: the walk is started inside one) always ends as a valid call."""
    req = parse_tool_request([_strict(t) for t in TOOLS], "auto")
    assert req.needs_grammar
    parser = HermesToolParser(req.tool_names)
    grammar = tool_grammar(parser, req)
    assert grammar is not None and tool_grammar(parser, parse_tool_request(TOOLS)) is None
    prefix = "Let me look that up.\n<tool_call>\n"
    prefix_ids = tokenizer.encode(prefix, add_special_tokens=False)
    for seed in range(6):
        ids = walk(ll_tokenizer, grammar, seed, prefix_ids=prefix_ids)
        text = tokenizer.decode(ids, skip_special_tokens=True)
        parsed = parser.parse(text, "call_x")
        assert parsed.content.startswith("Let me look that up.") and parsed.tool_calls, text
        for call in parsed.tool_calls:
            jsonschema.validate(
                json.loads(call.arguments), req.tools[req.tool_names.index(call.name)].parameters
            )
    # a call the schema forbids is refused by the matcher
    matcher = llguidance.LLMatcher(ll_tokenizer, grammar)
    bad = tokenizer.encode(
        prefix + '{"name": "get_weather", "arguments": {"city": 3', add_special_tokens=False
    )
    assert not matcher.consume_tokens(bad) or matcher.is_error()
    # a non-strict tool's arguments are any object
    lax_req = parse_tool_request([_strict(TOOLS[0]), TOOLS[2]], "auto")
    matcher = llguidance.LLMatcher(ll_tokenizer, tool_grammar(parser, lax_req))
    lax = prefix + '{"name": "now", "arguments": {"anything": [1, "x"]}}\n</tool_call> ok'
    assert matcher.consume_tokens(tokenizer.encode(lax, add_special_tokens=False))
    # plain text with no call is fine
    matcher = llguidance.LLMatcher(ll_tokenizer, grammar)
    assert matcher.consume_tokens(tokenizer.encode("No call needed.", add_special_tokens=False))


def test_strict_auto_needs_hermes():
    req = parse_tool_request([TOOLS[2], _strict(TOOLS[0])], "auto")
    with pytest.raises(ValueError, match=r"^tools\[1\]\.function\.strict"):
        tool_grammar(Llama3JsonToolParser(req.tool_names), req)
