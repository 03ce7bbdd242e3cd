"""StructuredOutputsParams: exactly one constraint, field-named errors, a plain msgspec payload,
and grammar.compile_grammar as the API process calls it (no tokenizer, no engine)."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import msgspec
import pytest

from jaxserve.structured_output.grammar import compile_grammar, json_compile_options, lark_json
from jaxserve.structured_output.params import (
    MAX_CHOICES,
    MAX_SPEC_CHARS,
    StructuredOutputsParams,
)

SCHEMA = {
    "type": "object",
    "properties": {"zeta": {"type": "integer"}, "alpha": {"type": "string", "maxLength": 4}},
    "required": ["zeta"],
}


def test_a_schema_dict_and_its_text_are_one_canonical_value() -> None:
    from_dict = StructuredOutputsParams(json=SCHEMA)
    from_text = StructuredOutputsParams(json=json.dumps(SCHEMA, indent=2))
    assert from_dict == from_text and hash(from_dict) == hash(from_text)
    assert from_dict.key() == from_text.key()
    assert isinstance(from_dict.json, str) and json.loads(from_dict.json) == SCHEMA
    # property order is the output's order, so it is kept, not sorted
    assert list(json.loads(from_dict.json)["properties"]) == ["zeta", "alpha"]
    assert (
        from_dict.key() != StructuredOutputsParams(json=SCHEMA, disable_any_whitespace=True).key()
    )


def test_choice_is_stored_as_a_tuple_and_keys_differ_by_kind() -> None:
    p = StructuredOutputsParams(choice=["a", "b"])
    assert p.choice == ("a", "b") and p.kind == "choice"
    keys = {
        StructuredOutputsParams(regex="a|b").key(),
        StructuredOutputsParams(grammar='start: "a" | "b"').key(),
        p.key(),
        StructuredOutputsParams(json_object=True).key(),
    }
    assert len(keys) == 4


@dataclasses.dataclass(frozen=True)
class Carrier:
    """Stands in for SamplingParams on the wire."""

    structured_outputs: StructuredOutputsParams | None = None


@pytest.mark.parametrize(
    "params",
    [
        StructuredOutputsParams(json=SCHEMA, whitespace_pattern=r"[ \n]{0,2}"),
        StructuredOutputsParams(choice=["x", 'y "quoted"', "ü"]),
        StructuredOutputsParams(regex=r"\d+"),
        StructuredOutputsParams(grammar="start: /[a-z]+/"),
        StructuredOutputsParams(json_object=True, disable_any_whitespace=True),
    ],
)
def test_round_trips_through_msgspec_msgpack(params: StructuredOutputsParams) -> None:
    wire = msgspec.msgpack.encode(Carrier(params))
    back = msgspec.msgpack.decode(wire, type=Carrier).structured_outputs
    assert back == params and back.key() == params.key()
    # and an untyped decode holds nothing but plain values
    raw = msgspec.msgpack.decode(wire)["structured_outputs"]
    assert all(isinstance(v, (str, list, bool, type(None))) for v in raw.values())


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, "structured_outputs must set exactly one of json, regex, choice, grammar, "),
        (dict(json=SCHEMA, regex="a"), "structured_outputs must set exactly one of"),
        (dict(choice=["a"], json_object=True), "structured_outputs must set exactly one of"),
        (dict(json=[1]), "structured_outputs.json must be a JSON Schema object"),
        (dict(json="true"), "structured_outputs.json must be a JSON Schema object"),
        (dict(json="{"), "structured_outputs.json is not valid JSON"),
        (dict(json={"a": float("nan")}), "structured_outputs.json is not JSON-serializable"),
        (dict(json={"a": {1, 2}}), "structured_outputs.json is not JSON-serializable"),
        (dict(regex=3), "structured_outputs.regex must be a string"),
        (dict(regex="a\ud800"), "structured_outputs.regex holds a lone surrogate"),
        (dict(grammar="  "), "structured_outputs.grammar must not be empty"),
        (dict(grammar="x" * (MAX_SPEC_CHARS + 1)), "structured_outputs.grammar may hold at most"),
        (dict(choice="ab"), "structured_outputs.choice must be a list of strings"),
        (dict(choice=[]), "structured_outputs.choice must hold at least one string"),
        (dict(choice=["a", 1]), "structured_outputs.choice[1] must be a string"),
        (dict(choice=["a"] * (MAX_CHOICES + 1)), "structured_outputs.choice may hold at most"),
        (dict(json_object=1), "structured_outputs.json_object must be a boolean"),
        (dict(regex="a", disable_any_whitespace=True), "structured_outputs.disable_any_whitespace"),
        (dict(regex="a", whitespace_pattern=" "), "structured_outputs.whitespace_pattern applies"),
        (
            dict(json_object=True, whitespace_pattern=" ", disable_any_whitespace=True),
            "structured_outputs.whitespace_pattern and disable_any_whitespace contradict",
        ),
    ],
)
def test_bad_params_raise_a_value_error_naming_the_field(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError) as info:
        StructuredOutputsParams(**kwargs)
    assert str(info.value).startswith(message), str(info.value)
    assert str(info.value).startswith(info.value.field)


def test_json_whitespace_is_bounded_unless_the_request_says_otherwise() -> None:
    default = json_compile_options(StructuredOutputsParams(json_object=True))
    assert default == {"whitespace_pattern": "[ ]?"}
    none = json_compile_options(
        StructuredOutputsParams(json_object=True, disable_any_whitespace=True)
    )
    assert none == {"whitespace_flexible": False}
    custom = StructuredOutputsParams(json_object=True, whitespace_pattern=r"\n?")
    assert json_compile_options(custom) == {"whitespace_pattern": r"\n?"}


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        (dict(json={"type": "object", "properties": {"a": {"type": "nope"}}}), "json"),
        (dict(json={"type": "object", "not": {}}), "json"),
        (dict(regex="(a"), "regex"),
        (dict(grammar="start: undefined_rule"), "grammar"),
        (dict(grammar='root ::= "a" | ('), "grammar"),
        (dict(json_object=True, whitespace_pattern="[a-"), "whitespace_pattern"),
    ],
)
def test_compile_without_a_tokenizer_names_the_field(kwargs: dict, field: str) -> None:
    # what the API process runs at request validation: cheap, no engine, no tokenizer
    with pytest.raises(ValueError, match=rf"^structured_outputs\.{field} "):
        compile_grammar(StructuredOutputsParams(**kwargs))


def test_compile_gives_llguidance_grammar_text() -> None:
    for params in [
        StructuredOutputsParams(json=SCHEMA),
        StructuredOutputsParams(json_object=True),
        StructuredOutputsParams(regex="[ab]+"),
        StructuredOutputsParams(choice=['say "hi"', "back\\slash", "new\nline", "\x7f", "😀"]),
        StructuredOutputsParams(grammar='root ::= "a" | "b"'),  # GBNF converts to Lark
    ]:
        grammar = compile_grammar(params)
        assert isinstance(grammar, str) and grammar


def test_the_host_side_never_imports_jax() -> None:
    # the manager runs in the engine core's host loop, next to jaxserve/core (no jax there);
    # and API-side validation needs neither jax nor transformers
    code = (
        "import sys, jaxserve.structured_output.manager as m, jaxserve.structured_output.grammar;"
        "bad = sorted(k for k in sys.modules if k.split('.')[0] in ('jax', 'transformers'));"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_lark_json_carries_the_whitespace_rule_and_refuses_non_objects() -> None:
    term = lark_json('{"type": "object", "x-guidance": {"lenient": true}}')
    assert term.startswith("%json ")
    embedded = json.loads(term.removeprefix("%json "))
    assert embedded["x-guidance"] == {"whitespace_pattern": "[ ]?", "lenient": True}
    compact = json.loads(lark_json({}, disable_any_whitespace=True).removeprefix("%json "))
    assert compact["x-guidance"] == {"whitespace_flexible": False}
    with pytest.raises(ValueError, match=r"^structured_outputs\.json must be a JSON Schema"):
        lark_json("[1]")
