"""The chat request's tool fields as msgspec Structs, for server/protocol.py to declare on
ChatBody and Message (so decoding checks their shape and /openapi.json documents them).

Shapes only; what spans fields (unique names, known tool_choice name, JSON Schema
parameters) is definitions.py's, which takes msgspec.to_builtins() of these. Kept apart from
server/protocol.py's `_Body` (same options) so that module can import this one without a cycle.

ChatBody gains:  tools: list[Tool] | None, tool_choice: ToolChoiceField | None,
                 parallel_tool_calls: bool | None
Message gains:   tool_calls: list[MessageToolCall] | None, tool_call_id: str | None, and
                 content may be None (an assistant turn that only calls tools).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

# OpenAI's rule for function names
FunctionName = Annotated[str, Meta(pattern=r"^[A-Za-z0-9_-]{1,64}$")]
# tools per request: each one's schema is compiled when a call is forced
MAX_TOOLS = 128
# a tool_call_id / call id is a label clients echo back, not a payload
CallId = Annotated[str, Meta(min_length=1, max_length=256)]


class _Struct(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Unknown fields refused, fields by keyword only (as server/protocol.py's bodies)."""


class FunctionDefinition(_Struct, kw_only=True):
    name: FunctionName
    description: str | None = None
    # the arguments' JSON Schema ({"type": "object", ...}); None: no arguments
    parameters: dict[str, Any] | None = None
    # the arguments must follow the schema even when the model chooses to call (auto):
    # enforced by grammar.py's lazy grammar (the openai SDK's pydantic_function_tool sets it)
    strict: bool | None = None


class Tool(_Struct, kw_only=True):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(_Struct, kw_only=True):
    name: str


class NamedToolChoice(_Struct, kw_only=True):
    """{"type": "function", "function": {"name": ...}}: that function must be called."""

    type: Literal["function"]
    function: NamedFunction


ToolChoiceField = Literal["none", "auto", "required"] | NamedToolChoice
Tools = Annotated[list[Tool], Meta(max_length=MAX_TOOLS)]


class ToolCallFunction(_Struct, kw_only=True):
    name: str
    # the arguments object as JSON text (as OpenAI sends it back)
    arguments: str


class MessageToolCall(_Struct, kw_only=True):
    """An assistant message's past call."""

    id: CallId
    type: Literal["function"] = "function"
    function: ToolCallFunction
