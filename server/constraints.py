"""A generation request's output constraint: the one StructuredOutputsParams its fields ask for,
compiled (without a tokenizer) before the request is queued.

Sources, at most one per request (two are a 400 naming both):
  response_format      {"type": "json_object"} -> json_object; {"type": "json_schema",
                       "json_schema": {"schema": S}} -> json=S (no schema: any JSON object);
                       {"type": "text"} is no constraint
  structured_outputs   vLLM's object, field for field
  guided_json / guided_regex / guided_choice / guided_grammar   vLLM's older extras
  tools                a forced tool call (tool_choice required / named, or strict tools
                       under auto): the tool grammar (server/tools/grammar.py)
guided_whitespace_pattern is a modifier of a JSON source (guided_json or a JSON
response_format), not a source; `strict` of a json_schema is accepted either way: the schema
is always enforced by the grammar.

NOTE on names: StructuredOutputsParams and grammar.py name the field in their own terms
("structured_outputs.json ..."); `Constraint.rename` maps those to the field as the client sent
it (response_format.json_schema.schema, guided_choice[2], ...), here and for errors the engine
raises later (a choice the vocabulary cannot spell is only found with the tokenizer).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import msgspec

from jaxserve.structured_output.grammar import compile_grammar
from jaxserve.structured_output.params import (
    FIELD_PREFIX,
    StructuredOutputsError,
    StructuredOutputsParams,
)
from server import protocol
from server.errors import APIError, bad_request


@dataclass(frozen=True)
class Constraint:
    """The request's constraint and how to name its fields in errors."""

    # None: the output is unconstrained
    params: StructuredOutputsParams | None
    # StructuredOutputsParams' field names (FIELD_PREFIX + name) -> the field as sent
    rename: dict[str, str] = field(default_factory=dict)

    def param(self, name: str) -> str:
        """The client's name of a StructuredOutputsError field (longest prefix renamed)."""
        for ours in sorted(self.rename, key=len, reverse=True):
            if name == ours or name.startswith((ours + ".", ours + "[")):
                return self.rename[ours] + name[len(ours) :]
        return name

    def rename_message(self, message: str) -> str:
        """An engine error's message with its leading field renamed (it starts with it)."""
        head, sep, rest = message.partition(" ")
        return self.param(head) + sep + rest


NONE = Constraint(None)


def _sources(body: protocol.GenerationBody) -> list[tuple[str, dict, dict[str, str]]]:
    """(source name, StructuredOutputsParams kwargs, rename) for each constraint given."""
    out = []
    rf = body.response_format
    if isinstance(rf, protocol.JsonObjectFormat):
        out.append(("response_format", {"json_object": True}, {}))
    elif isinstance(rf, protocol.JsonSchemaResponseFormat):
        schema = rf.json_schema.schema
        kwargs = {"json": schema} if schema is not None else {"json_object": True}
        out.append(
            (
                "response_format",
                kwargs,
                {FIELD_PREFIX + "json": "response_format.json_schema.schema"},
            )
        )
    if body.structured_outputs is not None:
        kwargs = {
            k: v
            for k, v in msgspec.structs.asdict(body.structured_outputs).items()
            if v is not None
        }
        out.append(("structured_outputs", kwargs, {}))
    for name, key in (
        ("guided_json", "json"),
        ("guided_regex", "regex"),
        ("guided_choice", "choice"),
        ("guided_grammar", "grammar"),
    ):
        value = getattr(body, name)
        if value is not None:
            out.append((name, {key: value}, {FIELD_PREFIX + key: name}))
    return out


def constraint_from_body(
    body: protocol.GenerationBody, tool_grammar: str | None = None
) -> Constraint:
    """The body's constraint, compiled; a 400 naming the field when it cannot be.

    tool_grammar: the grammar a chat request's tools force (None: none)."""
    sources = _sources(body)
    if tool_grammar is not None:
        rename = {FIELD_PREFIX + "grammar": "tools", "structured_outputs": "tools"}
        sources.append(("tool_choice", {"grammar": tool_grammar}, rename))
    ws = body.guided_whitespace_pattern
    if len(sources) > 1:
        names = [s[0] for s in sources]
        raise bad_request(
            f"give at most one output constraint; this request sets {', '.join(names)}",
            names[1],
        )
    if not sources:
        if ws is not None:
            raise bad_request(
                "guided_whitespace_pattern applies only with guided_json or a JSON response_format",
                "guided_whitespace_pattern",
            )
        return NONE
    name, kwargs, rename = sources[0]
    rename = {"structured_outputs": name, **rename}
    if ws is not None:
        if name not in ("guided_json", "response_format"):
            raise bad_request(
                f"guided_whitespace_pattern applies only with guided_json or a JSON "
                f"response_format, not {name}",
                "guided_whitespace_pattern",
            )
        kwargs = {**kwargs, "whitespace_pattern": ws}
        rename[FIELD_PREFIX + "whitespace_pattern"] = "guided_whitespace_pattern"
    constraint = Constraint(None, rename)
    try:
        params = StructuredOutputsParams(**kwargs)
        compile_grammar(params)
    except StructuredOutputsError as e:
        raise _error(constraint, e) from None
    return Constraint(params, rename)


def _error(constraint: Constraint, e: StructuredOutputsError) -> APIError:
    param = constraint.param(e.field)
    why = str(e)[len(e.field) :]
    return bad_request(f"{param}{why}", param)
