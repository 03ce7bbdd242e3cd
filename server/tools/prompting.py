"""What the chat template sees of tools: the tool definitions, assistant `tool_calls` and
`tool` messages, for templates that render them and for templates that ignore them.

NOTE on detection (probe_template, once per server): the template is rendered on a probe
conversation with and without a probe tool, and with a probe assistant call and tool result;
a template "renders tools" when the probe tool's name shows up, and "renders tool calls"
when the call's name, its argument and the tool result all do. Rendering is the test, not
the template's source: a template may mention `tools` and drop them, or reach them through
macros; what reaches the model is what counts.

NOTE on the format for templates that ignore `tools` (the default model's): the tools go
into the system turn (merged after an existing system message, else as a new first one) as
TOOLS_PROMPT_HEADER, one {"type": "function", "function": {...}} JSON per line inside
<tools></tools>, and TOOLS_PROMPT_FOOTER asking for Hermes `<tool_call>` blocks, which the
hermes parser reads back. Past calls become that same text in the assistant turn and tool
results `<tool_response>` blocks in a user turn (consecutive results share one turn), as
Qwen2.5's template writes them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from server.tools.definitions import FunctionTool, ToolRequest
from server.tools.hermes import END, START

TOOLS_PROMPT_HEADER = (
    "# Tools\n\n"
    "You may call one or more functions to help with the user's request. "
    "The functions are described within <tools></tools>:\n<tools>\n"
)
TOOLS_PROMPT_FOOTER = (
    "\n</tools>\n\n"
    "To call a function, answer with a JSON object holding its name and its arguments "
    "within <tool_call></tool_call> tags, one block per call:\n"
    f'{START}\n{{"name": <function-name>, "arguments": <arguments-json-object>}}\n{END}'
)
RESPONSE_START = "<tool_response>"
RESPONSE_END = "</tool_response>"


def render_tools_prompt(tools: list[FunctionTool]) -> str:
    """The tools part of the system turn, in the documented format."""
    lines = "\n".join(json.dumps(t.to_openai(), ensure_ascii=False) for t in tools)
    return TOOLS_PROMPT_HEADER + lines + TOOLS_PROMPT_FOOTER


def add_tools_to_system(messages: list[dict], tools: list[FunctionTool]) -> list[dict]:
    """`messages` with the tools prompt merged into the system turn (a new list)."""
    prompt = render_tools_prompt(tools)
    if messages and messages[0].get("role") == "system":
        first = dict(messages[0])
        content = first.get("content")
        if isinstance(content, list):
            # text parts are joined with "\n" (jaxserve.tokenizer), so this adds a blank line
            first["content"] = [*content, {"type": "text", "text": "\n" + prompt}]
        else:
            first["content"] = f"{content}\n\n{prompt}" if content else prompt
        return [first, *messages[1:]]
    return [{"role": "system", "content": prompt}, *messages]


def normalize_tool_messages(messages: list[dict]) -> list[dict]:
    """Checks assistant `tool_calls` and `tool` messages; a new list where each call's
    `arguments` JSON string is an object (templates `tojson` or iterate them) and an
    assistant turn with calls but no content has content "". ValueErrors name the field."""
    out = []
    for i, message in enumerate(messages):
        role = message.get("role")
        if role == "tool":
            if not isinstance(message.get("tool_call_id"), str):
                raise ValueError(f"messages[{i}].tool_call_id is required for role 'tool'")
            out.append(message)
            continue
        calls = message.get("tool_calls")
        if calls is None:
            out.append(message)
            continue
        if role != "assistant":
            raise ValueError(f"messages[{i}].tool_calls is only for role 'assistant'")
        if not isinstance(calls, list):
            raise ValueError(f"messages[{i}].tool_calls must be a list")
        fixed = []
        for j, call in enumerate(calls):
            field = f"messages[{i}].tool_calls[{j}]"
            function = call.get("function") if isinstance(call, dict) else None
            if not isinstance(function, dict) or not isinstance(function.get("name"), str):
                raise ValueError(f"{field}.function.name is required")
            arguments = function.get("arguments", "{}")
            if isinstance(arguments, str):
                try:
                    arguments = json.loads(arguments)
                except ValueError:
                    arguments = None
            if not isinstance(arguments, dict):
                raise ValueError(f"{field}.function.arguments must be a JSON object (as a string)")
            fixed.append(
                {
                    "id": call.get("id"),
                    "type": "function",
                    "function": {"name": function["name"], "arguments": arguments},
                }
            )
        content = message.get("content")
        out.append({**message, "content": "" if content is None else content, "tool_calls": fixed})
    return out


def _text(content: Any) -> str:
    if isinstance(content, list):
        return "\n".join(p.get("text", "") for p in content if isinstance(p, dict))
    return "" if content is None else str(content)


def tool_messages_as_text(messages: list[dict]) -> list[dict]:
    """Normalized messages with calls and tool results as Hermes text (see the module
    docstring), for templates that do not render them."""
    out: list[dict] = []
    for message in messages:
        role = message.get("role")
        if role == "tool":
            block = f"{RESPONSE_START}\n{_text(message.get('content'))}\n{RESPONSE_END}"
            if out and out[-1].get("_is_tool_turn"):
                out[-1]["content"] += "\n" + block
            else:
                out.append({"role": "user", "content": block, "_is_tool_turn": True})
            continue
        if message.get("tool_calls"):
            blocks = [
                f"{START}\n"
                + json.dumps(
                    {"name": c["function"]["name"], "arguments": c["function"]["arguments"]},
                    ensure_ascii=False,
                )
                + f"\n{END}"
                for c in message["tool_calls"]
            ]
            text = _text(message.get("content"))
            content = "\n".join([text, *blocks] if text else blocks)
            rest = {k: v for k, v in message.items() if k not in ("tool_calls", "content")}
            out.append({**rest, "content": content})
            continue
        out.append(message)
    for message in out:
        message.pop("_is_tool_turn", None)
    return out


@dataclass(frozen=True)
class TemplateToolSupport:
    """What a chat template does with tools (probe_template)."""

    # it renders the `tools` it is given
    renders_tools: bool
    # it renders assistant `tool_calls` and `tool` messages
    renders_tool_calls: bool


_PROBE_TOOL = "jaxserve_probe_tool"
_PROBE_ARG = "jaxserve_probe_value"
_PROBE_RESULT = "jaxserve_probe_result"


def probe_template(tokenizer: Any, chat_template: str | None = None) -> TemplateToolSupport:
    """Renders probe conversations with `chat_template` (default: the tokenizer's); a probe
    that fails to render counts as not supported."""
    tool = {
        "type": "function",
        "function": {
            "name": _PROBE_TOOL,
            "description": "probe",
            "parameters": {"type": "object", "properties": {"q": {"type": "string"}}},
        },
    }
    base = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]
    call = {
        "id": "call_probe",
        "type": "function",
        "function": {"name": _PROBE_TOOL, "arguments": {"q": _PROBE_ARG}},
    }
    with_calls = [
        *base,
        {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_probe", "content": _PROBE_RESULT},
    ]

    def render(messages: list[dict], tools: list[dict] | None) -> str:
        try:
            return tokenizer.apply_chat_template(
                messages,
                chat_template=chat_template,
                tools=tools,
                tokenize=False,
                add_generation_prompt=True,
            )
        except Exception:  # noqa: BLE001 - any template error means "not supported"
            return ""

    renders_tools = _PROBE_TOOL in render(base, [tool])
    text = render(with_calls, [tool])
    # the argument's value can only come from the rendered call
    renders_calls = _PROBE_ARG in text and _PROBE_RESULT in text
    return TemplateToolSupport(renders_tools, renders_calls)


def prepare_messages(
    messages: list[dict],
    request: ToolRequest,
    support: TemplateToolSupport,
    *,
    include_tools_for_none: bool = False,
) -> tuple[list[dict], list[dict] | None]:
    """The messages and the `tools` argument to render a chat with.

    Tools go to the template when it renders them, else into the system turn; with
    tool_choice "none" they are left out unless include_tools_for_none (a model shown tools
    may call them, and its calls would then only be content)."""
    messages = normalize_tool_messages(messages)
    if not support.renders_tool_calls:
        messages = tool_messages_as_text(messages)
    if not request.tools or (request.choice.mode == "none" and not include_tools_for_none):
        return messages, None
    if support.renders_tools:
        return messages, [t.to_openai() for t in request.tools]
    return add_tools_to_system(messages, request.tools), None
