"""The engine with LoRA on the tiny model, against itself: batched == alone, prefix cache on ==
off, preempted == not, hot load / unload with the slot LRU, no compile after warmup, no leak."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from jaxserve import LLM, SamplingParams
from jaxserve.lora.request import LoRARequest
from tests.lora.peft_util import make_peft_adapter

ENGINE = dict(max_model_len=96, max_num_seqs=8, max_num_batched_tokens=64, show_progress=False)
GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
PREFIX = list(range(300, 340))  # 40 shared tokens: 2 full blocks of 16 a prefix hit can reuse


def prompt(i: int) -> dict[str, list[int]]:
    return {"prompt_token_ids": PREFIX + [1000 + i, 2000 + i]}


@pytest.fixture(scope="module")
def loras(tmp_path_factory, tiny_model_dir) -> list[LoRARequest]:
    """Nine small adapters (ranks 4-16, varied targets)."""
    targets = [["q_proj", "v_proj"], ["gate_proj", "up_proj", "down_proj"], "all-linear"]
    out = []
    for i in range(9):
        d = tmp_path_factory.mktemp(f"lora{i}")
        rank = (4, 8, 16)[i % 3]
        make_peft_adapter(
            tiny_model_dir, d, rank=rank, alpha=rank, target_modules=targets[i % 3], seed=i
        )
        out.append(LoRARequest(f"ad{i}", i + 1, str(d)))
    return out


def _tokens(outs) -> list[list[int]]:
    return [list(o.outputs[0].token_ids) for o in outs]


def test_mixed_batch_equals_alone_cache_on_equals_off_and_preempted_keeps_its_adapter(
    tiny_model_dir: Path, loras
):
    # the base model and 4 adapters, two prompts each, all sharing PREFIX
    mix = [None, *loras[:4]] * 2
    prompts = [prompt(i % 5) for i in range(len(mix))]
    with LLM(str(tiny_model_dir), enable_lora=True, max_loras=4, max_lora_rank=16, **ENGINE) as llm:
        batched = llm.generate(prompts, GREEDY, lora_request=mix, use_tqdm=False)  # cache empty
        alone = [
            _tokens(llm.generate([p], GREEDY, lora_request=lr, use_tqdm=False))[0]
            for p, lr in zip(prompts, mix, strict=True)
        ]
        core = llm.engine.core
        assert core.num_compiles_after_warmup == 0
        assert core.scheduler.kv_cache_manager.usage == 0.0  # nothing leaked
    assert _tokens(batched) == alone
    # the adapters change the output (the test can fail), the same adapter repeats itself
    assert len({tuple(t) for t in alone[:5]}) == 5 and alone[:5] == alone[5:]
    # prefix hits only within one adapter: each prompt's second request hit its first one's
    # blocks, and no adapter hit another's, though all prompts share PREFIX (a hit across
    # adapters would give it the wrong KV)
    assert [o.num_cached_tokens for o in batched] == [0] * 5 + [32] * 5

    with LLM(
        str(tiny_model_dir),
        enable_lora=True,
        max_loras=4,
        enable_prefix_caching=False,
        enable_warmup=False,
        **ENGINE,
    ) as llm:
        assert _tokens(llm.generate(prompts, GREEDY, lora_request=mix, use_tqdm=False)) == alone

    # 19 usable blocks of 4 tokens for 10 requests that need 14 each: preemption by recompute
    with LLM(
        str(tiny_model_dir),
        enable_lora=True,
        max_loras=2,
        block_size=4,
        num_gpu_blocks_override=20,
        enable_warmup=False,
        **ENGINE,
    ) as llm:
        got = llm.generate(prompts, GREEDY, lora_request=mix, use_tqdm=False)
        assert llm.engine.core.scheduler.num_preemptions > 0
    assert _tokens(got) == alone


def test_hot_load_unload_lru_slots_no_compile_no_leak(tiny_model_dir: Path, loras):
    with LLM(str(tiny_model_dir), enable_lora=True, max_loras=8, max_lora_rank=16, **ENGINE) as llm:
        core = llm.engine.core
        manager = core.lora
        for lr in loras[:8]:  # slots 1..8, least recently used first
            llm.generate([prompt(0)], GREEDY, lora_request=lr, use_tqdm=False)
        assert sorted(manager.resident) == [1, 2, 3, 4, 5, 6, 7, 8]
        want_9 = _tokens(llm.generate([prompt(9)], GREEDY, lora_request=loras[8], use_tqdm=False))
        assert 1 not in manager.resident  # the 9th evicted the least recently used idle one
        want_2 = _tokens(llm.generate([prompt(2)], GREEDY, lora_request=loras[1], use_tqdm=False))

        async def scenario() -> list[int]:
            for lr in loras[3:8]:
                llm.generate([prompt(0)], GREEDY, lora_request=lr, use_tqdm=False)
            # slot LRU now: 3, 9, 2, 4..8; adapter 3 starts streaming (and is touched each step)
            long = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
            stream = llm.stream(prompt(3), long, lora_request=loras[2])
            it = stream.__aiter__()
            await it.__anext__()
            again = _tokens(
                llm.generate([prompt(9)], GREEDY, lora_request=loras[8], use_tqdm=False)
            )
            assert again == want_9  # resident: no load
            # adapter 1 is back from the host cache into the least recently used idle slot (2's)
            llm.generate([prompt(2)], GREEDY, lora_request=loras[0], use_tqdm=False)
            assert sorted(manager.resident) == [1, 3, 4, 5, 6, 7, 8, 9]
            # unloading the streaming adapter: refused to new requests, it finishes first
            core.remove_lora(3)
            assert 3 not in [lr.lora_int_id for lr in core.list_loras()]
            with pytest.raises(ValueError, match="being unloaded"):
                llm.generate([prompt(3)], GREEDY, lora_request=loras[2], use_tqdm=False)
            assert 3 in manager.resident
            outs = [o async for o in it]
            return list(outs[-1].outputs[0].token_ids)

        streamed = asyncio.run(scenario())
        assert len(streamed) == 40
        assert 3 not in manager.resident and 3 not in manager.cached  # freed once it ended
        assert (
            _tokens(llm.generate([prompt(2)], GREEDY, lora_request=loras[1], use_tqdm=False))
            == want_2
        )
        assert core.num_compiles_after_warmup == 0
        assert core.scheduler.kv_cache_manager.usage == 0.0
        assert core.scheduler.lora_use.refs == {}
        stats = manager.stats
        # 1 (for 9) and 2 (for 1); 2 came back into the slot unloading 3 freed
        assert stats.num_slot_evictions == 2 and stats.num_loads == 9
        assert sorted(manager.resident) == [1, 2, 4, 5, 6, 7, 8, 9]
        assert stats.requests["ad8"] == 2
        assert stats.generated_tokens["ad8"] == 24


def test_bad_adapters_fail_alone_and_the_engine_serves_on(tiny_model_dir: Path, loras, tmp_path):
    with LLM(
        str(tiny_model_dir), enable_lora=True, max_loras=1, enable_warmup=False, **ENGINE
    ) as llm:
        with pytest.raises(ValueError, match="adapter_config.json"):
            llm.generate([prompt(0)], GREEDY, lora_request=LoRARequest("x", 50, str(tmp_path)))
        big = make_peft_adapter(
            tiny_model_dir, tmp_path / "big", rank=32, alpha=32, target_modules=["q_proj"]
        )
        with pytest.raises(ValueError, match="max_lora_rank"):
            llm.generate([prompt(0)], GREEDY, lora_request=LoRARequest("big", 51, str(big)))
        other = LoRARequest("other", loras[0].lora_int_id, loras[1].lora_path)
        llm.generate([prompt(0)], GREEDY, lora_request=loras[0], use_tqdm=False)
        with pytest.raises(ValueError, match="already used by adapter"):
            llm.generate([prompt(0)], GREEDY, lora_request=other, use_tqdm=False)
        out = llm.generate([prompt(0)], GREEDY, use_tqdm=False)
        assert len(out[0].outputs[0].token_ids) == 12
        assert llm.engine.core.scheduler.kv_cache_manager.usage == 0.0
    with LLM(str(tiny_model_dir), enable_warmup=False, **ENGINE) as llm:
        with pytest.raises(ValueError, match="lora_request: this engine serves no LoRA"):
            llm.generate([prompt(0)], GREEDY, lora_request=loras[0], use_tqdm=False)
