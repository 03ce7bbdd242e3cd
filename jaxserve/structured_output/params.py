"""StructuredOutputsParams: the one constraint a request's output must follow (vLLM's names).

Frozen and validated on construction: exactly one of json / regex / choice / grammar /
json_object is set, each of the right type and size, or ValueError naming the field
("structured_outputs.json ..."). Only the shape is checked here; whether the schema or grammar
compiles is grammar.py's job (it needs llguidance). The fields are plain str / tuple / bool /
None, so the params travel inside SamplingParams over the msgspec wire as they are, hash, and
give a compile-cache key.
"""

from __future__ import annotations

import json as _json
from dataclasses import dataclass, fields
from typing import Any

# NOTE: bounds on what one request may ask llguidance to compile. llguidance has its own
# limits (grammar size, lexer states) that grammar.py turns into ValueErrors; these only keep
# a request from shipping megabytes of schema through the API process and the IPC socket.
MAX_SPEC_CHARS = 1 << 18
MAX_CHOICES = 4096

# The constraint fields, in the order error messages list them.
CONSTRAINT_FIELDS = ("json", "regex", "choice", "grammar", "json_object")
# Every error message starts with this prefix + the field name.
FIELD_PREFIX = "structured_outputs."


class StructuredOutputsError(ValueError):
    """A ValueError that says which field was wrong, so the server can rename it.

    The message starts with `field` (e.g. "structured_outputs.json"); a server that took the
    schema from `response_format.json_schema.schema` maps `field` to that name for its 400.
    """

    def __init__(self, field: str, why: str) -> None:
        super().__init__(f"{field} {why}")
        # the dotted name of the offending field, FIELD_PREFIX included
        self.field = field


def _check_text(value: object, name: str) -> str:
    """A string that has a UTF-8 encoding (a lone surrogate has none; llguidance needs bytes)."""
    field = FIELD_PREFIX + name
    if not isinstance(value, str):
        raise StructuredOutputsError(field, f"must be a string, got {type(value).__name__}")
    if len(value) > MAX_SPEC_CHARS:
        raise StructuredOutputsError(
            field, f"may hold at most {MAX_SPEC_CHARS} characters, got {len(value)}"
        )
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            raise StructuredOutputsError(
                field, f"holds a lone surrogate (U+{ord(value[e.start]):04X}) at {e.start}"
            ) from None
    return value


