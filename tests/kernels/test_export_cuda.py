"""The Mosaic GPU ragged paged attention lowers for CUDA on a CPU-only machine.

`jax.export(..., platforms=["cuda"])` runs the whole Pallas -> Mosaic GPU lowering (layout
inference, WGMMA operand and TMA shape checks, shared-memory transforms) in Python and embeds
the resulting Mosaic GPU MLIR module in a `mosaic_gpu_v2` custom call; no GPU, CUDA plugin or
ptxas is involved (those compile the module on first use on a GPU). Every configuration the
engine can select is exported and serialized here, so a kernel that no longer lowers fails
CI instead of the first GPU run.
"""

from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp
import pytest

from pallas_kernels.ragged_paged_attention.gpu import (
    ROWS_PER_TILE,
    default_num_kv_splits,
    ragged_paged_attention_gpu,
)
from tests.kernels.cases import input_specs

# Two step shapes per configuration: (T tokens, R request rows, B table entries per row).
# A small decode batch over long contexts takes the split-K path; a big mixed step does not.
SHAPES = {"small_long": (8, 4, 256), "big_mixed": (512, 64, 32)}

# The configurations: every head_dim x block_size x dtype the engine can pair with the CUDA
# kernel, each with a different GQA ratio and attention variant so all ratios and variants
# are covered without exporting the full cross product (~0.5 s per export on 2 cores).
GQA = [(8, 8), (24, 8), (32, 8), (32, 4)]  # ratios 1, 3, 4, 8
VARIANTS = [
    dict(),
    dict(sliding_window=4096),
    dict(soft_cap=30.0),
    dict(sliding_window=512, soft_cap=50.0),
]
CONFIGS = [
    dict(head_dim=d, block_size=bs, dtype=dt, heads=GQA[i % 4], variant=VARIANTS[i % 4])
    for i, (d, bs, dt) in enumerate(
        itertools.product((64, 128), (16, 32), (jnp.bfloat16, jnp.float16, jnp.float32))
    )
]


def _specs(t, r, b, *, head_dim, block_size, dtype, heads):
    hq, hkv = heads
    return input_specs(
        t,
        r,
        b,
        num_q_heads=hq,
        num_kv_heads=hkv,
        head_dim=head_dim,
        dtype=dtype,
        block_size=block_size,
        num_blocks=r * b + 1,
    )


@pytest.mark.parametrize("shape", sorted(SHAPES))
@pytest.mark.parametrize(
    "config",
    CONFIGS,
    ids=[
        f"d{c['head_dim']}-bs{c['block_size']}-{jnp.dtype(c['dtype']).name}"
        f"-gqa{c['heads'][0] // c['heads'][1]}-{'-'.join(c['variant']) or 'plain'}"
        for c in CONFIGS
    ],
)
def test_exports_for_cuda(config, shape):
    t, r, b = SHAPES[shape]
    specs = _specs(
        t,
        r,
        b,
        head_dim=config["head_dim"],
        block_size=config["block_size"],
        dtype=config["dtype"],
        heads=config["heads"],
    )
    fn = functools.partial(
        ragged_paged_attention_gpu, sm_scale=config["head_dim"] ** -0.5, **config["variant"]
    )
    exported = jax.export.export(jax.jit(fn), platforms=["cuda"])(*specs)
    blob = exported.serialize()
    assert len(blob) > 0
    restored = jax.export.deserialize(blob)
    assert restored.platforms == ("cuda",)
    assert restored.out_avals[0].shape == specs[0].shape
    text = exported.mlir_module()
    assert "mosaic_gpu" in text, "the kernel did not lower to a Mosaic GPU custom call"


def test_shapes_cover_both_split_paths():
    # The export matrix must include a step that takes split-K and one that does not.
    splits = {}
    for name, (t, r, b) in SHAPES.items():
        hq, hkv = GQA[-1]
        max_tiles = -(-(t * hq // hkv) // ROWS_PER_TILE) + r
        splits[name] = default_num_kv_splits(max_tiles, hkv, b * 16)
    assert splits["small_long"] > 1
    assert splits["big_mixed"] == 1


@pytest.mark.parametrize(
    ("block_size", "dtype"),
    [(8, jnp.bfloat16), (64, jnp.bfloat16), (128, jnp.bfloat16), (64, jnp.float32)],
)
def test_exports_other_page_sizes(block_size, dtype):
    # The engine takes any power-of-two block_size; 8 means 8 TMAs per 64-key step, 128 a
    # 128-key step (the largest shared-memory footprint, see NOTES.md; f32 stops at 64).
    specs = _specs(
        64,
        8,
        4096 // block_size,
        head_dim=128,
        block_size=block_size,
        dtype=dtype,
        heads=(32, 8),
    )
    fn = functools.partial(ragged_paged_attention_gpu, sm_scale=0.1)
    exported = jax.export.export(jax.jit(fn), platforms=["cuda"])(*specs)
    assert len(exported.serialize()) > 0


def _mosaic_gpu_module_text(fn, specs) -> str:
    """The Mosaic GPU module the cuda lowering embeds in its custom call, as text."""
    from jax._src.interpreters import mlir as jax_mlir
    from jax._src.lib.mlir import ir

    module = jax.jit(fn).trace(*specs).lower(lowering_platforms=("cuda",)).compiler_ir()
    calls = []

    def walk(op):
        for region in op.regions:
            for block in region.blocks:
                for inner in block.operations:
                    if inner.operation.name == "stablehlo.custom_call":
                        calls.append(inner)
                    walk(inner)

    walk(module.operation)
    (call,) = [c for c in calls if "mosaic_gpu" in str(c.attributes["call_target_name"])]
    blob = call.attributes["mhlo.backend_config"]["module"].value_bytes
    ctx = jax_mlir.make_ir_context()
    ctx.allow_unregistered_dialects = True  # print-only: the Mosaic GPU dialects stay opaque
    with ctx:
        return str(ir.Module.parse(blob))


def test_lowered_kernel_streams_pages_by_tma_into_wgmma():
    # The exported module is the real kernel, not a fallback: KV pages arrive by TMA
    # (cp.async.bulk.tensor) on mbarriers and both products run on the tensor cores
    # (wgmma.mma_async); float32 issues exactly three times the bf16 MMAs (bf16x3).
    fn = functools.partial(ragged_paged_attention_gpu, sm_scale=0.1)
    texts = {
        dt: _mosaic_gpu_module_text(
            fn, _specs(64, 8, 16, head_dim=128, block_size=16, dtype=dt, heads=(8, 2))
        )
        for dt in (jnp.bfloat16, jnp.float32)
    }
    for text in texts.values():
        assert "cp.async.bulk.tensor.shared.cluster.global" in text
        assert "mbarrier.try_wait.parity" in text
    n_bf16 = texts[jnp.bfloat16].count("wgmma.mma_async")
    assert n_bf16 > 0
    assert texts[jnp.float32].count("wgmma.mma_async") == 3 * n_bf16
