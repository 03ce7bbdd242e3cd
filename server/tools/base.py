"""The interface every tool-call parser implements (one per chat-template family).

A parser is built once per request (it knows the request's tool names); parse() takes a
finished output, stream() returns a ToolCallStream for one streamed choice.

NOTE on THE invariant (tested by a property test over random texts and random delta
splittings): joining a stream's content deltas gives byte for byte parse().content (None
when empty), and its tool-call deltas give exactly parse().tool_calls (names, arguments,
ids, order). A stream therefore releases a call only once no later text can change it: at
its closing tag, or at the end. Argument fragments of a call that may still turn out
malformed are never sent, so nothing sent is ever wrong, and nothing is lost (vllm#22885).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Collection
from typing import ClassVar

from server.tools.calls import ParsedToolCalls, StreamDelta, ToolCall, tool_call_id


class ToolCallStream(ABC):
    """Incremental parser of one choice: feed() each text delta, finish() once at the end."""

    def __init__(self, parser: ToolParser, id_prefix: str) -> None:
        self.parser = parser
        self.id_prefix = id_prefix
        # the calls released so far, in order
        self.tool_calls: list[ToolCall] = []
        # all content released so far (the non-streamed message.content, once finished)
        self._content: list[str] = []

    @abstractmethod
    def feed(self, text: str) -> StreamDelta:
        """Adds a text delta; returns what may be sent now (held-back text stays inside)."""

    @abstractmethod
    def finish(self) -> StreamDelta:
        """The output ended: releases everything still held back."""

    @property
    def content(self) -> str | None:
        """The content released so far (None when empty), as ParsedToolCalls.content."""
        return "".join(self._content) or None

    def _release(
        self, delta: StreamDelta, content: str = "", call: tuple[str, str] | None = None
    ) -> None:
        """Adds content and/or one parsed (name, arguments) call to `delta`."""
        if content:
            delta.content += content
            self._content.append(content)
        if call is not None:
            index = len(self.tool_calls)
            tc = ToolCall(tool_call_id(self.id_prefix, index), call[0], call[1])
            self.tool_calls.append(tc)
            delta.tool_calls.extend(tc.stream_deltas(index))


class ToolParser(ABC):
    """One template family's tool-call format."""

    # the --tool-call-parser name
    name: ClassVar[str]

    def __init__(self, tool_names: Collection[str] | None = None) -> None:
        # a call to a function not among these is not a call (it stays content); None: any
        self.tool_names = frozenset(tool_names) if tool_names is not None else None

    @abstractmethod
    def parse(self, text: str, id_prefix: str) -> ParsedToolCalls:
        """A finished output -> its content and calls (malformed calls stay content)."""

    @abstractmethod
    def stream(self, id_prefix: str) -> ToolCallStream:
        """A streaming parser for one choice, with the same result as parse()."""

    # how grammar.py writes forced calls in this format, so parse() reads them back: the
    # text before each call's JSON object, the text after it, and between parallel calls
    forced_call_prefix: ClassVar[str]
    forced_call_suffix: ClassVar[str]
    forced_call_separator: ClassVar[str]
    # the key of the arguments object in a forced call ("arguments" or "parameters")
    forced_arguments_key: ClassVar[str]
    # the tags the parser must see in the text (parsers.needs_special_tokens checks them)
    tags: ClassVar[tuple[str, ...]]

    def _check_name(self, name: object) -> bool:
        return (
            isinstance(name, str)
            and bool(name)
            and (self.tool_names is None or name in self.tool_names)
        )

    def _calls(self, pairs: list[tuple[str, str]], id_prefix: str) -> list[ToolCall]:
        return [ToolCall(tool_call_id(id_prefix, i), n, a) for i, (n, a) in enumerate(pairs)]
