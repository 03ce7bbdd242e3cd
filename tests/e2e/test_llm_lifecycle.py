"""The LLM as a notebook uses it: made and closed repeatedly in one process, driven from
inside a running asyncio loop, streamed from concurrently, and asked what it did.

Tiny random model (fast); greedy outputs of generate() are the oracle for every stream.
"""

from __future__ import annotations

import asyncio
import gc

import jax
import pytest

from jaxserve import LLM, SamplingParams

ENGINE = dict(
    max_model_len=128,
    max_num_batched_tokens=64,
    max_num_seqs=8,
    enable_warmup=False,
    show_progress=False,
)
GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
PROMPTS = [{"prompt_token_ids": list(range(100, 100 + n))} for n in (9, 23)]


def live_device_bytes() -> int:
    return sum(x.nbytes for x in jax.live_arrays())


@pytest.fixture(scope="module")
def llm(tiny_model_dir):
    with LLM(str(tiny_model_dir), **ENGINE) as llm:
        yield llm


@pytest.fixture(scope="module")
def reference(llm):
    """generate()'s greedy token ids for PROMPTS, outside any event loop."""
    return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)]


def assert_idle(llm: LLM) -> None:
    """No request left in the engine and every KV block back in the free queue."""
    stats = llm.stats
    assert stats["num_running_reqs"] == stats["num_waiting_reqs"] == 0, stats
    assert stats["num_used_blocks"] == 0 and stats["kv_cache_usage"] == 0.0, stats
    assert not llm.engine.has_unfinished_requests()


def test_create_close_recreate_returns_device_memory(tiny_model_dir):
    """The issue's check: 3 create/close cycles leave live device bytes where they started,
    even when the engine is closed with a stream still in flight."""
    before = live_device_bytes()
    for _ in range(3):
        llm = LLM(str(tiny_model_dir), **ENGINE)
        assert live_device_bytes() > before
        llm.generate(PROMPTS[0], GREEDY, use_tqdm=False)
        stream = llm.stream(PROMPTS[1], GREEDY)

        async def read_one(stream=stream):
            return await stream.__anext__()

        assert asyncio.run(read_one()).outputs[0].token_ids  # mid-request, blocks held
        llm.close()
        assert live_device_bytes() == before
    with pytest.raises(RuntimeError, match="closed"):
        asyncio.run(read_one())
    with pytest.raises(RuntimeError, match="closed"):
        llm.generate("hi", GREEDY)
    assert repr(llm).endswith("closed)")


def test_dropping_the_llm_without_close_frees_device_memory(tiny_model_dir):
    before = live_device_bytes()
    llm = LLM(str(tiny_model_dir), **ENGINE)
    llm.generate(PROMPTS[0], GREEDY, use_tqdm=False)
    del llm
    gc.collect()
    assert live_device_bytes() == before


def test_generate_and_concurrent_streams_inside_running_loop(llm, reference):
    async def collect(stream):
        return [out async for out in stream]

    async def main():
        inside = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
        with llm.measure() as run:
            streams = [llm.stream(p, GREEDY) for p in PROMPTS]
            outs = await asyncio.gather(*(collect(s) for s in streams))
        return inside, outs, run.result

    inside, (outs_a, outs_b), run = asyncio.run(main())
    assert [o.outputs[0].token_ids for o in inside] == reference
    for outs, ref in zip((outs_a, outs_b), reference, strict=True):
        # cumulative: one output per generated token, each extending the previous one
        assert [len(o.outputs[0].token_ids) for o in outs] == list(range(1, 13))
        assert outs[-1].outputs[0].token_ids == ref and outs[-1].finished
        assert not any(o.finished for o in outs[:-1])
        assert outs[-1].outputs[0].text == llm.get_tokenizer().decode(ref)
    # The two requests shared steps: run one after the other they would need 24.
    assert run.num_steps == 12, run
    assert run.num_requests == 2 and run.generation_tokens == 24
    assert_idle(llm)


def test_streams_interleave_in_one_task_group(llm, reference):
    """Consumers take turns: the second stream's first token arrives before the first ends."""
    order: list[int] = []

    async def consume(i, stream):
        async for out in stream:
            order.append(i)
            assert not out.finished or len(out.outputs[0].token_ids) == 12

    async def main():
        await asyncio.gather(*(consume(i, llm.stream(p, GREEDY)) for i, p in enumerate(PROMPTS)))

    asyncio.run(main())
    assert sorted(order) == [0] * 12 + [1] * 12
    assert order.index(1) < len(order) - 1 - order[::-1].index(0)
    assert_idle(llm)


def test_delta_stream_concatenates_to_generate(llm):
    params = SamplingParams(n=2, temperature=1.0, max_tokens=10, seed=3, ignore_eos=True)
    ref = llm.generate(PROMPTS[0], params, use_tqdm=False)[0]

    async def main():
        return [out async for out in llm.stream(PROMPTS[0], params, delta=True)]

    outs = asyncio.run(main())
    for comp in ref.outputs:
        pieces = [c for o in outs for c in o.outputs if c.index == comp.index]
        assert all(len(c.token_ids) == 1 for c in pieces)  # one new token per delta
        assert [t for c in pieces for t in c.token_ids] == comp.token_ids
        assert "".join(c.text for c in pieces) == comp.text
    assert outs[-1].finished and not any(o.finished for o in outs[:-1])


