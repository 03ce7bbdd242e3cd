"""What the server decides once, at startup, about rendering chats and reading their output:
the chat template (--chat-template or the model's), what it does with tools (probed by
rendering), the tool-call parser (--tool-call-parser, `auto` detected from the template) and
the reasoning parser (--reasoning-parser).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from server.tools.base import ToolParser
from server.tools.hermes import HermesToolParser
from server.tools.parsers import TOOL_PARSER_CHOICES, needs_special_tokens, resolve_tool_parser
from server.tools.prompting import TemplateToolSupport, probe_template
from server.tools.reasoning import (
    ReasoningParser,
    check_tags_survive_decoding,
    reasoning_tags_from_tokenizer,
)

# --reasoning-parser names (vLLM's): both families write <think>...</think>
REASONING_PARSER_CHOICES = ("deepseek_r1", "qwen3")


@dataclass(frozen=True)
class ChatConfig:
    """The server's chat rendering and output parsing, fixed for its lifetime."""

    # the template chats render with (None: the tokenizer's own, or none at all)
    template: str | None = None
    # what the template does with tools, assistant tool_calls and tool messages
    tool_support: TemplateToolSupport = TemplateToolSupport(False, False)
    # None: requests with tools (other than tool_choice "none") are refused, naming `tools`
    tool_parser: type[ToolParser] | None = None
    # the parser's tags are special tokens: detokenize tool requests keeping them
    tool_needs_special_tokens: bool = False
    # None: no --reasoning-parser (the output is all content)
    reasoning_parser: ReasoningParser | None = None


def load_chat_template(value: str | None) -> str | None:
    """--chat-template: a file's path, or the template text itself (it holds `{{` or `{%`)."""
    if value is None:
        return None
    if os.path.isfile(value):
        with open(value, encoding="utf-8") as f:
            return f.read()
    if "{{" in value or "{%" in value:
        return value
    raise ValueError(f"{value!r} is neither a file nor a Jinja template")


def make_chat_config(
    tokenizer: Any,
    *,
    chat_template: str | None = None,
    tool_call_parser: str = "auto",
    reasoning_parser: str | None = None,
) -> ChatConfig:
    """The config for this tokenizer; ValueError (naming the flag) for a bad flag value."""
    if tool_call_parser not in TOOL_PARSER_CHOICES:
        raise ValueError(
            f"--tool-call-parser must be one of {list(TOOL_PARSER_CHOICES)}, "
            f"got {tool_call_parser!r}"
        )
    template = chat_template if chat_template is not None else tokenizer.chat_template
    if not isinstance(template, str):
        # no template (chat requests get a 400 when they render) or a named-template dict
        return ChatConfig(chat_template, reasoning_parser=_reasoning(tokenizer, reasoning_parser))
    support = probe_template(tokenizer, template)
    parser = resolve_tool_parser(tool_call_parser, template, renders_tools=support.renders_tools)
    if not support.renders_tools and parser is not None and parser is not HermesToolParser:
        # the tools then go into the system turn, which asks for hermes blocks
        raise ValueError(
            f"--tool-call-parser {tool_call_parser}: the chat template ignores tools, so they "
            "are described in the system turn in the hermes format; use hermes or auto, or a "
            "--chat-template that renders tools"
        )
    return ChatConfig(
        template=chat_template,
        tool_support=support,
        tool_parser=parser,
        tool_needs_special_tokens=parser is not None and needs_special_tokens(tokenizer, parser),
        reasoning_parser=_reasoning(tokenizer, reasoning_parser),
    )


def _reasoning(tokenizer: Any, name: str | None) -> ReasoningParser | None:
    if name is None:
        return None
    if name not in REASONING_PARSER_CHOICES:
        raise ValueError(
            f"--reasoning-parser must be one of {list(REASONING_PARSER_CHOICES)}, got {name!r}"
        )
    tags = reasoning_tags_from_tokenizer(tokenizer)
    check_tags_survive_decoding(tokenizer, tags)
    return ReasoningParser(tags)
