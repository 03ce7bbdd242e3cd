"""What a tool-call parser returns: calls, the content around them, streamed deltas, ids.

Both parsers (hermes.py, llama3_json.py) produce these types, so the chat handler folds any
parser's output the same way. Deltas are already OpenAI-shaped dicts (`delta.tool_calls`).

NOTE on ids: a call's id is `<prefix>_<index>` with the prefix from tool_call_id_prefix(request
id, choice index): a hash, so it is deterministic for one choice of one request (the streamed
and the non-streamed parse of the same text give the same ids) and different across choices
and requests, as OpenAI's `call_...` ids are. Clients only echo ids back in `tool_call_id`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class ToolCall:
    """One parsed function call."""

    # "<prefix>_<index>" (see the module docstring)
    id: str
    # the function's name, as the model wrote it (one of the tools' names when they are known)
    name: str
    # the arguments object as JSON text: always valid JSON, always an object
    arguments: str

    def to_openai(self) -> dict[str, Any]:
        """The `message.tool_calls[i]` item of a non-streamed chat response."""
        return {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }

    def stream_deltas(self, index: int) -> list[dict[str, Any]]:
        """The `delta.tool_calls` items that stream this call: the id, type and name first
        (arguments ""), then the arguments. Clients join argument fragments per index."""
        return [
            {
                "index": index,
                "id": self.id,
                "type": "function",
                "function": {"name": self.name, "arguments": ""},
            },
            {"index": index, "function": {"arguments": self.arguments}},
        ]


@dataclass(frozen=True)
class ParsedToolCalls:
    """A whole output, parsed (non-streaming)."""

    # the text outside the calls; None when there is none (OpenAI sends null then)
    content: str | None
    # in output order; empty when the model called nothing (or every call was malformed)
    tool_calls: list[ToolCall]


@dataclass
class StreamDelta:
    """What one feed() / finish() of a streaming parser releases."""

    # content text to send now ("" for none)
    content: str = ""
    # OpenAI `delta.tool_calls` items to send now, in order
    tool_calls: list[dict[str, Any]] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.content or self.tool_calls)


def tool_call_id_prefix(request_id: str, choice_index: int) -> str:
    """The id prefix of one choice's calls: `call_` + 24 hex digits of a hash of both."""
    digest = hashlib.sha256(f"{request_id}/{choice_index}".encode()).hexdigest()
    return "call_" + digest[:24]


def tool_call_id(prefix: str, index: int) -> str:
    return f"{prefix}_{index}"


def finish_reason_with_tools(finish_reason: str | None, num_tool_calls: int) -> str | None:
    """OpenAI's finish_reason for a chat choice: "tool_calls" when the model stopped by itself
    after calling at least one function; a length cut or an abort keeps its own reason."""
    if finish_reason == "stop" and num_tool_calls > 0:
        return "tool_calls"
    return finish_reason


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


# json's decoder without Python's NaN / Infinity extensions (they are not JSON)
STRICT_JSON = json.JSONDecoder(parse_constant=_reject_constant)


def loads_strict(text: str) -> Any:
    """json.loads, refusing NaN / Infinity."""
    return STRICT_JSON.decode(text)


def arguments_json(arguments: Any) -> str | None:
    """A call's arguments as canonical JSON text, or None when they are not a JSON object.

    A string holding an object is accepted too (some models double-encode). The text is
    json.dumps' (", " and ": " separators, non-ASCII kept), so both parse paths agree on it.
    """
    if isinstance(arguments, str):
        try:
            arguments = loads_strict(arguments)
        except ValueError:
            return None
    if not isinstance(arguments, dict):
        return None
    text = json.dumps(arguments, ensure_ascii=False)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        # a lone surrogate escape ("\ud800") decodes to a str that cannot go on the wire
        return None
    return text


def partial_suffix_len(text: str, tag: str) -> int:
    """Length of the longest tail of `text` that is a proper prefix of `tag`: the text a
    streaming parser must hold back, since the next delta may complete the tag."""
    for k in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-k:]):
            return k
    return 0
