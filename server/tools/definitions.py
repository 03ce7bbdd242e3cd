"""`tools`, `tool_choice` and `parallel_tool_calls` of a chat request, checked and normalized.

Every refusal is a ValueError whose message starts with the field's path ("tools[1].function
.parameters ...", "tool_choice.function.name ..."): the server turns it into a 400 naming that
field. Takes the plain JSON values (msgspec.to_builtins of the body's fields, or the dicts an
offline caller passes), so it does not depend on how protocol.py declares them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal

import jsonschema

# OpenAI's rule for function names (also keeps names safe inside grammars and prompts)
_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
# a tool without `parameters` takes no arguments (OpenAI's reading)
_NO_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}, "additionalProperties": False}
_MODES = ("none", "auto", "required")


@dataclass(frozen=True)
class FunctionTool:
    """One `{"type": "function", "function": {...}}` item of `tools`."""

    name: str
    description: str | None
    # the arguments' JSON Schema; always {"type": "object", ...}
    parameters: dict[str, Any]
    # calls must follow the schema even under tool_choice "auto" (grammar.py enforces it)
    is_strict: bool = False

    def to_openai(self) -> dict[str, Any]:
        """The tool as OpenAI spells it (what chat templates and the tools prompt take)."""
        function: dict[str, Any] = {"name": self.name}
        if self.description is not None:
            function["description"] = self.description
        function["parameters"] = self.parameters
        if self.is_strict:
            function["strict"] = True
        return {"type": "function", "function": function}


@dataclass(frozen=True)
class ToolChoice:
    """What the request lets or makes the model do."""

    # none: never call (output is content); auto: the model decides (parsed);
    # required: at least one call (grammar-forced); function: that one function (forced)
    mode: Literal["none", "auto", "required", "function"]
    # the forced function's name (mode "function" only)
    function_name: str | None = None

    @property
    def is_forced(self) -> bool:
        return self.mode in ("required", "function")


@dataclass(frozen=True)
class ToolRequest:
    """A request's tool fields, checked together."""

    tools: list[FunctionTool]
    choice: ToolChoice
    # may a forced turn hold several calls (OpenAI's default: yes)
    is_parallel: bool

    @property
    def tool_names(self) -> list[str]:
        return [t.name for t in self.tools]

    @property
    def needs_grammar(self) -> bool:
        """Calls are forced, or a strict tool's calls must follow its schema."""
        return self.choice.is_forced or (
            self.choice.mode == "auto" and any(t.is_strict for t in self.tools)
        )


def _check_parameters(schema: Any, field: str) -> dict[str, Any]:
    if schema is None:
        return dict(_NO_PARAMETERS)
    if not isinstance(schema, dict):
        raise ValueError(f"{field} must be a JSON Schema object, got {type(schema).__name__}")
    if schema.get("type") != "object":
        raise ValueError(
            f'{field} must describe an object ("type": "object"): arguments are always '
            "a JSON object"
        )
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as e:
        where = "".join(f"[{p!r}]" for p in e.path)
        raise ValueError(
            f"{field} is not a valid JSON Schema: {e.message} (at {where or '/'})"
        ) from None
    return schema


def parse_tools(tools: Any) -> list[FunctionTool]:
    """`tools` (None: no tools) -> its functions; names unique."""
    if tools is None:
        return []
    if not isinstance(tools, list):
        raise ValueError("tools must be a list of {type: function, function: {...}}")
    out: list[FunctionTool] = []
    first_index: dict[str, int] = {}
    for i, tool in enumerate(tools):
        field = f"tools[{i}]"
        if not isinstance(tool, dict):
            raise ValueError(f"{field} must be an object")
        if tool.get("type") != "function":
            raise ValueError(f"{field}.type must be 'function' (the only tool type supported)")
        function = tool.get("function")
        if not isinstance(function, dict):
            raise ValueError(f"{field}.function must be an object with a name")
        name = function.get("name")
        if not isinstance(name, str) or not _NAME.match(name):
            raise ValueError(
                f"{field}.function.name must be 1-64 letters, digits, '_' or '-', got {name!r}"
            )
        if name in first_index:
            raise ValueError(
                f"{field}.function.name {name!r} is already the name of tools[{first_index[name]}]"
            )
        first_index[name] = i
        description = function.get("description")
        if description is not None and not isinstance(description, str):
            raise ValueError(f"{field}.function.description must be a string")
        parameters = _check_parameters(function.get("parameters"), f"{field}.function.parameters")
        strict = function.get("strict")
        if strict is not None and not isinstance(strict, bool):
            raise ValueError(f"{field}.function.strict must be a boolean")
        out.append(FunctionTool(name, description, parameters, strict is True))
    return out


def parse_tool_choice(tool_choice: Any, tools: list[FunctionTool]) -> ToolChoice:
    """`tool_choice` (None: "auto" with tools, "none" without, as OpenAI) -> ToolChoice."""
    if tool_choice is None:
        return ToolChoice("auto" if tools else "none")
    if isinstance(tool_choice, str):
        if tool_choice not in _MODES:
            raise ValueError(
                f"tool_choice must be 'none', 'auto', 'required' or a named function, "
                f"got {tool_choice!r}"
            )
        if tool_choice != "none" and not tools:
            raise ValueError(f"tool_choice {tool_choice!r} needs tools")
        return ToolChoice(tool_choice)  # type: ignore[arg-type]
    if not isinstance(tool_choice, dict) or tool_choice.get("type") != "function":
        raise ValueError('tool_choice must be a string or {"type": "function", "function": {...}}')
    function = tool_choice.get("function")
    name = function.get("name") if isinstance(function, dict) else None
    if not isinstance(name, str):
        raise ValueError("tool_choice.function.name is required")
    names = [t.name for t in tools]
    if name not in names:
        raise ValueError(
            f"tool_choice.function.name {name!r} is not one of the tools' names {names}"
        )
    return ToolChoice("function", name)


def parse_tool_request(
    tools: Any, tool_choice: Any = None, parallel_tool_calls: Any = None
) -> ToolRequest:
    """The three fields together (parallel_tool_calls None: true, OpenAI's default)."""
    parsed = parse_tools(tools)
    choice = parse_tool_choice(tool_choice, parsed)
    if parallel_tool_calls is not None and not isinstance(parallel_tool_calls, bool):
        raise ValueError("parallel_tool_calls must be a boolean")
    return ToolRequest(parsed, choice, parallel_tool_calls is not False)
