"""Llama-3.1 JSON tool calls: `{"name": ..., "parameters": {...}}`, the whole assistant turn.

Llama 3.1/3.2 templates ask for exactly this ("Respond in the format {"name": function name,
"parameters": dictionary of argument name and its value}"), optionally after the
`<|python_tag|>` token; several calls are separated by `;`.

NOTE on the rules (shared by parse() and the stream): an output that starts (after
whitespace) with `{` or `<|python_tag|>` is a tool-call turn if it is nothing but one or more
such objects with a string "name" (one of the tools' when known) and an object "parameters"
("arguments" accepted too), separated by `;` (a trailing `;` is fine). Otherwise the whole
text is content, unchanged. A turn that may be calls is therefore held back by the stream
until the output ends (it is all calls or all content); any other turn streams as it comes.
"""

from __future__ import annotations

from server.tools.base import ToolCallStream, ToolParser
from server.tools.calls import STRICT_JSON, ParsedToolCalls, StreamDelta, arguments_json

PYTHON_TAG = "<|python_tag|>"


class Llama3JsonToolParser(ToolParser):
    name = "llama3_json"
    forced_call_prefix = ""
    forced_call_suffix = ""
    forced_call_separator = "; "
    forced_arguments_key = "parameters"
    # the parser reads a turn with or without <|python_tag|> (a special token that
    # skip_special_tokens=True drops), so it needs no tag kept
    tags = ()

    def parse_calls(self, text: str) -> list[tuple[str, str]] | None:
        """The calls of a whole turn, or None when it is not (only) calls."""
        s = text.lstrip()
        if s.startswith(PYTHON_TAG):
            s = s[len(PYTHON_TAG) :]
        elif not s.startswith("{"):
            return None
        calls: list[tuple[str, str]] = []
        pos = _skip_ws(s, 0)
        while pos < len(s):
            if calls:
                if s[pos] != ";":
                    return None
                pos = _skip_ws(s, pos + 1)
                if pos == len(s):
                    break
            try:
                obj, pos = STRICT_JSON.raw_decode(s, pos)
            except ValueError:
                return None
            if not isinstance(obj, dict) or not self._check_name(obj.get("name")):
                return None
            args = obj["parameters"] if "parameters" in obj else obj.get("arguments", {})
            arguments = arguments_json(args)
            if arguments is None:
                return None
            calls.append((obj["name"], arguments))
            pos = _skip_ws(s, pos)
        return calls or None

    def parse(self, text: str, id_prefix: str) -> ParsedToolCalls:
        calls = self.parse_calls(text)
        if calls is None:
            return ParsedToolCalls(text or None, [])
        return ParsedToolCalls(None, self._calls(calls, id_prefix))

    def stream(self, id_prefix: str) -> Llama3JsonToolCallStream:
        return Llama3JsonToolCallStream(self, id_prefix)


def _skip_ws(s: str, pos: int) -> int:
    while pos < len(s) and s[pos] in " \t\n\r":
        pos += 1
    return pos


class Llama3JsonToolCallStream(ToolCallStream):
    """Holds the turn while it may still be calls (leading whitespace, a prefix of
    `<|python_tag|>`, or anything starting with `{` or the tag); then streams content."""

    parser: Llama3JsonToolParser

    def __init__(self, parser: Llama3JsonToolParser, id_prefix: str) -> None:
        super().__init__(parser, id_prefix)
        self._buf = ""
        # decided: the turn is content (everything streams from now on)
        self._is_content = False
        # decided: the turn may be calls (held whole until finish)
        self._is_candidate = False

    def feed(self, text: str) -> StreamDelta:
        out = StreamDelta()
        if self._is_content:
            self._release(out, text)
            return out
        self._buf += text
        if self._is_candidate:
            return out
        s = self._buf.lstrip()
        if s.startswith("{") or s.startswith(PYTHON_TAG):
            self._is_candidate = True
            return out
        if not s or PYTHON_TAG.startswith(s):
            return out
        self._is_content = True
        self._release(out, self._buf)
        self._buf = ""
        return out

    def finish(self) -> StreamDelta:
        out = StreamDelta()
        if self._is_content or not self._buf:
            return out
        calls = self.parser.parse_calls(self._buf)
        if calls is None:
            self._release(out, self._buf)
        else:
            for call in calls:
                self._release(out, call=call)
        self._buf = ""
        return out
