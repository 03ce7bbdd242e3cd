"""Tools in the prompt: the probe of what a template renders (the default model's real
template, and small Hermes-like / Llama-like templates written for these tests), the tools
prompt in the system turn, and calls and results turned into text for templates without
them."""

from __future__ import annotations

import json

import pytest

from server.tools.definitions import parse_tool_request
from server.tools.hermes import HermesToolParser
from server.tools.llama3_json import Llama3JsonToolParser
from server.tools.parsers import detect_tool_parser, needs_special_tokens, resolve_tool_parser
from server.tools.prompting import (
    TOOLS_PROMPT_FOOTER,
    TOOLS_PROMPT_HEADER,
    TemplateToolSupport,
    normalize_tool_messages,
    prepare_messages,
    probe_template,
)

# Hermes-like (as Qwen2.5's does it): tools in the system turn, calls and results rendered.
HERMES_TEMPLATE = (
    "{%- if tools %}<|im_start|>system\n<tools>{% for t in tools %}{{ t | tojson }}\n"
    "{% endfor %}</tools>\nCall with <tool_call>...</tool_call><|im_end|>\n{% endif %}"
    "{%- for m in messages %}"
    "{%- if m.role == 'assistant' and m.tool_calls %}<|im_start|>assistant\n"
    "{%- for tc in m.tool_calls %}<tool_call>\n"
    "{{ {'name': tc.function.name, 'arguments': tc.function.arguments} | tojson }}\n"
    "</tool_call>{% endfor %}<|im_end|>\n"
    "{%- elif m.role == 'tool' %}<|im_start|>user\n<tool_response>\n{{ m.content }}\n"
    "</tool_response><|im_end|>\n"
    "{%- else %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endif %}"
    "{%- endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Llama-3.1-like: tools rendered with the "parameters" instruction, calls not rendered.
LLAMA_TEMPLATE = (
    "{%- if tools %}<|start_header_id|>system<|end_header_id|>\n\nRespond in the format "
    '{"name": function name, "parameters": dictionary of argument name and its value}.\n'
    "{% for t in tools %}{{ t | tojson(indent=4) }}\n{% endfor %}<|eot_id|>{% endif %}"
    "{%- for m in messages %}<|start_header_id|>{{ m.role }}<|end_header_id|>\n\n"
    "{{ m.content }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}
CHAT = [
    {"role": "user", "content": "Weather in Paris and Rome?"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
            },
            {
                "id": "call_2",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'},
            },
        ],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": "18C"},
    {"role": "tool", "tool_call_id": "call_2", "content": "25C"},
]


@pytest.mark.parametrize(
    "template,expected,parser",
    [
        (None, TemplateToolSupport(False, False), HermesToolParser),
        (HERMES_TEMPLATE, TemplateToolSupport(True, True), HermesToolParser),
        (LLAMA_TEMPLATE, TemplateToolSupport(True, False), Llama3JsonToolParser),
    ],
)
def test_probe_and_auto_parser(tokenizer, template, expected, parser):
    support = probe_template(tokenizer, template)
    assert support == expected
    text = template or tokenizer.chat_template
    assert detect_tool_parser(text, renders_tools=support.renders_tools) is parser
    assert resolve_tool_parser("auto", text, renders_tools=support.renders_tools) is parser


def test_parser_names():
    assert resolve_tool_parser("llama3_json", "", renders_tools=True) is Llama3JsonToolParser
    # a template that renders tools in a format we do not know: no parser (tools refused)
    assert detect_tool_parser("{{ tools }}[TOOL_CALLS]", renders_tools=True) is None
    with pytest.raises(ValueError, match="^--tool-call-parser must be one of"):
        resolve_tool_parser("mistral", "", renders_tools=True)


def test_needs_special_tokens(tokenizer):
    import copy

    assert not needs_special_tokens(tokenizer, HermesToolParser)
    tok = copy.deepcopy(tokenizer)
    tok.add_tokens(["<tool_call>", "</tool_call>"])  # as Qwen2.5's: plain added tokens
    assert not needs_special_tokens(tok, HermesToolParser)
    tok = copy.deepcopy(tokenizer)
    tok.add_special_tokens({"additional_special_tokens": ["<tool_call>", "</tool_call>"]})
    assert needs_special_tokens(tok, HermesToolParser)
    assert not needs_special_tokens(tok, Llama3JsonToolParser)


def _render(tokenizer, template, messages, tools):
    return tokenizer.apply_chat_template(
        messages, chat_template=template, tools=tools, tokenize=False, add_generation_prompt=True
    )


def test_default_template_gets_tools_in_system_turn(tokenizer):
    req = parse_tool_request([WEATHER])
    support = probe_template(tokenizer)
    for system in ([], [{"role": "system", "content": "Be brief."}]):
        messages, tools = prepare_messages(system + CHAT, req, support)
        assert tools is None
        text = _render(tokenizer, None, messages, None)
        sys_turn = text.split("<|im_end|>")[0]
        assert sys_turn.startswith("<|im_start|>system\n" + ("Be brief.\n\n" if system else ""))
        tools_json = json.dumps({"type": "function", "function": WEATHER["function"]})
        assert TOOLS_PROMPT_HEADER + tools_json + TOOLS_PROMPT_FOOTER in sys_turn
        # past calls as Hermes text (the format the parser reads), results in one user turn
        calls = HermesToolParser().parse(text.split("<|im_start|>assistant\n")[1], "c")
        assert [(c.name, json.loads(c.arguments)) for c in calls.tool_calls] == [
            ("get_weather", {"city": "Paris"}),
            ("get_weather", {"city": "Rome"}),
        ]
        assert (
            "<|im_start|>user\n<tool_response>\n18C\n</tool_response>\n"
            "<tool_response>\n25C\n</tool_response><|im_end|>" in text
        )


def test_template_that_renders_tools_gets_them(tokenizer):
    req = parse_tool_request([WEATHER])
    messages, tools = prepare_messages(CHAT, req, probe_template(tokenizer, HERMES_TEMPLATE))
    assert tools == [WEATHER]
    text = _render(tokenizer, HERMES_TEMPLATE, messages, tools)
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}' in text
    assert TOOLS_PROMPT_HEADER not in text
    # Llama-like: tools native, calls (which it does not render) as text
    support = probe_template(tokenizer, LLAMA_TEMPLATE)
    messages, tools = prepare_messages(CHAT, req, support)
    text = _render(tokenizer, LLAMA_TEMPLATE, messages, tools)
    assert '"name": "get_weather"' in text and "<tool_response>\n25C" in text


def test_tool_choice_none_leaves_tools_out(tokenizer):
    req = parse_tool_request([WEATHER], "none")
    support = probe_template(tokenizer)
    messages, tools = prepare_messages(CHAT[:1], req, support)
    assert tools is None and messages == CHAT[:1]
    messages, _ = prepare_messages(CHAT[:1], req, support, include_tools_for_none=True)
    assert messages[0]["role"] == "system"


@pytest.mark.parametrize(
    "message,field",
    [
        ({"role": "tool", "content": "x"}, "messages[0].tool_call_id"),
        ({"role": "user", "content": "x", "tool_calls": []}, "messages[0].tool_calls"),
        ({"role": "assistant", "tool_calls": [{"function": {}}]}, "messages[0].tool_calls[0]"),
        (
            {"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "[1]"}}]},
            "messages[0].tool_calls[0].function.arguments",
        ),
    ],
)
def test_bad_tool_messages_name_the_field(message, field):
    with pytest.raises(ValueError) as e:
        normalize_tool_messages([message])
    assert str(e.value).startswith(field + " ") or str(e.value).startswith(field + ".")
