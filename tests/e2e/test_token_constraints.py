"""Token constraints end to end on a tiny random model: logit_bias, allowed_token_ids,
bad_words and structured outputs are enforced on device, and bad ones fail alone."""

from __future__ import annotations

import re

import pytest

from jaxserve import LLM, SamplingParams
from jaxserve.structured_output.params import StructuredOutputsParams

ENGINE = dict(
    max_model_len=128,
    max_num_batched_tokens=64,
    max_num_seqs=16,
    enable_warmup=False,
    show_progress=False,
)
GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
PROMPTS = [{"prompt_token_ids": list(range(100, 100 + n))} for n in (5, 17, 3)]
ID_RE = r"[a-z]{3}-[0-9]{2}"


@pytest.fixture(scope="module")
def llm(tiny_model_dir):
    with LLM(str(tiny_model_dir), **ENGINE) as llm:
        yield llm


def _tokens(llm, params, prompts=PROMPTS):
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]


def test_logit_bias_forces_and_bans(llm):
    plain = _tokens(llm, GREEDY)
    forced = _tokens(llm, GREEDY.with_updates(logit_bias={777: 100}))
    assert all(set(t) == {777} for t in forced)
    first = plain[0][0]
    banned = _tokens(llm, GREEDY.with_updates(logit_bias={first: -100}), PROMPTS[:1])[0]
    assert banned[0] != first and first not in banned


def test_allowed_token_ids_are_all_that_is_sampled(llm):
    allowed = [5, 77, 901, 4000]
    sampled = SamplingParams(temperature=1.5, seed=3, max_tokens=30, ignore_eos=True)
    for tokens in _tokens(llm, sampled.with_updates(allowed_token_ids=allowed)):
        assert len(tokens) == 30 and set(tokens) <= set(allowed)


def test_bad_words_never_appear(llm):
    plain = _tokens(llm, GREEDY)
    word_ids = plain[0][:2]  # a two-token "word" the model emits: banned after its first token
    word = llm.get_tokenizer().decode(word_ids)
    banned = _tokens(llm, GREEDY.with_updates(bad_words_token_ids=[word_ids, [plain[1][0]]]))
    for tokens in banned:
        assert plain[1][0] not in tokens
        assert not any(tokens[i : i + 2] == word_ids for i in range(len(tokens) - 1)), word


def test_structured_rows_match_alone_batched_and_preempted(tiny_model_dir, llm):
    regex = SamplingParams(
        temperature=0.9,
        seed=11,
        max_tokens=20,
        n=2,
        structured_outputs=StructuredOutputsParams(regex=ID_RE),
    )
    alone = llm.generate(PROMPTS[:1], regex, use_tqdm=False)[0]
    texts = [c.text for c in alone.outputs]
    assert all(re.fullmatch(ID_RE, t) for t in texts)
    batched = llm.generate(PROMPTS + PROMPTS[:1], [GREEDY] * 3 + [regex], use_tqdm=False)[-1]
    assert [c.text for c in batched.outputs] == texts
    # 30-token prompts fill 2 blocks and need a third while decoding: 6 blocks for 4 such
    # requests (8 sequences) make them preempt each other
    long = [{"prompt_token_ids": list(range(200 + 50 * i, 230 + 50 * i))} for i in range(4)]
    ample = [[c.text for c in o.outputs] for o in llm.generate(long, regex, use_tqdm=False)]
    with LLM(str(tiny_model_dir), **{**ENGINE, "num_gpu_blocks_override": 7}) as small:
        outs = small.generate(long, regex, use_tqdm=False)
        assert small.engine.core.scheduler.num_preemptions > 0
        assert [[c.text for c in o.outputs] for o in outs] == ample
        assert small.engine.core.token_masks.num_requests == 0  # nothing left registered


@pytest.mark.parametrize(
    ("so", "field"),
    [
        (StructuredOutputsParams(regex="a("), "structured_outputs.regex"),
        (StructuredOutputsParams(grammar="start: nosuchrule"), "structured_outputs.grammar"),
        (StructuredOutputsParams(json={"type": "object", "minProperties": "x"}), "json"),
    ],
)
def test_a_grammar_that_cannot_compile_fails_alone(llm, so, field):
    with pytest.raises(ValueError, match=re.escape(field)):
        llm.generate(PROMPTS[:1], SamplingParams(max_tokens=4, structured_outputs=so))
    core = llm.engine.core
    assert not core.has_unfinished_requests() and core.token_masks.num_requests == 0
    assert core.make_stats().num_used_blocks == 0
    assert len(_tokens(llm, GREEDY, PROMPTS[:1])[0]) == 12  # and the engine serves on


def test_a_grammar_after_a_token_leaves_what_comes_before_free(llm):
    plain = _tokens(llm, GREEDY, PROMPTS[:1])[0]
    end = plain[2]  # "</think>": the third token the model writes by itself
    so = StructuredOutputsParams(regex=ID_RE, after_token_id=end)
    params = SamplingParams(temperature=0.0, max_tokens=30, structured_outputs=so)
    out = llm.generate(PROMPTS[:1], params, use_tqdm=False)[0].outputs[0]
    assert out.token_ids[:3] == plain[:3]  # free until the token, the model's own choice
    answer = llm.get_tokenizer().decode(out.token_ids[3:], skip_special_tokens=True)
    assert re.fullmatch(ID_RE, answer) and out.finish_reason == "stop"
