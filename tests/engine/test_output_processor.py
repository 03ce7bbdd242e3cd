"""OutputProcessor on its own: core token ids in, RequestOutputs out (the real tokenizer)."""

from __future__ import annotations

import pytest

from jaxserve.core.outputs import EngineCoreOutput, TokenLogprobs
from jaxserve.engine import output_processor
from jaxserve.engine.output_processor import OutputProcessor
from jaxserve.engine.processor import ProcessedPrompt
from jaxserve.outputs import RequestOutputKind
from jaxserve.request import FinishReason
from jaxserve.sampling_params import SamplingParams

CUMULATIVE, DELTA, FINAL_ONLY = RequestOutputKind


@pytest.fixture(scope="module")
def tokenizer(smollm2_gguf):
    from jaxserve.model.loader import load_tokenizer

    return load_tokenizer("smollm2-135m")


def _prompt(tokenizer, text: str = "Say something:") -> ProcessedPrompt:
    return ProcessedPrompt(text, list(tokenizer.encode(text)))


def _feed(proc, core_id, ids, *, finish=None, logprobs=None, cached=0):
    """One output per token, the last one carrying `finish`; returns every RequestOutput."""
    outs = []
    for i, t in enumerate(ids):
        last = i == len(ids) - 1
        out = EngineCoreOutput(
            core_id,
            [t],
            new_logprobs=[logprobs[i]] if logprobs else None,
            finish_reason=finish if last else None,
            num_cached_tokens=cached,
        )
        outs.extend(proc.process_outputs([out]).request_outputs)
    return outs


def test_cumulative_text_equals_decode(tokenizer):
    proc = OutputProcessor(tokenizer)
    ids = list(tokenizer.encode(" The café is open — naïve résumé 🙂 ok"))
    proc.add_request("r", _prompt(tokenizer), SamplingParams(max_tokens=len(ids)), ["r-0"])
    outs = _feed(proc, "r-0", ids, finish=FinishReason.LENGTH)
    # cumulative outputs: every text is a prefix of the next, the last is the whole decode
    texts = [o.outputs[0].text for o in outs]
    assert all(b.startswith(a) for a, b in zip(texts, texts[1:], strict=False))
    assert texts[-1] == tokenizer.decode(ids)
    assert "\ufffd" not in "".join(texts)  # never half a multi-byte character
    assert outs[-1].finished and outs[-1].outputs[0].finish_reason == "length"
    assert outs[-1].outputs[0].token_ids == ids
    assert not proc.has_unfinished_requests()  # a finished request is forgotten


def test_stream_deltas_concatenate_to_the_cumulative_text(tokenizer):
    ids = list(tokenizer.encode(" one two three four five six"))
    params = SamplingParams(max_tokens=len(ids))
    cumulative, streamed = OutputProcessor(tokenizer), OutputProcessor(tokenizer)
    cumulative.add_request("r", _prompt(tokenizer), params, ["r-0"])
    streamed.add_request("r", _prompt(tokenizer), params, ["r-0"], output_kind=DELTA)
    whole = _feed(cumulative, "r-0", ids, finish=FinishReason.LENGTH)[-1].outputs[0]
    deltas = [o.outputs[0] for o in _feed(streamed, "r-0", ids, finish=FinishReason.LENGTH)]
    assert "".join(d.text for d in deltas) == whole.text
    assert [t for d in deltas for t in d.token_ids] == whole.token_ids


