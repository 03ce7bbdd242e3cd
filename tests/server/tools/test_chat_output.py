"""Reasoning then tool calls, in one choice: streamed deltas joined == the whole parse, over
random outputs mixing think tags and tool-call blocks and random splittings."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from server.tools.calls import ToolCall
from server.tools.chat_output import (
    ChatMessage,
    ChatOutputParsers,
    ChatOutputStream,
    parse_chat_output,
)
from server.tools.hermes import HermesToolParser
from server.tools.reasoning import THINK_END, THINK_START, ReasoningParser
from tests.server.tools.strategies import NAMES, hermes_outputs, splits

mixed_outputs = st.lists(
    st.one_of(hermes_outputs(), st.sampled_from([THINK_START, THINK_END, "\n", "</thi"])),
    max_size=4,
).map("".join)


def fold(stream: ChatOutputStream, deltas: list[str]) -> ChatMessage:
    outs = [stream.feed(d) for d in deltas] + [stream.finish()]
    assert all(v for o in outs for v in o.values()), "no empty fields are sent"
    calls: dict[int, list[str]] = {}
    for o in outs:
        for d in o.get("tool_calls", []):
            if "id" in d:
                calls[d["index"]] = [d["id"], d["function"]["name"], ""]
            calls[d["index"]][2] += d["function"]["arguments"]
    return ChatMessage(
        "".join(o.get("content", "") for o in outs) or None,
        "".join(o.get("reasoning_content", "") for o in outs) or None,
        [ToolCall(*c) for c in calls.values()],
    )


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data(), st.booleans(), st.booleans(), st.booleans())
def test_stream_equals_parse(data, has_tools, has_reasoning, starts):
    parsers = ChatOutputParsers(
        HermesToolParser(NAMES) if has_tools else None,
        ReasoningParser() if has_reasoning else None,
        starts_in_reasoning=starts and has_reasoning,
    )
    text = data.draw(mixed_outputs)
    whole = parse_chat_output(parsers, text, "call_t")
    streamed = fold(ChatOutputStream(parsers, "call_t"), data.draw(splits(text)))
    assert streamed == whole
    if not has_tools and not has_reasoning:
        assert whole.content == (text or None)


def test_message_and_finish_reason():
    parsers = ChatOutputParsers(HermesToolParser(NAMES), ReasoningParser())
    text = '<think>Need the weather.</think>\n<tool_call>{"name": "search"}</tool_call>'
    message = parse_chat_output(parsers, text, "call_t")
    assert message.to_openai(parsers) == {
        "role": "assistant",
        "content": None,
        "reasoning_content": "Need the weather.",
        "tool_calls": [
            {
                "id": "call_t_0",
                "type": "function",
                "function": {"name": "search", "arguments": "{}"},
            }
        ],
    }
    assert message.finish_reason("stop") == "tool_calls"
    stream = ChatOutputStream(parsers, "call_t")
    stream.feed(text)
    stream.finish()
    assert stream.finish_reason("stop") == "tool_calls"
    plain = ChatOutputParsers()
    assert parse_chat_output(plain, "Hi", "c").to_openai(plain) == {
        "role": "assistant",
        "content": "Hi",
    }


def test_openai_sdk_folds_the_stream():
    """The official client's stream accumulator reads our deltas (several tool-call items per
    chunk included) into the same message as the non-streamed parse."""
    from openai.lib.streaming.chat import ChatCompletionStreamState
    from openai.types.chat import ChatCompletionChunk

    parsers = ChatOutputParsers(HermesToolParser(NAMES), ReasoningParser())
    text = (
        "<think>Two lookups.</think>Checking.\n"
        '<tool_call>{"name": "search", "arguments": {"q": "a"}}</tool_call>\n'
        '<tool_call>{"name": "f", "arguments": {"x": [1, {"y": null}]}}</tool_call>'
    )
    state = ChatCompletionStreamState()

    def send(delta: dict, finish_reason: str | None = None) -> None:
        choice = {"index": 0, "delta": delta, "finish_reason": finish_reason}
        state.handle_chunk(
            ChatCompletionChunk.model_validate(
                {"id": "c", "object": "chat.completion.chunk", "created": 0, "model": "m"}
                | {"choices": [choice]}
            )
        )

    send({"role": "assistant", "content": ""})
    stream = ChatOutputStream(parsers, "call_t")
    for delta in [stream.feed(text[i : i + 7]) for i in range(0, len(text), 7)] + [stream.finish()]:
        if delta:
            send(delta)
    send({}, stream.finish_reason("stop"))
    got = state.get_final_completion().choices[0]
    whole = parse_chat_output(parsers, text, "call_t")
    assert got.finish_reason == "tool_calls"
    assert got.message.content == whole.content == "Checking.\n"
    assert [(c.id, c.function.name, c.function.arguments) for c in got.message.tool_calls] == [
        (c.id, c.name, c.arguments) for c in whole.tool_calls
    ]
