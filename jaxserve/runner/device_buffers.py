"""Where a ModelRunner's device state lives: the replica's mesh (TP) or its one device, and
the buffers made there as the step takes them: the params, the paged KV cache and the last
step's sampled ids, each committed to the device or laid out on the mesh.

NOTE: jit keys its cache on committed-ness, and the step returns committed arrays, so a buffer
that started uncommitted would make the first step compile twice.
"""

from __future__ import annotations

from collections.abc import Iterable

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxserve.model import llama, sharding
from jaxserve.model.attention import KVCache
from jaxserve.model.spec import ModelSpec


def replica_mesh(
    spec: ModelSpec, tensor_parallel_size: int, devices: list[jax.Device]
) -> tuple[Mesh | None, ModelSpec]:
    """The mesh over one replica's devices (None for one device) and the spec its step runs:
    under TP the kv heads as the cache stores them (repeated when TP > kv heads)."""
    if tensor_parallel_size > 1:
        mesh = sharding.make_mesh(tensor_parallel_size, devices)
        return mesh, sharding.tp_spec(spec, tensor_parallel_size)
    if len(devices) != 1:
        raise ValueError(f"tensor_parallel_size=1 needs 1 device, got {devices}")
    return None, spec


def place_params(spec: ModelSpec, params: object, device: jax.Device, mesh: Mesh | None) -> object:
    """The params committed to `device`, or sharded on `mesh` (TP), in the layout the step
    reads on the device's platform."""
    if mesh is None:
        params = jax.device_put(params, device)
    else:
        params = sharding.place_params(spec, params, mesh)
    if device.platform == "cpu":
        # bf16 weights as the bit patterns XLA:CPU slices natively (llama.storage_params);
        # the head's own copy only on one device (the TP shardings name no tied head).
        params = llama.storage_params(params, untie_head=mesh is None)
    return params


def new_kv_cache(
    shape: tuple[int, ...], dtype: jnp.dtype, device: jax.Device, mesh: Mesh | None
) -> KVCache:
    """An all-zero KV cache of `shape` ([layers, blocks, block_size, kv heads, head_dim])."""
    if mesh is None:
        return jax.device_put(KVCache(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype)), device)
    # zeros created sharded: no device ever holds the whole cache
    return jax.jit(
        lambda: KVCache(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype)),
        out_shardings=sharding.kv_cache_sharding(mesh),
    )()


def new_token_ids(size: int, device: jax.Device, mesh: Mesh | None) -> jax.Array:
    """Zero sampled ids, placed as the sampler returns them (replicated on a mesh)."""
    if mesh is None:
        return jax.device_put(jnp.zeros(size, jnp.int32), device)
    replicated = NamedSharding(mesh, PartitionSpec())
    return jax.jit(lambda: jnp.zeros(size, jnp.int32), out_shardings=replicated)()


def bytes_per_device(arrays: Iterable[jax.Array]) -> dict[jax.Device, int]:
    """Bytes each device holds of `arrays`, read from their addressable shards."""
    out: dict[jax.Device, int] = {}
    for arr in arrays:
        for shard in arr.addressable_shards:
            out[shard.device] = out.get(shard.device, 0) + shard.data.nbytes
    return out