@pytest.mark.parametrize("include", [False, True])
def test_stop_string_ends_the_request(tokenizer, include):
    proc = OutputProcessor(tokenizer)
    ids = list(tokenizer.encode(" red, green. blue, more"))
    params = SamplingParams(stop=["."], include_stop_str_in_output=include, max_tokens=32)
    proc.add_request("r", _prompt(tokenizer), params, ["r-0"])
    stopped, last = {}, None
    for t in ids:
        res = proc.process_outputs([EngineCoreOutput("r-0", [t])])
        stopped.update(res.stopped_by_string)
        last = res.request_outputs[-1] if res.request_outputs else last
        if last is not None and last.finished:
            break
    assert stopped == {"r-0": "."}  # the caller ends it in the core
    co = last.outputs[0]
    assert co.finish_reason == "stop" and co.stop_reason == "."
    assert co.text == (" red, green." if include else " red, green")
    # tokens that still arrive from the step already running are ignored
    assert proc.process_outputs([EngineCoreOutput("r-0", [ids[-1]])]).request_outputs == []


def test_n_completions_fan_in(tokenizer):
    proc = OutputProcessor(tokenizer)
    a, b = list(tokenizer.encode(" alpha")), list(tokenizer.encode(" beta gamma"))
    proc.add_request("r", _prompt(tokenizer), SamplingParams(n=2), ["r-0", "r-1"])
    out_a = _feed(proc, "r-0", a, finish=FinishReason.STOP)
    assert not out_a[-1].finished  # the second completion is still running
    out_b = _feed(proc, "r-1", b, finish=FinishReason.LENGTH)
    final = out_b[-1]
    assert final.finished
    by_index = {c.index: c for c in final.outputs}
    assert by_index[0].text == " alpha" and by_index[0].finish_reason == "stop"
    assert by_index[1].text == " beta gamma" and by_index[1].finish_reason == "length"


def test_abort_returns_unfinished_core_ids_and_drops_later_outputs(tokenizer):
    proc = OutputProcessor(tokenizer)
    proc.add_request("r", _prompt(tokenizer), SamplingParams(n=2), ["r-0", "r-1"])
    _feed(proc, "r-0", [tokenizer.eos_token_id], finish=FinishReason.STOP)
    assert proc.abort_request("r") == ["r-1"]
    assert proc.abort_request("r") == []
    assert proc.process_outputs([EngineCoreOutput("r-1", [5])]).request_outputs == []
    assert not proc.has_unfinished_requests()


def test_duplicate_request_id_is_refused(tokenizer):
    proc = OutputProcessor(tokenizer)
    proc.add_request("r", _prompt(tokenizer), SamplingParams(), ["r-0"])
    with pytest.raises(ValueError, match="already in use"):
        proc.add_request("r", _prompt(tokenizer), SamplingParams(), ["r-9"])


def test_logprobs_ranks_and_cumulative(tokenizer):
    proc = OutputProcessor(tokenizer)
    ids = list(tokenizer.encode(" hi there"))
    entries = [
        TokenLogprobs(token_id=t, logprob=-0.5 * (i + 1), rank=i + 2, top=[(7, -0.1), (9, -0.2)])
        for i, t in enumerate(ids)
    ]
    proc.add_request("r", _prompt(tokenizer), SamplingParams(logprobs=2), ["r-0"])
    co = _feed(proc, "r-0", ids, finish=FinishReason.LENGTH, logprobs=entries, cached=3)
    final = co[-1]
    c = final.outputs[0]
    assert c.cumulative_logprob == pytest.approx(sum(e.logprob for e in entries))
    assert len(c.logprobs) == len(ids)
    for pos, e in zip(c.logprobs, entries, strict=True):
        assert pos[e.token_id].rank == e.rank and pos[e.token_id].logprob == e.logprob
        assert pos[7].rank == 1 and pos[9].rank == 2
        assert pos[7].decoded_token == tokenizer.decode([7])
    assert final.num_cached_tokens == 3