@pytest.mark.parametrize("how", ["break", "aclose", "async_with", "exception"])
def test_leaving_a_stream_early_aborts_it(llm, reference, how):
    async def main():
        stream = llm.stream(PROMPTS[1], GREEDY)
        if how == "break":
            async for out in stream:
                if len(out.outputs[0].token_ids) == 3:
                    break
            del stream  # what leaving a notebook cell's `async for` does
        elif how == "aclose":
            await stream.__anext__()
            await stream.aclose()
            assert [o async for o in stream] == []
        elif how == "async_with":
            async with stream:
                await stream.__anext__()
        else:
            with pytest.raises(KeyError):
                async for _ in stream:
                    raise KeyError("consumer failed")
            del stream
        # aborted at once, not at the next step: nothing holds a KV block now
        assert_idle(llm)
        # and the engine serves the same prompt as before
        out = llm.generate(PROMPTS[1], GREEDY, use_tqdm=False)[0]
        assert out.outputs[0].token_ids == reference[1]

    asyncio.run(main())


def test_generate_while_a_stream_is_open_routes_outputs_to_both(llm, reference):
    async def main():
        stream = llm.stream(PROMPTS[0], GREEDY, delta=True)
        first = await stream.__anext__()
        # generate() drives the steps now; the stream's tokens must wait in its queue
        out = llm.generate(PROMPTS[1], GREEDY, use_tqdm=False)[0]
        rest = [o async for o in stream]
        return first, out, rest

    first, out, rest = asyncio.run(main())
    assert out.outputs[0].token_ids == reference[1]
    tokens = first.outputs[0].token_ids + [t for o in rest for t in o.outputs[0].token_ids]
    assert tokens == reference[0]
    assert_idle(llm)


def test_stream_bad_input_raises_at_the_call_and_queues_nothing(llm):
    with pytest.raises(ValueError, match="max_tokens"):
        llm.stream("hi", SamplingParams(max_tokens=0))
    with pytest.raises(ValueError, match="max_model_len"):
        llm.stream({"prompt_token_ids": list(range(1, 300))}, GREEDY)
    assert_idle(llm)


def test_a_lost_request_raises_instead_of_hanging_the_cell(llm):
    stream = llm.stream(PROMPTS[0], GREEDY)
    # Simulate a bug: the core forgets the request behind the API's back.
    llm.engine.core.abort_requests(list(llm.engine.core.scheduler.requests))
    with pytest.raises(RuntimeError, match="no request to run"):
        asyncio.run(stream.__anext__())
    stream.abort()
    assert_idle(llm)


def test_run_stats_count_what_the_run_did(llm):
    prefix = list(range(1000, 1064))  # 4 full blocks shared by every prompt
    prompts = [{"prompt_token_ids": prefix + [2000 + i] * 5} for i in range(3)]
    before = llm.stats
    llm.generate(prompts[0], GREEDY, use_tqdm=False)  # puts the prefix in the cache
    outs = llm.generate(prompts, GREEDY, use_tqdm=False)
    run = llm.last_run
    assert run.num_requests == 3 and run.prompt_tokens == 3 * 69
    assert run.generation_tokens == sum(len(o.outputs[0].token_ids) for o in outs) == 36
    # the 4 prefix blocks hit for all three (the first call cached them); the 5-token tails
    # fill no block, so they are never cached
    assert run.prefix_cache_hits == 3 * 64 and run.prefix_cache_queries == 3 * 69
    assert 0.0 < run.prefix_cache_hit_rate <= 1.0
    assert run.num_preemptions == 0 and run.num_compiles_after_warmup == 0
    # one KV sample per step (after it). Each request holds the 4 shared prefix blocks (counted
    # once) and one own block: its 69 + 11 computed tokens fit in 5 blocks. The last step
    # finishes all three, so their blocks are free after it.
    assert len(run.kv_blocks_used) == run.num_steps == 12
    assert run.kv_blocks_used[:-1] == (4 + 3,) * 11 and run.kv_blocks_used[-1] == 0
    assert run.num_kv_blocks == llm.stats["num_blocks"] - 1
    assert run.kv_usage[0] == run.kv_blocks_used[0] / run.num_kv_blocks
    after = llm.stats
    assert after["num_requests"] - before["num_requests"] == 4
    assert after["generation_tokens"] - before["generation_tokens"] == 48
    # the first call's 69-token prompt took two prefill chunks (64-token budget); the second
    # call's three prompts hit the prefix, so their 15 uncached tokens fit in one step
    assert after["num_steps"] - before["num_steps"] == 13 + 12
    assert "3 requests" in repr(run) and run.as_dict()["kv_blocks_used"] == list(run.kv_blocks_used)


def test_repr_names_the_engine(llm):
    text = repr(llm)
    for part in (
        "model=",
        "dtype=float32",
        "devices=[cpu:0]",
        "max_model_len=128",
        "blocks x 16 tokens",
        "MiB",
        "buckets=tokens (16, 32, 64)",
        "prefix_caching=True",
        "attention_backend='xla'",
    ):
        assert part in text, text


def test_weights_are_on_the_device_once(tiny_model_dir):
    # vllm#21073's cousin: the loaded weights and the runner's placed copy both alive would
    # hold the model twice. An open engine holds exactly its params and its KV cache.
    gc.collect()
    before = live_device_bytes()
    with LLM(str(tiny_model_dir), **ENGINE) as fresh:
        runner = fresh._engine().core.runner
        params = sum(x.nbytes for x in jax.tree.leaves(runner.params))
        # (and the last step's sampled ids, i32[largest R bucket], for async scheduling)
        held = params + runner.kv_cache_bytes + runner.last_token_ids.nbytes
        assert live_device_bytes() - before == held
