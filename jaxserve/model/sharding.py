"""Tensor-parallel layout: logical axis names per param, one rules table, mesh placement.

Every array the step touches names its axes logically (`LOGICAL_AXES`); `RULES` maps each
logical axis onto a mesh axis (`data`, `model`) or None (replicated). The layout is Megatron's:
wq/wk/wv/w_gate/w_up are column-parallel (output features split), wo/w_down row-parallel (input
features split, so each layer needs two all-reduces: after the attention and after the MLP),
embed/lm_head vocab-parallel (logits are gathered once per step, before sampling), and the KV
block array [L, num_blocks, block_size, Hkv, D] is split over kv heads.

When the tensor-parallel size exceeds the model's kv heads, each kv head is repeated
`kv_repeat(spec, tp)` times (the wk/wv columns and the cache's kv-head axis), so the model runs
as if it had `tp` kv heads: device d then holds exactly the kv head its query heads read. The
"execution spec" (`tp_spec`) is the model's spec with that replicated kv-head count; the
model's own spec stays what the checkpoint says.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from jaxserve.model import layers
from jaxserve.model.attention import KVCache
from jaxserve.model.llama import LayerParams, Params, param_shapes
from jaxserve.model.lora import LORA_TARGETS, LoRAStacks, stack_shapes
from jaxserve.model.spec import ModelSpec

# Mesh axes: `data` splits independent replicas (size 1 inside one engine), `model` is TP.
MESH_AXES = ("data", "model")

# Logical axes of every param field (layer fields lead with "layers"), and of the KV cache.
LOGICAL_AXES: dict[str, tuple[str, ...]] = {
    "embed": ("vocab", "embed"),
    "lm_head": ("embed", "vocab"),
    "final_norm": ("embed",),
    "attn_norm": ("layers", "embed"),
    "mlp_norm": ("layers", "embed"),
    "wq": ("layers", "embed", "q_heads"),
    "wk": ("layers", "embed", "kv_heads"),
    "wv": ("layers", "embed", "kv_heads"),
    "wo": ("layers", "q_heads", "embed"),
    "w_gate": ("layers", "embed", "mlp"),
    "w_up": ("layers", "embed", "mlp"),
    "w_down": ("layers", "mlp", "embed"),
    "bq": ("layers", "q_heads"),
    "bk": ("layers", "kv_heads"),
    "bv": ("layers", "kv_heads"),
    "q_norm": ("layers", "head_dim"),
    "k_norm": ("layers", "head_dim"),
    "kv_cache": ("layers", "blocks", "block_size", "kv_heads", "head_dim"),
    # the step's logits before they are gathered for sampling
    "logits": ("reqs", "vocab"),
}

# The one rules table: logical axis -> mesh axis (None: replicated on every device).
RULES: dict[str, str | None] = {
    "vocab": "model",
    "q_heads": "model",
    "kv_heads": "model",
    "mlp": "model",
    "embed": None,
    "layers": None,
    "head_dim": None,
    "blocks": None,
    "block_size": None,
    "reqs": None,
    "lora_slots": None,
    "lora_rank": None,
}


def logical_to_spec(axes: Sequence[str]) -> PartitionSpec:
    return PartitionSpec(*(RULES[a] for a in axes))


def valid_tp_sizes(spec: ModelSpec) -> list[int]:
    """TP sizes that divide the query heads and relate to the kv heads by division."""
    hq, hkv = spec.num_q_heads, spec.num_kv_heads
    return [t for t in range(1, hq + 1) if hq % t == 0 and (hkv % t == 0 or t % hkv == 0)]


def check_tp_size(spec: ModelSpec, tp: int) -> None:
    valid = valid_tp_sizes(spec)
    if tp not in valid:
        raise ValueError(
            f"tensor_parallel_size={tp} does not fit the model's {spec.num_q_heads} query heads "
            f"and {spec.num_kv_heads} kv heads; valid sizes: {valid}"
        )


def kv_repeat(spec: ModelSpec, tp: int) -> int:
    """How many times each kv head is repeated so every device holds the one it needs."""
    check_tp_size(spec, tp)
    return max(1, tp // spec.num_kv_heads)


def tp_spec(spec: ModelSpec, tp: int) -> ModelSpec:
    """The execution spec: `spec` with its kv heads repeated up to `tp` when fewer."""
    return dataclasses.replace(spec, num_kv_heads=spec.num_kv_heads * kv_repeat(spec, tp))


def make_mesh(tp: int, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (data=1, model=tp) mesh over `devices` (default: the first tp devices), Auto axes."""
    if devices is None:
        devices = jax.devices()[:tp]
    devices = list(devices)
    if len(devices) != tp:
        raise ValueError(
            f"tensor_parallel_size={tp} needs {tp} devices, got {len(devices)} "
            f"({len(jax.devices())} visible)"
        )
    return jax.make_mesh(
        (1, tp), MESH_AXES, axis_types=(AxisType.Auto, AxisType.Auto), devices=devices
    )