def canonical_schema(schema: object, name: str = "json") -> str:
    """A JSON Schema (dict or JSON text) as compact JSON text, key order kept.

    Key order is kept on purpose: llguidance emits object properties in the schema's order,
    as OpenAI's structured outputs do, so sorting keys would change the output.
    """
    field = FIELD_PREFIX + name
    if isinstance(schema, str):
        _check_text(schema, name)
        try:
            schema = _json.loads(schema)
        except ValueError as e:
            raise StructuredOutputsError(field, f"is not valid JSON: {e}") from None
    if not isinstance(schema, dict):
        raise StructuredOutputsError(
            field,
            f"must be a JSON Schema object (a dict or its JSON text), got {type(schema).__name__}",
        )
    try:
        text = _json.dumps(schema, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as e:
        raise StructuredOutputsError(field, f"is not JSON-serializable: {e}") from None
    return _check_text(text, name)


@dataclass(frozen=True)
class StructuredOutputsParams:
    # a JSON Schema the output must validate against: a dict or JSON text, stored as compact
    # JSON text (property order kept); must be an object schema
    json: str | dict[str, Any] | None = None
    # a regular expression (Rust `regex` syntax, as llguidance takes it) the whole output matches
    regex: str | None = None
    # the output is exactly one of these strings (a list is accepted, a tuple is stored)
    choice: tuple[str, ...] | None = None
    # a Lark grammar in llguidance's dialect (GBNF is converted too); the output is its `start`
    grammar: str | None = None
    # the output is any JSON object (OpenAI's response_format {"type": "json_object"})
    json_object: bool = False
    # JSON only (json / json_object): no whitespace at all between JSON tokens ("," and ":"
    # bare). By default at most one space may stand between tokens: bounded either way.
    disable_any_whitespace: bool = False
    # JSON only: a regex for the whitespace between JSON tokens, replacing the bounded default
    # (e.g. r"[\n ]{0,8}"); a pattern with * or + gives back unbounded whitespace runs
    whitespace_pattern: str | None = None
    # the constraint starts after the first output token with this id (a reasoning model's
    # </think>: the answer is constrained, the reasoning is free); None: from the first token
    after_token_id: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.json_object, bool):
            raise StructuredOutputsError(
                FIELD_PREFIX + "json_object",
                f"must be a boolean, got {type(self.json_object).__name__}",
            )
        if not isinstance(self.disable_any_whitespace, bool):
            raise StructuredOutputsError(
                FIELD_PREFIX + "disable_any_whitespace",
                f"must be a boolean, got {type(self.disable_any_whitespace).__name__}",
            )
        if self.after_token_id is not None and (
            not isinstance(self.after_token_id, int)
            or isinstance(self.after_token_id, bool)
            or self.after_token_id < 0
        ):
            raise StructuredOutputsError(
                FIELD_PREFIX + "after_token_id",
                f"must be a token id, got {self.after_token_id!r}",
            )
        given = [f for f in CONSTRAINT_FIELDS if self._is_set(f)]
        if len(given) != 1:
            what = f"{len(given)} ({', '.join(given)})" if given else "none"
            raise StructuredOutputsError(
                "structured_outputs",
                f"must set exactly one of {', '.join(CONSTRAINT_FIELDS)}, got {what}",
            )
        if self.json is not None:
            object.__setattr__(self, "json", canonical_schema(self.json))
        if self.regex is not None:
            _check_text(self.regex, "regex")
        if self.grammar is not None:
            _check_text(self.grammar, "grammar")
            if not self.grammar.strip():
                raise StructuredOutputsError(FIELD_PREFIX + "grammar", "must not be empty")
        if self.choice is not None:
            object.__setattr__(self, "choice", self._checked_choice())
        if self.whitespace_pattern is not None:
            _check_text(self.whitespace_pattern, "whitespace_pattern")
        ws_option = (
            "whitespace_pattern"
            if self.whitespace_pattern is not None
            else "disable_any_whitespace"
            if self.disable_any_whitespace
            else None
        )
        if ws_option is not None and not self.is_json:
            raise StructuredOutputsError(
                FIELD_PREFIX + ws_option, "applies only to json or json_object output"
            )
        if self.whitespace_pattern is not None and self.disable_any_whitespace:
            raise StructuredOutputsError(
                FIELD_PREFIX + "whitespace_pattern",
                "and disable_any_whitespace contradict each other; set at most one",
            )

    def _is_set(self, name: str) -> bool:
        value = getattr(self, name)
        return value is True if name == "json_object" else value is not None

    def _checked_choice(self) -> tuple[str, ...]:
        field = FIELD_PREFIX + "choice"
        if isinstance(self.choice, str) or not isinstance(self.choice, (list, tuple)):
            raise StructuredOutputsError(
                field, f"must be a list of strings, got {type(self.choice).__name__}"
            )
        if not self.choice:
            raise StructuredOutputsError(field, "must hold at least one string")
        if len(self.choice) > MAX_CHOICES:
            raise StructuredOutputsError(
                field, f"may hold at most {MAX_CHOICES} strings, got {len(self.choice)}"
            )
        for i, c in enumerate(self.choice):
            _check_text(c, f"choice[{i}]")
        if sum(map(len, self.choice)) > MAX_SPEC_CHARS:
            raise StructuredOutputsError(
                field, f"may hold at most {MAX_SPEC_CHARS} characters in all"
            )
        return tuple(self.choice)

    @property
    def is_json(self) -> bool:
        """The output is JSON (a schema or any object): the whitespace options apply."""
        return self.json is not None or self.json_object

    @property
    def kind(self) -> str:
        """Which constraint is set: one of CONSTRAINT_FIELDS."""
        return next(f for f in CONSTRAINT_FIELDS if self._is_set(f))

    def key(self) -> tuple[object, ...]:
        """A hashable key for the compile cache: equal keys compile to the same grammar."""
        return tuple(getattr(self, f.name) for f in fields(self))
