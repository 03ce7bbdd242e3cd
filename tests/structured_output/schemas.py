"""Hypothesis strategies for JSON Schemas that llguidance compiles and whose outputs are bounded.

`json_schemas()` draws object-rooted schemas (as OpenAI's json_schema response_format wants)
from: strings (maxLength, minLength, anchored patterns), integers and numbers with bounds,
enums and consts, booleans, nulls, nullable unions (anyOf), arrays (minItems/maxItems) and
nested objects (required/optional properties, additionalProperties false). Every construct
that could run on forever is bounded (strings have a maxLength or a bounded pattern, arrays a
maxItems, numbers a multipleOf, objects no extra keys), so `max_json_bytes(schema)` is a true
upper bound on the output's length under the manager's whitespace rule, and so (every token
being at least one byte) on its token count. Reused by the engine-level test with the model.
"""

from __future__ import annotations

import json
from typing import Any

from hypothesis import strategies as st

Schema = dict[str, Any]

PROPERTY_NAMES = ("id", "name", "age", "tags", "score", "active", "kind", "city", "code", "x")
# Anchored patterns (llguidance and jsonschema then agree: JSON Schema's pattern is a search)
# with the longest string each can match.
PATTERNS = {
    "^[a-z]{1,8}$": 8,
    "^[A-Z][a-z]{0,5}$": 6,
    "^[0-9]{3}-[0-9]{4}$": 8,
    "^(red|green|blue)$": 5,
    "^[a-f0-9]{2,6}$": 6,
}
# Bytes one JSON string character may take: a non-BMP character as a \\uXXXX\\uXXXX pair.
MAX_CHAR_BYTES = 12
# Bytes the fraction of a multipleOf number may take ("." and digits; llguidance writes two).
MAX_FRACTION_BYTES = 5
# Whitespace bytes the manager allows around one JSON token (at most one space each side).
WS = 2

_words = st.text(alphabet="abcdefghijklmnopqrstuvwxyz-_ ", min_size=1, max_size=8)


@st.composite
def strings(draw: st.DrawFn) -> Schema:
    if draw(st.booleans()):
        return {"type": "string", "pattern": draw(st.sampled_from(sorted(PATTERNS)))}
    hi = draw(st.integers(1, 12))
    schema: Schema = {"type": "string", "maxLength": hi}
    if draw(st.booleans()):
        schema["minLength"] = draw(st.integers(0, hi))
    return schema


@st.composite
def integers(draw: st.DrawFn) -> Schema:
    lo = draw(st.integers(-1000, 1000))
    hi = lo + draw(st.integers(1, 2000))
    if draw(st.booleans()):
        return {"type": "integer", "exclusiveMinimum": lo, "exclusiveMaximum": hi + 1}
    return {"type": "integer", "minimum": lo, "maximum": hi}


@st.composite
def numbers(draw: st.DrawFn) -> Schema:
    # multipleOf keeps the fraction finite (a plain bounded number may have any digits);
    # binary fractions only, so jsonschema's float check of multipleOf is exact
    step = draw(st.sampled_from([0.5, 0.25]))
    lo = draw(st.integers(-100, 100)) * step
    hi = lo + draw(st.integers(1, 400)) * step
    return {"type": "number", "multipleOf": step, "minimum": lo, "maximum": hi}


enums = st.one_of(
    st.lists(_words, min_size=1, max_size=5, unique=True).map(
        lambda v: {"type": "string", "enum": v}
    ),
    st.lists(st.integers(-50, 50), min_size=1, max_size=5, unique=True).map(lambda v: {"enum": v}),
    st.one_of(_words, st.integers(-9, 9), st.booleans()).map(lambda v: {"const": v}),
)
leaves = st.one_of(
    strings(),
    integers(),
    numbers(),
    enums,
    st.just({"type": "boolean"}),
    st.just({"type": "null"}),
)


def nullable(children: st.SearchStrategy[Schema]) -> st.SearchStrategy[Schema]:
    return children.map(lambda s: {"anyOf": [s, {"type": "null"}]})


@st.composite
def arrays(draw: st.DrawFn, items: st.SearchStrategy[Schema]) -> Schema:
    hi = draw(st.integers(1, 4))
    return {
        "type": "array",
        "items": draw(items),
        "minItems": draw(st.integers(0, hi)),
        "maxItems": hi,
    }


@st.composite
def objects(draw: st.DrawFn, values: st.SearchStrategy[Schema]) -> Schema:
    names = draw(st.lists(st.sampled_from(PROPERTY_NAMES), min_size=1, max_size=4, unique=True))
    properties = {name: draw(values) for name in names}
    required = [n for n in names if draw(st.booleans())]
    schema: Schema = {"type": "object", "properties": properties}
    if required:
        schema["required"] = required
    schema["additionalProperties"] = False
    return schema


def values(max_leaves: int = 6) -> st.SearchStrategy[Schema]:
    """Any schema of the family: leaves, nullable leaves, arrays and objects of them, nested."""
    return st.recursive(
        st.one_of(leaves, nullable(leaves)),
        lambda children: st.one_of(arrays(children), objects(children)),
        max_leaves=max_leaves,
    )


def json_schemas(max_leaves: int = 6) -> st.SearchStrategy[Schema]:
    """Object-rooted schemas of the family (the root of an OpenAI json_schema is an object)."""
    return objects(values(max_leaves))


def max_json_bytes(schema: Schema) -> int:
    """An upper bound on the UTF-8 length of any output llguidance allows for schema.

    Counts at most one space on each side of every JSON token (the manager's default rule).
    """
    if "anyOf" in schema:
        return max(max_json_bytes(s) for s in schema["anyOf"])
    if "enum" in schema or "const" in schema:
        options = schema.get("enum", [schema.get("const")])
        return max(len(json.dumps(v)) * MAX_CHAR_BYTES for v in options) + WS
    kind = schema["type"]
    if kind == "string":
        length = PATTERNS[schema["pattern"]] if "pattern" in schema else schema["maxLength"]
        return 2 + length * MAX_CHAR_BYTES + WS
    if kind == "integer":
        bounds = [schema.get(k) for k in ("minimum", "maximum", "exclusiveMinimum")]
        bounds.append(schema.get("exclusiveMaximum"))
        return max(len(str(b)) for b in bounds if b is not None) + WS
    if kind == "number":
        whole = max(len(str(int(schema[k]))) + 1 for k in ("minimum", "maximum"))  # + sign
        return whole + MAX_FRACTION_BYTES + WS
    if kind == "boolean":
        return len("false") + WS
    if kind == "null":
        return len("null") + WS
    if kind == "array":
        item = max_json_bytes(schema["items"])
        return 2 + schema["maxItems"] * (item + 1 + WS) + 2 * WS
    if kind == "object":
        entries = sum(
            len(json.dumps(name)) + WS + 1 + WS + max_json_bytes(value) + 1 + WS
            for name, value in schema["properties"].items()
        )
        return 2 + entries + 2 * WS
    raise ValueError(f"not a schema of this family: {schema}")