def named(mesh: Mesh, logical: str, shape: Sequence[int] | None = None) -> NamedSharding:
    """The NamedSharding of a logical array; with `shape`, a dim the mesh axis does not divide
    stays replicated (e.g. SmolLM2's vocab 49152 or MLP 1536 at TP=9): correct, just unsplit.
    """
    axes = LOGICAL_AXES[logical]
    if shape is None:
        return NamedSharding(mesh, logical_to_spec(axes))
    return _named_axes(mesh, axes, shape)


def param_shardings(exec_spec: ModelSpec, mesh: Mesh) -> Params:
    """A Params-shaped pytree of NamedShardings for the execution spec (see `tp_spec`);
    fields the model does not have (biases, qk norms, an untied lm_head) are None."""
    shapes = param_shapes(exec_spec)

    def of(name: str) -> NamedSharding | None:
        return named(mesh, name, shapes[name]) if name in shapes else None

    return Params(
        embed=of("embed"),
        layers=LayerParams(**{f.name: of(f.name) for f in dataclasses.fields(LayerParams)}),
        final_norm=of("final_norm"),
        lm_head=of("lm_head"),
    )


def lora_axes(target: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Logical axes of a target's LoRA slots (A [L, in, S, r], B [L, S, r, out]).

    A and B shard with the weight they modify: a column-parallel weight (output features
    split) splits B's output, so each device adds the delta of its own columns; a row-parallel
    one (input split) splits A's input, and x @ A is summed over devices like x @ W is.
    """
    layers_axis, in_axis, out_axis = LOGICAL_AXES[target]
    return (
        (layers_axis, in_axis, "lora_slots", "lora_rank"),
        (layers_axis, "lora_slots", "lora_rank", out_axis),
    )


def _named_axes(mesh: Mesh, axes: Sequence[str], shape: Sequence[int]) -> NamedSharding:
    """Logical axes -> NamedSharding; a dim the mesh axis does not divide stays replicated."""
    spec = logical_to_spec(axes)
    return NamedSharding(
        mesh,
        PartitionSpec(
            *(
                ax if ax is None or dim % mesh.shape[ax] == 0 else None
                for ax, dim in zip(spec, shape, strict=True)
            )
        ),
    )


def lora_shardings(exec_spec: ModelSpec, mesh: Mesh, num_slots: int, rank: int) -> LoRAStacks:
    """A LoRAStacks-shaped pytree of NamedShardings for the execution spec."""
    shapes = stack_shapes(exec_spec, num_slots, rank)
    a, b = {}, {}
    for t in LORA_TARGETS:
        a_axes, b_axes = lora_axes(t)
        a[t] = _named_axes(mesh, a_axes, shapes[t][0])
        b[t] = _named_axes(mesh, b_axes, shapes[t][1])
    return LoRAStacks(a=a, b=b)


def lora_b_exec_layout(spec: ModelSpec, tp: int, target: str, b: np.ndarray) -> np.ndarray:
    """An adapter's B [..., out] in the execution layout: wk/wv columns repeated like the
    weights when TP exceeds the kv heads (see `place_params`)."""
    r = kv_repeat(spec, tp)
    if r == 1 or target not in ("wk", "wv"):
        return b
    return _repeat_kv_columns(b, spec.head_dim, r)


def kv_cache_sharding(mesh: Mesh) -> KVCache:
    s = named(mesh, "kv_cache")
    return KVCache(k=s, v=s)


def _repeat_kv_columns(x: np.ndarray | jax.Array, head_dim: int, r: int) -> np.ndarray:
    """[..., Hkv * D] -> [..., Hkv * r * D]: each kv head's D columns repeated r times."""
    xp = np if isinstance(x, np.ndarray) else jnp
    lead = x.shape[:-1]
    h = x.shape[-1] // head_dim
    x = x.reshape(*lead, h, 1, head_dim)
    x = xp.broadcast_to(x, (*lead, h, r, head_dim))
    return x.reshape(*lead, h * r * head_dim)


def _place(x: np.ndarray | jax.Array, sharding: NamedSharding) -> jax.Array:
    """Puts one array on the mesh shard by shard (no device ever holds the full array)."""
    if isinstance(x, jax.Array):
        if x.sharding == sharding:
            return x
        return jax.device_put(x, sharding)
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])