def _final(out):
    """What a RequestOutput says, less its wall-clock metrics."""
    return (
        out.finished,
        out.num_cached_tokens,
        [
            (
                c.index,
                c.text,
                c.token_ids,
                c.cumulative_logprob,
                c.logprobs,
                c.finish_reason,
                c.stop_reason,
            )
            for c in out.outputs
        ],
    )


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(n=2, max_tokens=64, logprobs=2),
        SamplingParams(n=2, max_tokens=64, stop=[" green"], include_stop_str_in_output=True),
        SamplingParams(max_tokens=64, stop=["ue,", "zzz"], logprobs=1),
    ],
    ids=["n2-logprobs", "stop-included", "stop-logprobs"],
)
def test_final_only_equals_the_last_cumulative_output_and_builds_one(
    tokenizer, params, monkeypatch
):
    # Each completion gets its own ids; one step feeds each unfinished one a token.
    texts = [" red, green. blue, more and more", " blue, green, red, some more words"]
    ids = [list(tokenizer.encode(t)) for t in texts][: params.n]
    core_ids = [f"r-{i}" for i in range(params.n)]
    built = []
    real = output_processor.RequestOutput

    def counting(*args, **kwargs):
        built.append(kwargs["request_id"])
        return real(*args, **kwargs)

    monkeypatch.setattr(output_processor, "RequestOutput", counting)
    finals = {}
    for kind in (CUMULATIVE, FINAL_ONLY):
        proc = OutputProcessor(tokenizer)
        proc.add_request("r", _prompt(tokenizer), params, core_ids, output_kind=kind)
        built.clear()
        outs = []
        for step in range(max(map(len, ids))):
            step_outs = []
            for cid, seq in zip(core_ids, ids, strict=True):
                if step < len(seq):
                    lp = TokenLogprobs(seq[step], -0.25 * step, 1, [(seq[step], -0.25 * step)])
                    fin = FinishReason.LENGTH if step == len(seq) - 1 else None
                    step_outs.append(
                        EngineCoreOutput(cid, [seq[step]], new_logprobs=[lp], finish_reason=fin)
                    )
            res = proc.process_outputs(step_outs)
            outs.extend(res.request_outputs)
            for cid in res.stopped_by_string:  # as LLMEngine: the core ends it
                ids[core_ids.index(cid)] = ids[core_ids.index(cid)][: step + 1]
        finals[kind] = outs[-1]
        assert outs[-1].finished and not proc.has_unfinished_requests()
        if kind is FINAL_ONLY:
            assert len(outs) == 1 and len(built) == 1  # not one per step
        else:
            assert len(built) == len(outs) > 2
    assert _final(finals[FINAL_ONLY]) == _final(finals[CUMULATIVE])
    if params.stop:
        assert finals[FINAL_ONLY].outputs[0].finish_reason == "stop"


def test_final_only_keeps_no_per_step_delta_or_copy(tokenizer, monkeypatch):
    """Per step, a FINAL_ONLY request appends to its lists and nothing else: no delta is kept
    and the whole text is never joined before the end."""
    joins = []
    real = output_processor.IncrementalDetokenizer.output_text

    def counted(self):
        joins.append(1)
        return real.fget(self)

    monkeypatch.setattr(output_processor.IncrementalDetokenizer, "output_text", property(counted))
    ids = list(tokenizer.encode(" one two three four five six seven eight nine ten"))
    proc = OutputProcessor(tokenizer)
    proc.add_request(
        "r",
        _prompt(tokenizer),
        SamplingParams(max_tokens=64, logprobs=1),
        ["r-0"],
        output_kind=FINAL_ONLY,
    )
    comp = proc._states["r"].completions["r-0"]
    for t in ids[:-1]:
        lp = TokenLogprobs(t, -1.0, 1, [(t, -1.0)])
        assert proc.process_outputs([EngineCoreOutput("r-0", [t], new_logprobs=[lp])]) == (
            output_processor.ProcessedOutputs([], {})
        )
        assert comp.delta_text == "" and comp.delta_token_ids == [] == comp.delta_logprobs
    assert joins == []
    (out,) = _feed(proc, "r-0", ids[-1:], finish=FinishReason.LENGTH)
    assert len(joins) == 1 and out.outputs[0].token_ids == ids
    assert out.outputs[0].text == tokenizer.decode(ids)
