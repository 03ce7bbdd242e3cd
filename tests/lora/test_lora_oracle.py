"""LoRA against its oracle: transformers + peft on the same base weights and adapter files.

Logits of every position (f32, relative error <= 1e-4) through the model's forward with the
adapter written into a device slot, for tiny Llama and Qwen2 models and the default model,
rank 8 and 16, several target sets; and 32 greedy tokens through the engine (LLM with
enable_lora) for several adapters at once.
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxserve import LLM, SamplingParams
from jaxserve.lora.adapter import load_peft_adapter
from jaxserve.lora.request import LoRARequest
from jaxserve.model import llama
from jaxserve.model.loader import load_model
from jaxserve.runner.lora_slots import DeviceLoRASlots
from tests.lora.peft_util import make_peft_adapter, peft_greedy, peft_logits
from tests.model.helpers import BLOCK_SIZE, NUM_BLOCKS, rel_err, single_request_md
from tests.model.tiny_hf import write_tiny_hf

ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
MLP = ["gate_proj", "up_proj", "down_proj"]
# (rank, target modules, rsLoRA): the rank 8 and 16 over several target sets
CASES = [(8, ["q_proj", "v_proj"], False), (16, MLP, False), (16, ATTN + MLP, True)]
PROMPT = [5, 17, 42, 99, 3, 250, 77, 12, 1, 200, 31, 64]


@pytest.fixture(scope="module")
def bases(tmp_path_factory, tiny_model_dir) -> dict[str, str]:
    # qkv biases, an untied lm_head, and SmolLM2's tokenizer (so the engine can serve it)
    qwen2 = write_tiny_hf(
        tmp_path_factory.mktemp("qwen2"), arch="Qwen2ForCausalLM", kv_heads=2, tie=False
    )
    return {"llama": str(tiny_model_dir), "qwen2": str(qwen2), "smollm2": "smollm2-135m"}


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, bases) -> dict[tuple[str, int], Path]:
    out = {}
    for name, base in bases.items():
        for i, (rank, targets, rslora) in enumerate(CASES):
            d = tmp_path_factory.mktemp(f"{name}-lora{i}")
            out[(name, i)] = make_peft_adapter(
                base,
                d,
                rank=rank,
                alpha=2 * rank,
                target_modules=targets,
                use_rslora=rslora,
                seed=i,
            )
    return out


def _our_logits(loaded, adapter: Path | None, ids: list[int]) -> np.ndarray:
    spec = loaded.spec
    # slot 2 of 2, so a wrong slot index would read zeros (the base) and fail the test
    slots = DeviceLoRASlots(
        spec, spec, num_slots=2, rank=16, dtype=jnp.float32, mesh=None, device=jax.devices()[0]
    )
    slot = 0
    if adapter is not None:
        slots.write(2, load_peft_adapter(adapter, spec, 16))
        slot = 2
    n = len(ids)
    kv = llama.init_kv_cache(spec, NUM_BLOCKS, BLOCK_SIZE)
    hidden, _ = llama.forward(
        loaded.params,
        spec,
        jnp.asarray(ids, jnp.int32),
        jnp.arange(n, dtype=jnp.int32),
        single_request_md(0, n, 12),
        kv,
        lora=slots.stacks,
        lora_slots=jnp.full((n,), slot, jnp.int32),
    )
    return np.asarray(llama.compute_logits(loaded.params, spec, hidden))


@pytest.mark.parametrize("base", ["llama", "qwen2", "smollm2"])
def test_logits_match_peft(bases, adapters, base):
    loaded = load_model(bases[base], "float32")
    ids = [t % loaded.spec.vocab_size for t in PROMPT]
    plain = _our_logits(loaded, None, ids)
    for i in range(len(CASES)):
        want = peft_logits(bases[base], adapters[(base, i)], ids)
        got = _our_logits(loaded, adapters[(base, i)], ids)
        assert rel_err(got, want) <= 1e-4, (base, CASES[i])
        assert rel_err(plain, want) > 1e-2  # the adapter matters: the test can fail


@pytest.mark.parametrize("base", ["llama", "qwen2", "smollm2"])
def test_32_greedy_tokens_match_peft_with_all_adapters_in_one_engine(bases, adapters, base):
    loras = [LoRARequest(f"{base}-{i}", i + 1, str(adapters[(base, i)])) for i in range(len(CASES))]
    params = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
    prompt = {"prompt_token_ids": PROMPT}
    with LLM(
        model=bases[base],
        enable_lora=True,
        max_loras=len(CASES),
        max_lora_rank=16,
        max_model_len=64,
        max_num_seqs=4,
        max_num_batched_tokens=32,
        enable_warmup=False,
        show_progress=False,
    ) as llm:
        outs = llm.generate([prompt] * len(loras), params, lora_request=loras, use_tqdm=False)
    for lora, out in zip(loras, outs, strict=True):
        want = peft_greedy(bases[base], lora.lora_path, PROMPT, 32)
        assert list(out.outputs[0].token_ids) == want, lora.lora_name
