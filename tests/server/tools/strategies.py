"""Hypothesis strategies shared by the parser property tests: model-like outputs built from
well-formed calls, malformed calls, stray tag pieces, whitespace and plain text, and random
ways to split a text into streamed deltas."""

from __future__ import annotations

import json

from hypothesis import strategies as st

NAMES = ["get_weather", "search", "f"]

_json_leaf = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-1000, 1000),
    st.floats(allow_nan=False, allow_infinity=False, width=32),
    st.text(max_size=8),
)
json_values = st.recursive(
    _json_leaf,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=6,
)
arguments = st.dictionaries(st.text(max_size=6), json_values, max_size=3)
names = st.sampled_from(NAMES * 3 + ["unknown_fn", ""])
plain = st.text(alphabet=st.sampled_from(list('ab <>/{}\n\t ";:,é😀_')), max_size=12)
whitespace = st.text(alphabet=st.sampled_from([" ", "\n", "\t"]), max_size=3)


@st.composite
def call_json(draw, key: str = "arguments") -> str:
    obj = {"name": draw(names), key: draw(arguments)}
    if draw(st.booleans()):
        obj = {key: obj[key], "name": obj["name"]}
    indent = draw(st.sampled_from([None, 2]))
    text = json.dumps(obj, ensure_ascii=draw(st.booleans()), indent=indent)
    return text


def _mangle(text: str, cut: int) -> str:
    return text[: cut % (len(text) + 1)]


def _noise(tags: list[str], call_key: str) -> st.SearchStrategy[str]:
    """Pieces of a model output that are not whole calls: text, whitespace, whole or
    partial tags, truncated calls, JSON that is not a call."""
    tag = st.sampled_from(tags)
    partial_tag = st.builds(lambda t, k: t[: 1 + k % max(len(t) - 1, 1)], tag, st.integers(0, 20))
    truncated = st.builds(_mangle, call_json(call_key), st.integers(0, 200))
    return st.one_of(
        plain,
        whitespace,
        tag,
        partial_tag,
        truncated,
        st.sampled_from(
            [
                "NaN",
                "[]",
                '{"name": 1}',
                '{"name": "f", "' + call_key + '": {"x": NaN}}',
                '{"name": "f", "' + call_key + '": "{\\"a\\": 1}"}',
                '{"name": "f", "' + call_key + '": {"s": "\\ud800"}}',
                '{"name": "f", "' + call_key + '": [1]}',
                '{"name": "search"}',
            ]
        ),
    )


@st.composite
def hermes_call(draw) -> str:
    """A `<tool_call>` block: mostly well-formed, sometimes truncated or unclosed."""
    from server.tools.hermes import END, START

    body = draw(st.one_of(call_json(), call_json(), call_json(), _noise([START, END], "arguments")))
    ws1, ws2 = draw(whitespace), draw(whitespace)
    end = draw(st.sampled_from([END, END, END, "", "</tool_"]))
    return START + ws1 + body + ws2 + end


def hermes_outputs() -> st.SearchStrategy[str]:
    from server.tools.hermes import END, START

    piece = st.one_of(hermes_call(), hermes_call(), _noise([START, END], "arguments"))
    return st.lists(piece, max_size=8).map("".join)


@st.composite
def llama3_turn(draw) -> str:
    """A Llama-3.1 tool-call turn, sometimes with noise inserted (then it is content)."""
    from server.tools.llama3_json import PYTHON_TAG

    calls = draw(st.lists(call_json("parameters"), min_size=1, max_size=3))
    seps = draw(st.lists(st.sampled_from([";", "; ", " ;\n", ";;", ","]), min_size=len(calls)))
    text = draw(whitespace) + draw(st.sampled_from(["", PYTHON_TAG]))
    for call, sep in zip(calls, seps, strict=False):
        text += call + sep
    text = text[: -len(seps[len(calls) - 1])] + draw(st.sampled_from(["", ";", " ", "\n"]))
    noise = draw(st.lists(_noise([PYTHON_TAG, ";", "{"], "parameters"), max_size=2))
    for piece in noise:
        at = draw(st.integers(0, len(text)))
        text = text[:at] + piece + text[at:]
    return text


def llama3_outputs() -> st.SearchStrategy[str]:
    from server.tools.llama3_json import PYTHON_TAG

    noise = st.lists(_noise([PYTHON_TAG, ";", "{"], "parameters"), max_size=6).map("".join)
    return st.one_of(llama3_turn(), llama3_turn(), noise)


@st.composite
def splits(draw, text: str) -> list[str]:
    """`text` cut at random points (empty deltas included: a step may add no text)."""
    cuts = sorted(draw(st.lists(st.integers(0, len(text)), max_size=12)))
    bounds = [0, *cuts, len(text)]
    return [text[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]
