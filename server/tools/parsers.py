"""`--tool-call-parser hermes|llama3_json|auto`: the parser class for the served template.

NOTE on `auto` (decided once, from the chat template the server renders with): a template
that ignores `tools` gets the tools prompt of prompting.py, which asks for Hermes blocks, so
hermes. Otherwise the template's own instructions say the format: `<tool_call>` (Qwen2.5,
Hermes, SmolLM3) -> hermes; `<|python_tag|>` or a `"parameters"` call format (Llama 3.1 /
3.2) -> llama3_json. A template that renders tools in neither format gets None: tool
requests are then refused (400 naming `tools`) rather than parsed in a format the model was
not asked for; --tool-call-parser names one explicitly.
"""

from __future__ import annotations

from typing import Any

from server.tools.base import ToolParser
from server.tools.hermes import START, HermesToolParser
from server.tools.llama3_json import PYTHON_TAG, Llama3JsonToolParser

TOOL_PARSERS: dict[str, type[ToolParser]] = {
    HermesToolParser.name: HermesToolParser,
    Llama3JsonToolParser.name: Llama3JsonToolParser,
}
TOOL_PARSER_CHOICES = ("auto", *TOOL_PARSERS)


def detect_tool_parser(chat_template: str, *, renders_tools: bool) -> type[ToolParser] | None:
    """The parser a template's tool format needs (None: not a format we know)."""
    if not renders_tools or START in chat_template:
        return HermesToolParser
    if PYTHON_TAG in chat_template or '"parameters"' in chat_template:
        return Llama3JsonToolParser
    return None


def resolve_tool_parser(
    name: str, chat_template: str, *, renders_tools: bool
) -> type[ToolParser] | None:
    """--tool-call-parser's value -> the parser class (ValueError for an unknown name)."""
    if name == "auto":
        return detect_tool_parser(chat_template, renders_tools=renders_tools)
    if name not in TOOL_PARSERS:
        raise ValueError(
            f"--tool-call-parser must be one of {list(TOOL_PARSER_CHOICES)}, got {name!r}"
        )
    return TOOL_PARSERS[name]


def needs_special_tokens(tokenizer: Any, parser: type[ToolParser]) -> bool:
    """Whether one of the parser's tags is a special token of this tokenizer, which
    decoding with skip_special_tokens=True would drop (Hermes-2-Pro's <tool_call>):
    requests with tools must then be detokenized with skip_special_tokens=False, as vLLM's
    hermes parser does. Qwen2.5's tags are plain added tokens: False."""
    for tag in parser.tags:
        ids = tokenizer.encode(tag, add_special_tokens=False)
        if tokenizer.decode(ids, skip_special_tokens=True) != tag:
            return True
    return False
