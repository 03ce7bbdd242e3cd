"""The chat endpoint's folding of engine outputs (server/choices.py) with tool and reasoning
parsers: the SSE chunks a streamed request sends, joined as the openai SDK joins them, equal
the non-streamed message (content, reasoning_content, tool_calls with their ids, and
finish_reason), over random outputs, random delta splittings, n = 2 and
parallel_tool_calls=false."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jaxserve.outputs import CompletionOutput, RequestOutput
from server.app import make_app
from server.choices import Generation
from server.fanout import EnginePrompt
from server.state import STATE_KEY
from server.tools.chat_output import ChatOutputParsers
from server.tools.hermes import HermesToolParser
from server.tools.reasoning import THINK_END, THINK_START, ReasoningParser
from tests.server.fake_engine import FakeEngine
from tests.server.tools.strategies import NAMES, hermes_outputs, splits

STATE = make_app(FakeEngine())[STATE_KEY]
PROMPT = EnginePrompt(None, [1, 2, 3])
outputs = st.lists(
    st.one_of(hermes_outputs(), st.sampled_from([THINK_START, THINK_END, "\n", "answer"])),
    max_size=4,
).map("".join)


def _run(gen: Generation, deltas: list[list[str]], finish: str) -> list[dict]:
    """Feeds both choices' deltas (one output per step; a choice past its deltas sends
    nothing) and returns the chunks the stream would send."""
    chunks = gen.role_chunks()
    num_steps = max(len(d) for d in deltas)
    for step in range(num_steps):
        outs = []
        for index, ds in enumerate(deltas):
            if step < len(ds):
                last = step == len(ds) - 1
                outs.append(
                    CompletionOutput(index, ds[step], [7], None, None, finish if last else None)
                )
        done = step == num_steps - 1
        for choice, delta in gen.apply(0, RequestOutput("r", None, PROMPT.token_ids, outs, done)):
            chunks.append(gen.chunk(choice, delta))
    return chunks


def _join(chunks: list[dict], index: int) -> dict:
    """One choice's message from the chunks, as the openai SDK's stream accumulator does."""
    content, reasoning, calls, finish = "", "", {}, None
    for chunk in chunks:
        for c in chunk["choices"]:
            if c["index"] != index:
                continue
            d = c["delta"]
            assert d.get("content") != "" or d.get("role") == "assistant", "empty content sent"
            content += d.get("content") or ""
            reasoning += d.get("reasoning_content") or ""
            for tc in d.get("tool_calls", []):
                if "id" in tc:
                    calls[tc["index"]] = {
                        "id": tc["id"],
                        "type": "function",
                        "function": {"name": tc["function"]["name"], "arguments": ""},
                    }
                calls[tc["index"]]["function"]["arguments"] += tc["function"]["arguments"]
            finish = c["finish_reason"] or finish
    message = {"role": "assistant", "content": content or None}
    return {"message": message, "reasoning": reasoning or None, "calls": calls, "finish": finish}


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.data(),
    st.booleans(),
    st.booleans(),
    st.booleans(),
    st.sampled_from(["stop", "length"]),
)
def test_streamed_chunks_equal_the_whole_message(data, has_reasoning, is_parallel, starts, finish):
    parsers = ChatOutputParsers(
        HermesToolParser(NAMES),
        ReasoningParser() if has_reasoning else None,
        starts_in_reasoning=starts and has_reasoning,
    )
    texts = [data.draw(outputs) for _ in range(2)]
    deltas = [data.draw(splits(t)) for t in texts]
    gens = [
        Generation(
            STATE,
            is_chat=True,
            prompts=[PROMPT],
            n=2,
            top_logprobs=None,
            echo_texts=None,
            parsers=parsers,
            stream=stream,
            max_tool_calls=None if is_parallel else 1,
        )
        for stream in (True, False)
    ]
    gens[1].id = gens[0].id  # call ids derive from the request id (the stream took it already)
    chunks = _run(gens[0], deltas, finish)
    _run(gens[1], deltas, finish)
    whole = gens[1].full_response()["choices"]
    for index in range(2):
        streamed = _join(chunks, index)
        message = whole[index]["message"]
        assert streamed["message"]["content"] == message["content"]
        assert streamed["reasoning"] == message.get("reasoning_content")
        assert list(streamed["calls"].values()) == message.get("tool_calls", [])
        assert streamed["finish"] == whole[index]["finish_reason"]
        if not is_parallel:
            assert len(streamed["calls"]) <= 1
        if streamed["calls"] and finish == "stop":
            assert streamed["finish"] == "tool_calls"
