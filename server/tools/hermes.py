"""Hermes-style tool calls: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`.

The format of Qwen2.5, Hermes and the SmolLM2 family, and the one prompting.py teaches
templates that ignore `tools`. Several calls may follow each other (parallel calls); text
around them is content.

NOTE on the rules (parse() and the stream share them, so they agree on every text):
- A call is `<tool_call>` BODY `</tool_call>` where BODY is one JSON object with a string
  "name" (one of the tools' when known) and an object "arguments" ("parameters" accepted
  too, missing means {}). Anything else, closing tag included, stays content, as written.
- An unclosed `<tool_call>` at the very end is a call if its body is complete (models often
  stop right after the JSON); else it is content.
- Content is the text outside calls, as written, except that a piece of it holding only
  whitespace is dropped when the output has calls (the "\n" between two calls is no content);
  None when nothing is left.
"""

from __future__ import annotations

from server.tools.base import ToolCallStream, ToolParser
from server.tools.calls import (
    ParsedToolCalls,
    StreamDelta,
    arguments_json,
    loads_strict,
    partial_suffix_len,
)

START = "<tool_call>"
END = "</tool_call>"


class HermesToolParser(ToolParser):
    name = "hermes"
    forced_call_prefix = START + "\n"
    forced_call_suffix = "\n" + END
    forced_call_separator = "\n"
    forced_arguments_key = "arguments"
    tags = (START, END)

    def parse_call(self, body: str) -> tuple[str, str] | None:
        """One call's body -> (name, arguments JSON), or None when it is not a valid call."""
        try:
            obj = loads_strict(body)
        except ValueError:
            return None
        if not isinstance(obj, dict) or not self._check_name(obj.get("name")):
            return None
        args = obj["arguments"] if "arguments" in obj else obj.get("parameters", {})
        arguments = arguments_json(args)
        return None if arguments is None else (obj["name"], arguments)

    def parse(self, text: str, id_prefix: str) -> ParsedToolCalls:
        # segments[k] is the text between call k-1 and call k
        segments: list[str] = []
        calls: list[tuple[str, str]] = []
        seg_start = pos = 0
        while (i := text.find(START, pos)) >= 0:
            j = text.find(END, i + len(START))
            body = text[i + len(START) : j if j >= 0 else len(text)]
            call = self.parse_call(body)
            if call is None:
                if j < 0:
                    break
                pos = j + len(END)  # a malformed call is content; look past it
                continue
            segments.append(text[seg_start:i])
            calls.append(call)
            seg_start = pos = j + len(END) if j >= 0 else len(text)
        segments.append(text[seg_start:])
        if not calls:
            return ParsedToolCalls(text or None, [])
        content = "".join(piece for piece in segments if not _is_blank(piece))
        return ParsedToolCalls(content or None, self._calls(calls, id_prefix))

    def stream(self, id_prefix: str) -> HermesToolCallStream:
        return HermesToolCallStream(self, id_prefix)


class HermesToolCallStream(ToolCallStream):
    """Content streams as it comes, minus a tail that may start `<tool_call>` and a piece
    that is whitespace so far (dropped if a call follows); a call is released whole at its
    `</tool_call>` (or at the end, when unclosed)."""

    parser: HermesToolParser

    def __init__(self, parser: HermesToolParser, id_prefix: str) -> None:
        super().__init__(parser, id_prefix)
        # text mode: text not yet released; call mode: the body of the open call so far
        self._buf = ""
        self._is_in_call = False
        # the current text piece (since the last call) has released non-whitespace text
        self._piece_has_text = False
        # a whitespace piece held before the open `<tool_call>`: content if the call is not
        self._ws_before_call = ""
        # call mode: `</tool_call>` cannot start before this offset of the body (already
        # searched), so each delta costs its own length, not the body's
        self._scan_from = 0

    def feed(self, text: str) -> StreamDelta:
        self._buf += text
        return self._drain(is_final=False)

    def finish(self) -> StreamDelta:
        return self._drain(is_final=True)

    def _release_text(self, out: StreamDelta, text: str) -> None:
        self._release(out, text)
        self._piece_has_text = True

    def _drain(self, *, is_final: bool) -> StreamDelta:
        out = StreamDelta()
        while True:
            if self._is_in_call:
                j = self._buf.find(END, self._scan_from)
                if j < 0 and not is_final:
                    self._scan_from = max(len(self._buf) - len(END) + 1, 0)
                    return out
                body = self._buf[:j] if j >= 0 else self._buf
                call = self.parser.parse_call(body)
                rest = self._buf[j + len(END) :] if j >= 0 else ""
                if call is not None:
                    self._release(out, call=call)
                    self._piece_has_text = False
                else:
                    raw = START + body + (END if j >= 0 else "")
                    self._release_text(out, self._ws_before_call + raw)
                self._ws_before_call, self._buf, self._is_in_call = "", rest, False
                self._scan_from = 0
                if j < 0:
                    return out
                continue
            i = self._buf.find(START)
            if i >= 0:
                piece = self._buf[:i]
                if self._piece_has_text or not _is_blank(piece):
                    self._release_text(out, piece)
                else:
                    self._ws_before_call = piece
                self._buf, self._is_in_call = self._buf[i + len(START) :], True
                continue
            if is_final:
                if self._piece_has_text or not _is_blank(self._buf) or not self.tool_calls:
                    self._release_text(out, self._buf)
                self._buf = ""
                return out
            cut = len(self._buf) - partial_suffix_len(self._buf, START)
            if self._piece_has_text or not _is_blank(self._buf[:cut]):
                self._release_text(out, self._buf[:cut])
                self._buf = self._buf[cut:]
            return out


def _is_blank(text: str) -> bool:
    """Empty or whitespace only (str.isspace() is False for "")."""
    return not text or text.isspace()
