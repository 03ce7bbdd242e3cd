"""One chat choice's generated text -> its message fields (reasoning_content, content,
tool_calls), whole or streamed: the reasoning parser runs first and the tool parser reads
its content, so a model that thinks and then calls tools is handled in one pass.

The chat handler builds one ChatOutputParsers per request and, per choice, either
parse_chat_output() on the final text or a ChatOutputStream fed each text delta. Streamed
deltas joined == the whole parse, since each stage keeps that property (tested).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from server.tools.base import ToolParser
from server.tools.calls import ToolCall, finish_reason_with_tools
from server.tools.reasoning import ReasoningParser


@dataclass(frozen=True)
class ChatOutputParsers:
    """What a request's output goes through (both None: the text is the content, as today)."""

    # None: the request has no tools, or tool_choice "none" (calls are then only text)
    tool_parser: ToolParser | None = None
    # None: the server runs without --reasoning-parser
    reasoning_parser: ReasoningParser | None = None
    # the prompt left `<think>` open (reasoning.prompt_opens_reasoning)
    starts_in_reasoning: bool = False


@dataclass
class ChatMessage:
    """A finished choice's message fields."""

    content: str | None
    reasoning_content: str | None = None
    tool_calls: list[ToolCall] = field(default_factory=list)

    def to_openai(self, parsers: ChatOutputParsers) -> dict[str, Any]:
        """`choices[i].message`: reasoning_content when a reasoning parser runs, tool_calls
        when there are any (content is then null unless the model also wrote text)."""
        message: dict[str, Any] = {"role": "assistant", "content": self.content}
        if parsers.reasoning_parser is not None:
            message["reasoning_content"] = self.reasoning_content
        if self.tool_calls:
            message["tool_calls"] = [c.to_openai() for c in self.tool_calls]
        return message

    def finish_reason(self, finish_reason: str | None) -> str | None:
        return finish_reason_with_tools(finish_reason, len(self.tool_calls))


def parse_chat_output(parsers: ChatOutputParsers, text: str, id_prefix: str) -> ChatMessage:
    """The whole text of one choice -> its message fields."""
    reasoning = None
    content: str | None = text or None
    if parsers.reasoning_parser is not None:
        split = parsers.reasoning_parser.parse(
            text, starts_in_reasoning=parsers.starts_in_reasoning
        )
        reasoning, content = split.reasoning_content, split.content
    if parsers.tool_parser is None:
        return ChatMessage(content, reasoning)
    parsed = parsers.tool_parser.parse(content or "", id_prefix)
    return ChatMessage(parsed.content, reasoning, parsed.tool_calls)


class ChatOutputStream:
    """One streamed choice: feed() each text delta, finish() once; each returns the OpenAI
    `delta` fields to send now ({} for nothing): reasoning_content, content, tool_calls."""

    def __init__(self, parsers: ChatOutputParsers, id_prefix: str) -> None:
        self.parsers = parsers
        self._reasoning = (
            parsers.reasoning_parser.stream(starts_in_reasoning=parsers.starts_in_reasoning)
            if parsers.reasoning_parser is not None
            else None
        )
        self._tools = parsers.tool_parser.stream(id_prefix) if parsers.tool_parser else None

    @property
    def tool_calls(self) -> list[ToolCall]:
        """The calls sent so far (all of them, after finish())."""
        return self._tools.tool_calls if self._tools is not None else []

    def finish_reason(self, finish_reason: str | None) -> str | None:
        """The wire finish_reason, once finish() has run ("tool_calls" after calls)."""
        return finish_reason_with_tools(finish_reason, len(self.tool_calls))

    def feed(self, text: str) -> dict[str, Any]:
        return self._step(text, is_final=False)

    def finish(self) -> dict[str, Any]:
        return self._step("", is_final=True)

    def _step(self, text: str, *, is_final: bool) -> dict[str, Any]:
        delta: dict[str, Any] = {}
        content = text
        if self._reasoning is not None:
            r = self._reasoning.finish() if is_final else self._reasoning.feed(text)
            if r.reasoning_content:
                delta["reasoning_content"] = r.reasoning_content
            content = r.content
        if self._tools is None:
            if content:
                delta["content"] = content
            return delta
        t = self._tools.feed(content) if content else None
        parts = [t] if t is not None else []
        if is_final:
            parts.append(self._tools.finish())
        text_out = "".join(p.content for p in parts)
        calls = [d for p in parts for d in p.tool_calls]
        if text_out:
            delta["content"] = text_out
        if calls:
            delta["tool_calls"] = calls
        return delta
