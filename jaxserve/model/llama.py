"""The decoder-only transformer shared by Llama, Mistral, Qwen2 and Qwen3: params and forward.

Weights are stored in "x @ W" layout ([in, out]) and every per-layer weight is stacked on a
leading num_layers axis, so `forward` is one `lax.scan` (one compiled layer body, whatever the
depth). The KV cache rides in the scan carry: each layer writes its slice of the stacked cache
and XLA keeps the update in place when the caller's jit donates the cache.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from jaxserve.model import layers
from jaxserve.model.attention import AttentionMetadata, KVCache, write_kv
from jaxserve.model.lora import LoRAStacks, make_context, project
from jaxserve.model.spec import ModelSpec


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class LayerParams:
    # every field has a leading num_layers axis L
    attn_norm: jax.Array  # [L, E] input_layernorm
    wq: jax.Array  # [L, E, num_q_heads * head_dim]
    wk: jax.Array  # [L, E, num_kv_heads * head_dim]
    wv: jax.Array  # [L, E, num_kv_heads * head_dim]
    wo: jax.Array  # [L, num_q_heads * head_dim, E]
    mlp_norm: jax.Array  # [L, E] post_attention_layernorm
    w_gate: jax.Array  # [L, E, F]
    w_up: jax.Array  # [L, E, F]
    w_down: jax.Array  # [L, F, E]
    bq: jax.Array | None = None  # [L, num_q_heads * head_dim] qkv_bias only
    bk: jax.Array | None = None  # [L, num_kv_heads * head_dim] qkv_bias only
    bv: jax.Array | None = None  # [L, num_kv_heads * head_dim] qkv_bias only
    q_norm: jax.Array | None = None  # [L, head_dim] qk_norm only
    k_norm: jax.Array | None = None  # [L, head_dim] qk_norm only


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Params:
    embed: jax.Array  # [V, E]
    layers: LayerParams
    final_norm: jax.Array  # [E]
    lm_head: jax.Array | None  # [E, V]; None when tied to embed


def param_shapes(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    """Shape of every array in Params, keyed by field name (layer fields include L)."""
    e, f, hd, n = spec.hidden_size, spec.intermediate_size, spec.head_dim, spec.num_layers
    q, kv = spec.num_q_heads * hd, spec.num_kv_heads * hd
    shapes = {
        "embed": (spec.vocab_size, e),
        "final_norm": (e,),
        "attn_norm": (n, e),
        "wq": (n, e, q),
        "wk": (n, e, kv),
        "wv": (n, e, kv),
        "wo": (n, q, e),
        "mlp_norm": (n, e),
        "w_gate": (n, e, f),
        "w_up": (n, e, f),
        "w_down": (n, f, e),
    }
    if not spec.tie_word_embeddings:
        shapes["lm_head"] = (e, spec.vocab_size)
    if spec.qkv_bias:
        shapes.update(bq=(n, q), bk=(n, kv), bv=(n, kv))
    if spec.qk_norm:
        shapes.update(q_norm=(n, hd), k_norm=(n, hd))
    return shapes


def params_from_arrays(spec: ModelSpec, arrays: dict[str, jax.Array]) -> Params:
    """Assembles Params from a dict keyed as in `param_shapes` (checks every shape)."""
    expected = param_shapes(spec)
    if set(arrays) != set(expected):
        raise ValueError(
            f"params mismatch: missing {set(expected) - set(arrays)}, "
            f"unexpected {set(arrays) - set(expected)}"
        )
    for name, shape in expected.items():
        if tuple(arrays[name].shape) != shape:
            raise ValueError(f"param {name}: shape {arrays[name].shape}, expected {shape}")
    top = {"embed", "final_norm", "lm_head"}
    return Params(
        embed=arrays["embed"],
        layers=LayerParams(**{k: v for k, v in arrays.items() if k not in top}),
        final_norm=arrays["final_norm"],
        lm_head=arrays.get("lm_head"),
    )


def init_params(spec: ModelSpec, key: jax.Array, dtype: jnp.dtype = jnp.float32) -> Params:
    """Random params for tests: normal(0, 0.02) matrices, norms near 1, small biases."""
    arrays = {}
    shapes = param_shapes(spec)
    for k, (name, shape) in zip(jax.random.split(key, len(shapes)), shapes.items(), strict=True):
        noise = jax.random.normal(k, shape, jnp.float32)
        if "norm" in name:
            arrays[name] = (1.0 + 0.1 * noise).astype(dtype)
        else:
            arrays[name] = (0.02 * noise).astype(dtype)
    return params_from_arrays(spec, arrays)


def params_nbytes(params: Params) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))


def init_kv_cache(
    spec: ModelSpec, num_blocks: int, block_size: int, dtype: jnp.dtype = jnp.float32
) -> KVCache:
    """A zeroed cache; block 0 is the null block that padding tokens write to."""
    shape = (spec.num_layers, num_blocks, block_size, spec.num_kv_heads, spec.head_dim)
    return KVCache(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype))


# bf16 weights travel as their uint16 bit patterns (see `storage_params`)
_BITS = jnp.dtype(jnp.uint16)


def storage_params(params: Params, *, untie_head: bool = False) -> Params:
    """bf16 leaves -> uint16 bit patterns, the form the step moves them in (other leaves as
    they are); `forward` and `compute_logits` take either form.

    NOTE: XLA:CPU has no bf16 data movement: float normalization rewrites every bf16
    dynamic-slice and gather to f32, and in the layer scan the convert of the whole stacked
    weight is loop-invariant, so it is hoisted out: each step converted all weights to f32
    (written as f32, then read back slice by slice). Integers are left alone, so slicing and
    gathering the bit patterns and bitcasting a layer's slice to bf16 next to its dot moves
    each weight once, as bf16.

    `untie_head` (bf16 with tied embeddings): the head gets its own [E, V] copy, since the
    bf16 dot has no library kernel for the transposed embedding (XLA:CPU converted the whole
    [V, E] table to f32 every step, 3x the f32 head's time).
    """
    if untie_head and params.lm_head is None and params.embed.dtype == jnp.bfloat16:
        params = dataclasses.replace(params, lm_head=params.embed.T)  # a copy, [E, V]
    # Only what is sliced or gathered travels as bits: a bitcast feeding a dot is a copy.
    return dataclasses.replace(
        params, embed=_to_bits(params.embed), layers=jax.tree.map(_to_bits, params.layers)
    )


def _to_bits(a: jax.Array) -> jax.Array:
    if a.dtype == jnp.bfloat16:
        return jax.lax.bitcast_convert_type(a, jnp.uint16)
    return a


def _from_bits(a: jax.Array | None) -> jax.Array | None:
    if a is not None and a.dtype == _BITS:
        return jax.lax.bitcast_convert_type(a, jnp.bfloat16)
    return a


def weight_dtype(params: Params) -> jnp.dtype:
    """The model's weight dtype, whichever form `params` is in."""
    dt = params.embed.dtype
    return jnp.dtype(jnp.bfloat16) if dt == _BITS else dt


def forward(
    params: Params,
    spec: ModelSpec,
    input_ids: jax.Array,  # i32[T]
    positions: jax.Array,  # i32[T]
    md: AttentionMetadata,
    kv_cache: KVCache,
    *,
    attention: layers.AttentionFn | None = None,
    lora: LoRAStacks | None = None,
    lora_slots: jax.Array | None = None,  # i32[T] each token's adapter slot (0: none)
) -> tuple[jax.Array, KVCache]:  # ([T, E] after the final norm, updated cache)
    """Runs every layer over one flat ragged token batch; returns hidden states and the cache.

    `attention`: what each layer attends with (default: the xla backend on one device); the
    runner passes the backend it chose, wrapped in shard_map under tensor parallelism
    (sharding.attention_for), so this module knows nothing of meshes.
    `lora`/`lora_slots`: the adapter slots and each token's slot (model/lora.py); both or
    neither.
    """
    if attention is None:
        attention = layers.make_attention("xla")
    # Activations stay f32 between the dots whatever the weights (layers.linear casts each
    # dot's input to the weights' dtype): with bf16 weights on CPU, bf16 activations measured
    # no faster (the weights' bytes are the cost) and f32 ones round less.
    x = _from_bits(params.embed[input_ids]).astype(jnp.float32)  # [T, E]
    ctx = None
    if lora is not None:
        assert lora_slots is not None, "lora needs lora_slots"
        ctx = make_context(lora_slots, lora.num_slots, x.dtype)
    cos, sin = layers.rope_cos_sin(positions, layers.rope_inv_freq(spec))  # f32[T, head_dim]
    body = functools.partial(
        _layer,
        spec=spec,
        positions=positions,
        md=md,
        cos=cos,
        sin=sin,
        attention=attention,
        lora=lora,
        lora_ctx=ctx,
    )
    idx = jnp.arange(spec.num_layers, dtype=jnp.int32)
    xs = (params.layers, idx)
    (x, k, v), _ = jax.lax.scan(body, (x, kv_cache.k, kv_cache.v), xs)
    with jax.named_scope("final_norm"):
        x = layers.rms_norm(x, _from_bits(params.final_norm), spec.rms_norm_eps)
    return x, KVCache(k=k, v=v)


def _layer(carry, xs, *, spec, positions, md, cos, sin, attention, lora, lora_ctx):
    x, k_all, v_all = carry  # [T, E], [L, num_blocks, block_size, num_kv_heads, head_dim] x2
    # LayerParams of this layer (leading axis removed), and its index i32[]
    lp, i = xs
    lp = jax.tree.map(_from_bits, lp)
    t = x.shape[0]
    hq, hkv, hd = spec.num_q_heads, spec.num_kv_heads, spec.head_dim

    def proj(h: jax.Array, *targets: str) -> list[jax.Array]:
        ys = project(h, {t: getattr(lp, t) for t in targets}, lora, i, lora_ctx)
        return [ys[t] for t in targets]

    with jax.named_scope("attn"):
        h = layers.rms_norm(x, lp.attn_norm, spec.rms_norm_eps)
        q, k, v = proj(h, "wq", "wk", "wv")  # f32 (layers.linear)
        if spec.qkv_bias:
            q, k, v = q + lp.bq, k + lp.bk, v + lp.bv
        q = q.reshape(t, hq, hd)  # [T, num_q_heads, head_dim]
        k = k.reshape(t, hkv, hd)  # [T, num_kv_heads, head_dim]
        v = v.reshape(t, hkv, hd)
        if spec.qk_norm:
            q = layers.rms_norm(q, lp.q_norm, spec.rms_norm_eps)
            k = layers.rms_norm(k, lp.k_norm, spec.rms_norm_eps)
        q, k = layers.apply_rope(q, cos, sin), layers.apply_rope(k, cos, sin)
        # Write before attending: tokens of this step must see each other's keys. The layer's
        # cache is addressed inside the whole stacked cache (layers folded into the block axis,
        # block ids offset by i * num_blocks) rather than sliced out: slicing k_all[i] makes
        # XLA materialise a copy of the layer every step, which costs as much as copying the
        # whole cache; a scatter/gather on the flat view stays in place under donation.
        nl, nb, bs = k_all.shape[:3]
        k_flat = k_all.reshape(nl * nb, bs, hkv, hd)  # layers folded into blocks (a bitcast)
        v_flat = v_all.reshape(nl * nb, bs, hkv, hd)
        slots = md.slot_mapping + i * (nb * bs)
        k_flat = write_kv(k_flat, k, slots)
        v_flat = write_kv(v_flat, v, slots)
        layer_md = dataclasses.replace(md, block_tables=md.block_tables + i * nb)
        o = attention(
            q,
            k_flat,
            v_flat,
            positions,
            layer_md,
            sm_scale=hd**-0.5,
            sliding_window=spec.sliding_window,
        )  # [T, num_q_heads, head_dim]
        k_all = k_flat.reshape(k_all.shape)
        v_all = v_flat.reshape(v_all.shape)
        (o,) = proj(o.reshape(t, hq * hd), "wo")
        x = x + o
    h = layers.rms_norm(x, lp.mlp_norm, spec.rms_norm_eps)
    if lora is None:
        x = x + layers.swiglu_mlp(h, lp.w_gate, lp.w_up, lp.w_down)
    else:
        with jax.named_scope("mlp"):
            gate, up = proj(h, "w_gate", "w_up")
            (down,) = proj(jax.nn.silu(gate) * up, "w_down")
            x = x + down
    return (x, k_all, v_all), None


def compute_logits(
    params: Params,
    spec: ModelSpec,
    hidden: jax.Array,  # [R, E]
) -> jax.Array:  # f32[R, V]
    with jax.named_scope("lm_head"):
        # (a tied model's storage_params may carry its own head copy)
        w = params.embed.T if params.lm_head is None else params.lm_head
        return layers.linear(hidden, _from_bits(w))


def abstract_params(spec: ModelSpec, dtype: jnp.dtype) -> Params:
    """ShapeDtypeStructs of the params (for eval_shape / checkpoint restore targets)."""
    return params_from_arrays(
        spec, {n: jax.ShapeDtypeStruct(s, dtype) for n, s in param_shapes(spec).items()}
    )


__all__ = [
    "LayerParams",
    "Params",
    "abstract_params",
    "compute_logits",
    "forward",
    "init_kv_cache",
    "init_params",
    "param_shapes",
    "params_from_arrays",
    "params_nbytes",
]
