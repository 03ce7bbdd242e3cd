"""tool_choice "required" / a named function -> a Lark grammar (llguidance's dialect) that
forces the tool-call parser's own format, so every forced call parses and its arguments
validate against the function's schema.

The grammar is text for the structured-output layer (jaxserve/structured_output/), which
compiles it like any `grammar` request; it accepts exactly:
  PREFIX {"name": "<a tool's name>", "arguments": <that tool's parameters>} SUFFIX
(Hermes: "<tool_call>\\n" ... "\\n</tool_call>"; Llama-3.1: the bare object, "parameters"),
once, or up to MAX_PARALLEL_CALLS times separated by the format's separator when the
request allows parallel calls (named function: exactly one call). JSON whitespace is fixed
(", " and ": ", no newlines), so a forced call cannot run on in whitespace to max_tokens.

NOTE on $ref: a tool's schema is embedded as the "arguments" property of the call object,
so its local references ("#/$defs/X", "#") are rewritten to point inside it.
"""

from __future__ import annotations

import copy
import json
from typing import Any

import llguidance

from server.tools.base import ToolParser
from server.tools.definitions import FunctionTool, ToolChoice

# A forced turn holds at most this many calls (a bound, so sampling cannot loop forever).
MAX_PARALLEL_CALLS = 8
# Canonical JSON spacing, json.dumps' (what parse() writes back as the arguments text).
_JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def _rebase_refs(node: Any, base: str) -> Any:
    if isinstance(node, dict):
        out = {k: _rebase_refs(v, base) for k, v in node.items()}
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.startswith("#"):
            out["$ref"] = base + ref[1:]
        return out
    if isinstance(node, list):
        return [_rebase_refs(v, base) for v in node]
    return node


def call_schema(tool: FunctionTool, arguments_key: str = "arguments") -> dict[str, Any]:
    """The JSON Schema of one call object of `tool`: its name, then its arguments."""
    parameters = _rebase_refs(copy.deepcopy(tool.parameters), f"#/properties/{arguments_key}")
    return {
        "type": "object",
        "properties": {"name": {"const": tool.name}, arguments_key: parameters},
        "required": ["name", arguments_key],
        "additionalProperties": False,
        "x-guidance": _JSON_OPTIONS,
    }


def forced_tool_grammar(
    parser: ToolParser, tools: list[FunctionTool], choice: ToolChoice, *, is_parallel: bool
) -> str | None:
    """The grammar forcing `choice` in `parser`'s format; None when nothing is forced.

    Raises ValueError naming tools[i].function.parameters when llguidance cannot enforce a
    candidate tool's schema (a 400 before the request takes a KV block)."""
    if not choice.is_forced:
        return None
    candidates = [
        (i, t)
        for i, t in enumerate(tools)
        if choice.mode == "required" or t.name == choice.function_name
    ]
    if not candidates:
        raise ValueError("tool_choice needs tools")
    rules = []
    for i, tool in candidates:
        schema = call_schema(tool, parser.forced_arguments_key)
        rule = f"call_{i}: %json {json.dumps(schema)}"
        error = llguidance.LLMatcher.validate_grammar(f"start: {rule.split(':', 1)[1]}")
        if error:
            raise ValueError(
                f"tools[{i}].function.parameters cannot be enforced for tool_choice: "
                + error.strip()
            )
        rules.append(rule)
    prefix, suffix = parser.forced_call_prefix, parser.forced_call_suffix
    call = " | ".join(f"call_{i}" for i, _ in candidates)
    wrapped = " ".join(p for p in (_lit(prefix), f"({call})", _lit(suffix)) if p)
    num_calls = MAX_PARALLEL_CALLS if is_parallel and choice.mode == "required" else 1
    more = f" ({_lit(parser.forced_call_separator)} one_call){{0,{num_calls - 1}}}"
    lines = [
        "start: one_call" + (more if num_calls > 1 else ""),
        f"one_call: {wrapped}",
        *rules,
    ]
    return "\n".join(lines) + "\n"


def _lit(text: str) -> str:
    """A Lark string literal ("" -> no literal at all)."""
    return json.dumps(text) if text else ""
