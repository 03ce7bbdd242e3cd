"""The chat body's parts the template renders: messages as the template takes them, the
continue_final_message and chat_template_kwargs rules, and the checked tools fields.
A refusal is a 400 naming the field (server/validate.py decodes).
"""

from __future__ import annotations

from typing import Any

import msgspec

from server import protocol
from server.chat_config import ChatConfig
from server.errors import bad_request, param_from_message
from server.tools.base import ToolParser
from server.tools.definitions import ToolRequest, parse_tool_request


def messages(messages: list[protocol.Message]) -> list[dict[str, Any]]:
    out = []
    for i, m in enumerate(messages):
        content: str | list[dict[str, str]] | None
        if m.content is None:
            if not (m.role == "assistant" and m.tool_calls):
                raise bad_request(
                    f"messages[{i}].content is required (null only for an assistant "
                    "message with tool_calls)",
                    f"messages[{i}].content",
                )
            content = None
        elif isinstance(m.content, str):
            content = m.content
        else:
            content = [{"type": "text", "text": p.text} for p in m.content]
        d: dict[str, Any] = {"role": m.role, "content": content}
        if m.name is not None:
            d["name"] = m.name
        if m.tool_calls is not None:
            d["tool_calls"] = msgspec.to_builtins(m.tool_calls)
        if m.tool_call_id is not None:
            d["tool_call_id"] = m.tool_call_id
        if m.reasoning_content is not None:
            d["reasoning_content"] = m.reasoning_content
        out.append(d)
    return out


# What one message costs the template beyond its text (its role, the template's markup):
# thousands of empty messages are no tiny input either.
_MESSAGE_OVERHEAD_CHARS = 32


def message_chars(messages: list[dict[str, Any]]) -> int:
    """The size of the messages in characters (decides whether rendering leaves the loop)."""
    total = 0
    for m in messages:
        c = m["content"]
        total += _MESSAGE_OVERHEAD_CHARS + len(m["role"])
        if isinstance(c, str):
            total += len(c)
        elif c is not None:
            total += sum(len(p["text"]) for p in c)
        for call in m.get("tool_calls") or ():
            total += _MESSAGE_OVERHEAD_CHARS + len(call["function"]["arguments"])
        total += len(m.get("reasoning_content") or "")
    return total


# Variables the chat template gets from the server itself (or transformers uses as options):
# chat_template_kwargs may not replace them.
RESERVED_TEMPLATE_KWARGS = frozenset(
    {
        "messages",
        "conversation",
        "tools",
        "documents",
        "add_generation_prompt",
        "continue_final_message",
        "chat_template",
        "tokenize",
        "return_dict",
        "return_tensors",
        "return_assistant_tokens_mask",
        "tokenizer_kwargs",
        "padding",
        "truncation",
        "max_length",
        "sanitize_control_tokens",
        "bos_token",
        "eos_token",
        "raise_exception",
    }
)


def continue_final(
    body: protocol.ChatBody | protocol.TokenizeBody, messages: list[dict[str, Any]]
) -> bool:
    """continue_final_message, checked (vLLM's rules: not with add_generation_prompt=true,
    and the last message must be the assistant's)."""
    if not body.continue_final_message:
        return False
    if body.add_generation_prompt:
        raise bad_request(
            "continue_final_message and add_generation_prompt cannot both be true",
            "continue_final_message",
        )
    if messages[-1]["role"] != "assistant":
        raise bad_request(
            "continue_final_message needs the last message to be the assistant's",
            f"messages[{len(messages) - 1}].role",
        )
    return True


def template_kwargs(body: protocol.ChatBody | protocol.TokenizeBody) -> dict[str, Any] | None:
    kwargs = body.chat_template_kwargs
    if not kwargs:
        return None
    for name in kwargs:
        if name in RESERVED_TEMPLATE_KWARGS:
            raise bad_request(
                f"chat_template_kwargs.{name} is set by the server and cannot be overridden",
                f"chat_template_kwargs.{name}",
            )
    return dict(kwargs)


def tools(body: protocol.ChatBody, chat: ChatConfig) -> tuple[ToolRequest, ToolParser | None]:
    """The tools fields checked; the parser for the output (None: calls are not parsed)."""
    try:
        request = parse_tool_request(
            msgspec.to_builtins(body.tools),
            msgspec.to_builtins(body.tool_choice),
            body.parallel_tool_calls,
        )
    except ValueError as e:
        raise bad_request(str(e), param_from_message(str(e), protocol.CHAT_FIELDS)) from None
    if not request.tools or request.choice.mode == "none":
        return request, None
    if chat.tool_parser is None:
        raise bad_request(
            "this server cannot parse tool calls for its chat template; start it with "
            "--tool-call-parser hermes or llama3_json",
            "tools",
        )
    return request, chat.tool_parser(request.tool_names)
