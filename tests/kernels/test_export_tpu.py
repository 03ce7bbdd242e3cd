"""Lowering without hardware: every TPU kernel configuration the engine can select is exported
for platform "tpu" inside an abstract v5e / v6e mesh and serialized; a lowering error fails.

The Pallas->Mosaic lowering runs in jax (block-shape tiling rules, supported ops, SMEM/VMEM
ref types, DMA and semaphore ops); Mosaic's own compiler (vector layouts, VMEM/SMEM capacity)
runs only on a TPU host, so this proves the kernel lowers, not that it compiles there.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import AbstractDevice, AbstractMesh, use_abstract_mesh

from jaxserve.config import CacheConfig, SchedulerConfig
from jaxserve.runner.step_inputs import Buckets
from pallas_kernels.ragged_paged_attention import ragged_paged_attention
from pallas_kernels.ragged_paged_attention import tpu as rpa_tpu
from tests.kernels.cases import input_specs

# jax's device_kind strings for TPU v5e and v6e (tpu_info.chip_version_from_device_kind)
DEVICE_KINDS = {"v5e": "TPU v5 lite", "v6e": "TPU v6 lite"}
# (num_q_heads, num_kv_heads, head_dim, sliding_window) of models the engine serves: the
# built-in SmolLM2-135M (GQA 3, head_dim 64) and a Llama-3-8B / Mistral-like shape (GQA 4,
# head_dim 128) with a sliding window.
MODELS = {"smollm2_135m": (9, 3, 64, None), "llama8b_window": (32, 8, 128, 4096)}
NUM_LAYERS = 2
NUM_BLOCKS = 1000


def engine_kernel_configs(dtype) -> dict[tuple[int, int], tuple[int, int, int]]:
    """Default engine buckets -> the static kernel configs they select: (q_block, pages per
    chunk) -> the largest (T, R, B) step shape using it. Other shapes with the same config
    lower the same kernel body over a smaller grid and smaller arrays."""
    sched, cache = SchedulerConfig(), CacheConfig()
    buckets = Buckets.make(
        sched.max_num_batched_tokens, sched.max_num_seqs, sched.max_model_len, cache.block_size
    )
    configs = {}
    for t, r, b in buckets.all_shapes():
        configs[rpa_tpu.default_knobs(t, cache.block_size, b, dtype)] = (t, r, b)
    return configs


def _export(fn, shapes, kind: str) -> jax.export.Exported:
    mesh = AbstractMesh(
        (1,), ("x",), abstract_device=AbstractDevice(device_kind=kind, num_cores=1, platform="tpu")
    )
    with use_abstract_mesh(mesh):
        return jax.export.export(jax.jit(fn), platforms=["tpu"])(*shapes)


def _shapes(t, r, b, hq, hkv, d, dtype, block_size=16):
    # The engine's flat cache view [L * num_blocks, ...]; num_seqs is made inside the step.
    return input_specs(
        t,
        r,
        b,
        num_q_heads=hq,
        num_kv_heads=hkv,
        head_dim=d,
        dtype=dtype,
        block_size=block_size,
        num_blocks=NUM_LAYERS * NUM_BLOCKS,
    )[:6]


@pytest.mark.parametrize("chip", sorted(DEVICE_KINDS))
@pytest.mark.parametrize("model", sorted(MODELS))
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_engine_configs_lower_for_tpu(chip, model, dtype):
    hq, hkv, d, window = MODELS[model]
    configs = engine_kernel_configs(jnp.dtype(dtype))
    assert len(configs) >= 4  # several q tiles and chunk widths are in play
    for (q_block, pages), (t, r, b) in sorted(configs.items()):

        def step_attention(q, k, v, kv_lens, tables, cu):
            # What jaxserve.model.layers.pallas_paged_attention passes on a TPU host, where
            # platform=None resolves to "tpu" (test_rpa_tpu.py::test_platform_resolution).
            num_seqs = jnp.full((1,), kv_lens.shape[0], jnp.int32)
            return ragged_paged_attention(
                q,
                k,
                v,
                kv_lens,
                tables,
                cu,
                num_seqs,
                sm_scale=d**-0.5,
                sliding_window=window,
                platform="tpu",
            )

        shapes = _shapes(t, r, b, hq, hkv, d, jnp.dtype(dtype))
        exp = _export(step_attention, shapes, DEVICE_KINDS[chip])
        blob = exp.serialize()
        assert exp.platforms == ("tpu",)
        assert "tpu_custom_call" in exp.mlir_module(), (q_block, pages)
        again = jax.export.deserialize(blob)
        assert again.out_avals == (jax.core.ShapedArray((t, hq, d), jnp.dtype(dtype)),)


def test_untileable_block_fails_to_lower():
    # The check above is live: a q tile of 4 float32 rows breaks the (8, 128) tiling rule and
    # the export raises (the public entry rejects it earlier; the kernel is called directly).
    def bad(q, k, v, kv_lens, tables, cu):
        num_seqs = jnp.ones((1,), jnp.int32)
        return rpa_tpu.ragged_paged_attention_tpu(
            q, k, v, kv_lens, tables, cu, num_seqs, sm_scale=0.1, q_block=4
        )

    with pytest.raises(ValueError, match="divisible by 8 and 128"):
        _export(bad, _shapes(16, 4, 8, 8, 2, 128, jnp.float32), DEVICE_KINDS["v5e"])