def place_params(spec: ModelSpec, params: Params, mesh: Mesh) -> Params:
    """Model-layout params (host numpy or jax arrays) -> execution-layout params on the mesh.

    Repeats the kv columns when TP exceeds the kv heads (on the host for numpy leaves), then
    places each array with its NamedSharding. Params already in the execution layout with the
    target shardings are returned as they are.
    """
    tp = mesh.shape["model"]
    r = kv_repeat(spec, tp)
    exec_kv = spec.num_kv_heads * r * spec.head_dim
    layers = params.layers
    if r > 1 and layers.wk.shape[-1] != exec_kv:
        repeated = {
            name: _repeat_kv_columns(getattr(layers, name), spec.head_dim, r)
            for name in ("wk", "wv", "bk", "bv")
            if getattr(layers, name) is not None
        }
        params = dataclasses.replace(params, layers=dataclasses.replace(layers, **repeated))
    shardings = param_shardings(tp_spec(spec, tp), mesh)
    return jax.tree.map(_place, params, shardings)


def attention_for(backend: str, mesh: Mesh | None, platform: str) -> layers.AttentionFn:
    """The attention a step on `platform`'s devices runs: `backend`'s, per device over kv
    heads when the model is sharded over `mesh`; the Pallas kernel interpreted on CPU."""
    attention = layers.make_attention(backend, interpret=platform == "cpu")
    return attention if mesh is None else shard_map_attention(attention, mesh)


def shard_map_attention(
    attention: Callable[..., jax.Array],
    mesh: Mesh,
) -> Callable[..., jax.Array]:
    """Runs `attention(q, k_cache, v_cache, positions, md, **kw)` per device over kv heads.

    Each device sees its query heads [T, Hq/tp, D] and its cache slice [N, bs, Hkv/tp, D]
    (metadata replicated); GQA groups stay intact because TP divides both head counts. The
    attention itself then needs no collective, whatever kernel runs inside.
    """
    q_spec = PartitionSpec(None, RULES["q_heads"], None)
    cache_spec = PartitionSpec(None, None, RULES["kv_heads"], None)

    def wrapped(q, k_cache, v_cache, positions, md, **kw):
        def local(q, k, v, positions, md):
            return attention(q, k, v, positions, md, **kw)

        return jax.shard_map(
            local,
            mesh=mesh,
            in_specs=(q_spec, cache_spec, cache_spec, PartitionSpec(), PartitionSpec()),
            out_specs=q_spec,
            check_vma=False,
        )(q, k_cache, v_cache, positions, md)

    return wrapped


def constrain(x: jax.Array, mesh: Mesh | None, logical: str) -> jax.Array:
    """with_sharding_constraint by logical name; a no-op without a mesh (one device)."""
    if mesh is None:
        return x
    return jax.lax.with_sharding_constraint(x, named(mesh, logical))


__all__ = [
    "LOGICAL_AXES",
    "MESH_AXES",
    "RULES",
    "check_tp_size",
    "constrain",
    "kv_cache_sharding",
    "kv_repeat",
    "logical_to_spec",
    "lora_axes",
    "lora_b_exec_layout",
    "lora_shardings",
    "make_mesh",
    "named",
    "param_shardings",
    "place_params",
    "attention_for",
    "shard_map_attention",
    "tp_spec",
    "valid_tp_sizes",
]
