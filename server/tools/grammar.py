"""Tool requests that need constrained decoding -> a Lark grammar (llguidance's dialect) in
the tool-call parser's own format, so every call parses and its arguments validate against
the function's schema: tool_choice "required" / a named function (forced calls), and
tool_choice "auto" with `strict` tools (free text, but each opened call is held to it).

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
from server.tools.definitions import FunctionTool, ToolChoice, ToolRequest

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


def _call_rules(
    parser: ToolParser, tools: list[tuple[int, FunctionTool]], *, is_lenient: bool = False
) -> list[str]:
    """One `call_<i>: %json {...}` rule per (index, tool); checked by llguidance, so a schema
    it cannot enforce is a ValueError naming tools[i].function.parameters. is_lenient: a
    non-strict tool's arguments are any object (strict auto: only strict tools are held to
    their schemas)."""
    rules = []
    for i, tool in tools:
        if is_lenient and not tool.is_strict:
            tool = FunctionTool(tool.name, tool.description, {"type": "object"})
        schema = call_schema(tool, parser.forced_arguments_key)
        body = f"%json {json.dumps(schema)}"
        error = llguidance.LLMatcher.validate_grammar(f"start: {body}")
        if error:
            raise ValueError(
                f"tools[{i}].function.parameters cannot be enforced by a grammar: " + error.strip()
            )
        rules.append(f"call_{i}: {body}")
    return rules


def _one_call(parser: ToolParser, indexes: list[int]) -> str:
    """The `one_call` rule: PREFIX (call_i | call_j ...) SUFFIX."""
    calls = " | ".join(f"call_{i}" for i in indexes)
    parts = (_lit(parser.forced_call_prefix), f"({calls})", _lit(parser.forced_call_suffix))
    return "one_call: " + " ".join(p for p in parts if p)


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
    num_calls = MAX_PARALLEL_CALLS if is_parallel and choice.mode == "required" else 1
    more = f" ({_lit(parser.forced_call_separator)} one_call){{0,{num_calls - 1}}}"
    lines = [
        "start: one_call" + (more if num_calls > 1 else ""),
        _one_call(parser, [i for i, _ in candidates]),
        *_call_rules(parser, candidates),
    ]
    return "\n".join(lines) + "\n"


def _lit(text: str) -> str:
    """A Lark string literal ("" -> no literal at all)."""
    return json.dumps(text) if text else ""


def strict_auto_tool_grammar(parser: ToolParser, tools: list[FunctionTool]) -> str:
    """tool_choice "auto" with strict tools: free text, but every `<tool_call>` the model
    opens must hold a valid call (a strict tool's arguments follow its schema, any other
    tool's are an object). The trigger is lazy (llguidance matches it in the text, however
    it is tokenized), as llguidance's StructTag does. Hermes format only: a Llama-3.1 turn
    is calls or text from its first character, which a lazy trigger cannot express."""
    from server.tools.hermes import HermesToolParser

    if not isinstance(parser, HermesToolParser):
        first = next(i for i, t in enumerate(tools) if t.is_strict)
        raise ValueError(
            f"tools[{first}].function.strict with tool_choice 'auto' needs the hermes "
            f"tool-call format (this server parses {parser.name}); use tool_choice 'required'"
        )
    indexed = list(enumerate(tools))
    calls = " | ".join(f"call_{i}" for i, _ in indexed)
    lines = [
        "start: tagged_call* TEXT",
        "tagged_call: call_trigger call_body",
        f"call_trigger[lazy]: TEXT {_lit(parser.forced_call_prefix.rstrip())}",
        f'call_body: "\\n"? ({calls}) "\\n"? {_lit(parser.forced_call_suffix.lstrip())}',
        "TEXT: /(.|\\n)*/",
        *_call_rules(parser, indexed, is_lenient=True),
    ]
    return "\n".join(lines) + "\n"


def tool_grammar(parser: ToolParser, request: ToolRequest) -> str | None:
    """The grammar a tool request needs (None: none, the output is only parsed)."""
    if request.choice.is_forced:
        return forced_tool_grammar(
            parser, request.tools, request.choice, is_parallel=request.is_parallel
        )
    if request.needs_grammar:
        return strict_auto_tool_grammar(parser, request.tools)
    return None
