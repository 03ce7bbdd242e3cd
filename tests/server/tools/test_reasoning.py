"""The reasoning parser: streamed == non-streamed over random outputs and splittings, the
documented cases (opened in the prompt, no tags, unterminated), and the token-id helpers on
a tokenizer that has the tags as single tokens."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from server.tools.reasoning import (
    THINK_END,
    THINK_START,
    ParsedReasoning,
    ReasoningParser,
    ReasoningTags,
    prompt_opens_reasoning,
    reasoning_end_index,
)
from tests.server.tools.strategies import splits

_piece = st.one_of(
    st.text(alphabet=st.sampled_from(list("ab <>/\n \tthink😀")), max_size=10),
    st.sampled_from([THINK_START, THINK_END, "<thi", "</th", "</think", "\n\n", " "]),
)
think_outputs = st.lists(_piece, max_size=10).map("".join)


def stream_split(parser: ReasoningParser, deltas: list[str], starts: bool) -> ParsedReasoning:
    stream = parser.stream(starts_in_reasoning=starts)
    outs = [stream.feed(d) for d in deltas] + [stream.finish()]
    reasoning = "".join(o.reasoning_content for o in outs)
    content = "".join(o.content for o in outs)
    return ParsedReasoning(reasoning or None, content or None)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data(), st.booleans())
def test_stream_equals_parse(data, starts):
    text = data.draw(think_outputs)
    parser = ReasoningParser()
    parsed = parser.parse(text, starts_in_reasoning=starts)
    assert stream_split(parser, data.draw(splits(text)), starts) == parsed
    # no tag leaks: reasoning never holds the end tag, the answer starts after it
    if parsed.reasoning_content is not None:
        assert THINK_END not in parsed.reasoning_content


def test_stream_never_leaks_a_partial_end_tag():
    stream = ReasoningParser().stream()
    outs = [stream.feed(c) for c in "<think>\nplan it</th"]
    assert "".join(o.reasoning_content for o in outs) == "plan it"
    assert all(o.content == "" for o in outs)
    out = stream.feed("ink>\n\nThe answer")
    assert out.content == "The answer" and out.reasoning_content == ""
    assert stream.is_reasoning_done


@pytest.mark.parametrize(
    "text,starts,expected",
    [
        ("<think>\nHmm.\n</think>\n\nYes.", False, ("Hmm.", "Yes.")),
        ("Hmm, so.\n</think>\n\nYes.", True, ("Hmm, so.", "Yes.")),
        ("Just an answer.", False, (None, "Just an answer.")),
        ("Answer with a </think> inside", False, (None, "Answer with a </think> inside")),
        ("<think>still thinking when cut", False, ("still thinking when cut", None)),
        ("<think>\n\n</think>\n\nAnswer", False, (None, "Answer")),
        ("", False, (None, None)),
    ],
)
def test_documented_cases(text, starts, expected):
    assert ReasoningParser().parse(text, starts_in_reasoning=starts) == ParsedReasoning(*expected)


def test_token_id_helpers():
    tags = ReasoningTags(start_token_id=7, end_token_id=8)
    # an R1-style prompt ends with an open <think>; Qwen3 without thinking closes it
    assert prompt_opens_reasoning(tags, prompt_token_ids=[1, 2, 7])
    assert not prompt_opens_reasoning(tags, prompt_token_ids=[1, 7, 8, 3])
    assert not prompt_opens_reasoning(tags, prompt_token_ids=[1, 2])
    assert prompt_opens_reasoning(tags, prompt_text="<|Assistant|><think>\n")
    assert not prompt_opens_reasoning(ReasoningTags(), prompt_text="<think>\n\n</think>\n\n")
    # where the answer (and structured output) starts in the output ids
    assert reasoning_end_index(tags, [], starts_in_reasoning=False) is None
    assert reasoning_end_index(tags, [5, 6], starts_in_reasoning=False) == 0
    assert reasoning_end_index(tags, [7, 5, 6], starts_in_reasoning=False) is None
    assert reasoning_end_index(tags, [7, 5, 8, 9], starts_in_reasoning=False) == 3
    assert reasoning_end_index(tags, [5, 8, 9], starts_in_reasoning=True) == 2
    with pytest.raises(ValueError, match="single token"):
        reasoning_end_index(ReasoningTags(), [1], starts_in_reasoning=True)


def test_tags_from_tokenizer(tokenizer):
    import copy

    from server.tools.reasoning import check_tags_survive_decoding, reasoning_tags_from_tokenizer

    # SmolLM2 spells <think> with several tokens: matched by text only
    tags = reasoning_tags_from_tokenizer(tokenizer)
    assert (tags.start_token_id, tags.end_token_id) == (None, None)
    # a tokenizer with them as added (non-special) tokens, as Qwen3's: found by id
    tok = copy.deepcopy(tokenizer)
    tok.add_tokens([THINK_START, THINK_END])
    tags = reasoning_tags_from_tokenizer(tok)
    assert tags.start_token_id == tok.convert_tokens_to_ids(THINK_START)
    assert tags.end_token_id == tok.convert_tokens_to_ids(THINK_END) != tags.start_token_id
    check_tags_survive_decoding(tok, tags)
    ids = tok.encode("<think>\nhmm</think>\n\nYes", add_special_tokens=False)
    assert (
        reasoning_end_index(tags, ids, starts_in_reasoning=False)
        == ids.index(tags.end_token_id) + 1
    )
    # marked special, skip_special_tokens=True would drop them: refused at startup
    tok2 = copy.deepcopy(tokenizer)
    tok2.add_special_tokens({"additional_special_tokens": [THINK_START, THINK_END]})
    with pytest.raises(ValueError, match="drops"):
        check_tags_survive_decoding(tok2, reasoning_tags_from_tokenizer(tok2))
