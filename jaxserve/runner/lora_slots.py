"""DeviceLoRASlots: the adapter slots on the device, and the one jitted write into them.

The slots are fixed-shape arrays (model/lora.py's LoRAStacks: `max_loras` slots of
`max_lora_rank`, every target of every layer); the step takes them as an argument next to the
params. Loading an adapter writes its arrays into one slot with a jitted
dynamic_update_slice whose slot index is traced, so a load never changes a traced shape and
never compiles after warmup (`warmup` compiles the write once). The old slot arrays are
donated, so the write happens in place.

Device slot s (1..max_loras) is stack index s - 1; slot 0 ("no adapter") is not stored.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxserve.model import sharding
from jaxserve.model.lora import LORA_TARGETS, LoRAStacks, stack_shapes
from jaxserve.model.spec import ModelSpec

if TYPE_CHECKING:
    from jaxserve.lora.adapter import LoRAWeights


def _write(
    stacks: LoRAStacks, index: jax.Array, new_a: dict[str, jax.Array], new_b: dict[str, jax.Array]
) -> LoRAStacks:
    """Stack index `index` of every target := (new_a [L, in, r], new_b [L, r, out])."""
    a = {
        t: jax.lax.dynamic_update_slice_in_dim(
            stacks.a[t], new_a[t][:, :, None].astype(stacks.a[t].dtype), index, axis=2
        )
        for t in LORA_TARGETS
    }
    b = {
        t: jax.lax.dynamic_update_slice_in_dim(
            stacks.b[t], new_b[t][:, None].astype(stacks.b[t].dtype), index, axis=1
        )
        for t in LORA_TARGETS
    }
    return LoRAStacks(a=a, b=b)


def _drop_axis(s: NamedSharding, axis: int) -> NamedSharding:
    spec = list(s.spec) + [None] * (4 - len(s.spec))
    del spec[axis]
    return NamedSharding(s.mesh, PartitionSpec(*spec))


class DeviceLoRASlots:
    def __init__(
        self,
        model_spec: ModelSpec,
        exec_spec: ModelSpec,
        *,
        num_slots: int,
        rank: int,
        dtype: jnp.dtype,
        mesh: Mesh | None,
        device: jax.Device | None = None,
    ) -> None:
        """`model_spec`: the checkpoint's (adapters are read against it); `exec_spec`: the
        runner's (kv heads repeated under TP); `device`: the one device without a mesh."""
        self.model_spec = model_spec
        self.exec_spec = exec_spec
        self.num_slots = num_slots
        self.rank = rank
        self.dtype = dtype
        self.mesh = mesh
        self.tp = 1 if mesh is None else mesh.shape["model"]
        self._shapes = stack_shapes(exec_spec, num_slots, rank)
        shapes = self._shapes

        def zeros() -> LoRAStacks:
            return LoRAStacks(
                a={t: jnp.zeros(shapes[t][0], dtype) for t in LORA_TARGETS},
                b={t: jnp.zeros(shapes[t][1], dtype) for t in LORA_TARGETS},
            )

        if mesh is None:
            self.shardings: LoRAStacks | None = None
            self.stacks = jax.device_put(zeros(), device)
            self._write = jax.jit(_write, donate_argnames=("stacks",))
        else:
            self.shardings = sharding.lora_shardings(exec_spec, mesh, num_slots, rank)
            self.stacks = jax.jit(zeros, out_shardings=self.shardings)()
            # one slot's arrays: the stacks' layout without the slot axis
            new_a = {t: _drop_axis(s, 2) for t, s in self.shardings.a.items()}
            new_b = {t: _drop_axis(s, 1) for t, s in self.shardings.b.items()}
            replicated = NamedSharding(mesh, PartitionSpec())
            self._write = jax.jit(
                _write,
                in_shardings=(self.shardings, replicated, new_a, new_b),
                out_shardings=self.shardings,
                donate_argnames=("stacks",),
            )

    @property
    def nbytes(self) -> int:
        """Bytes of every slot, summed over devices' shards as one array."""
        return sum(x.nbytes for x in jax.tree.leaves(self.stacks))

    def _host_arrays(
        self, weights: LoRAWeights | None
    ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """One slot's arrays on the host (f32; the write casts them to the slots' dtype): rank
        zero-padded, absent targets zero, B in the execution layout."""
        a, b = {}, {}
        for t in LORA_TARGETS:
            (n, d_in, _, r), (_, _, _, d_out) = self._shapes[t]
            a_t = np.zeros((n, d_in, r), np.float32)
            b_t = np.zeros((n, r, d_out), np.float32)
            if weights is not None and t in weights.weights:
                wa, wb = weights.weights[t]
                k = wa.shape[-1]
                a_t[:, :, :k] = wa
                b_t[:, :k, :] = sharding.lora_b_exec_layout(self.model_spec, self.tp, t, wb)
            a[t], b[t] = a_t, b_t
        return a, b

    def write(self, slot: int, weights: LoRAWeights | None) -> None:
        """Device slot `slot` (1..num_slots) := the adapter (None: zeros)."""
        if not 1 <= slot <= self.num_slots:
            raise ValueError(f"LoRA slot {slot} out of range 1..{self.num_slots}")
        a, b = self._host_arrays(weights)
        self.stacks = self._write(self.stacks, np.int32(slot - 1), a, b)

    def warmup(self) -> None:
        """Compiles the write (slot 1 := zeros, which it already is)."""
        self.write(1, None)
        jax.block_until_ready(self.stacks)

    def close(self) -> None:
        for leaf in jax.tree.leaves(self.stacks):
            if isinstance(leaf, jax.Array) and not leaf.is_deleted():
                leaf.delete()
        self.stacks = None  # type: ignore[assignment]
