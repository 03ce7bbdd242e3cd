"""StepInputs onto the runner's devices, with the shared padding blocks kept there.

Most steps carry large arrays that say "nothing here": the all -1 penalty ids of a batch
without penalties ([R, L] int32), the zero token bitmask of a batch without constraints
([R, V/32] uint32), the -1 prompt-logprob targets. The host builds each of them once per shape
(lru-cached, read-only numpy arrays: sampling_metadata.py, step_inputs.py), and this module
puts each on the device once too, so a step without penalties or constraints sends only its
small per-row arrays (measured here: 250 -> 46 us per call for a jit taking the [64, 2048]
penalty block and a [64, 1536] bitmask from the host vs from the device).

NOTE on commitment: jit keys its cache on whether an argument is a committed device array or
host data, so a leaf must arrive the same way in every step, warmup included, or it compiles
a second program. The leaves a shared block can fill ("shareable": read-only in the runner's
all-padding template) always arrive committed: the shared copy, or this step's own block put
on the device here. Every other leaf stays numpy and jit copies it in its C++ fast path
(device_put from Python costs ~1 ms for 20 small arrays against ~20 us there).

NOTE on what counts as shared: a read-only numpy leaf. Only those caches make them, and they
never change; the map holds the host array itself, so its id() cannot be reused by another.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

# Shared blocks kept at most (a bucket has a handful; the caches behind them hold 64-ish):
# past this the map starts again rather than grow.
_MAX_CONSTANTS = 512


def _is_shared(x: Any) -> bool:
    return isinstance(x, np.ndarray) and not x.flags.writeable


class DeviceInputs:
    """Puts the shareable leaves of a runner's StepInputs on `sharding` (a device, or a
    replicated NamedSharding); `template`: an all-padding StepInputs of the runner (every
    StepInputs it stages has the same leaves, in the same order, whatever the bucket)."""

    def __init__(self, sharding: Any, template: Any) -> None:
        self.sharding = sharding
        leaves = jax.tree.leaves(template)
        self._num_leaves = len(leaves)
        # leaf indices a shared block can fill: these always arrive committed
        self._shareable = frozenset(i for i, x in enumerate(leaves) if _is_shared(x))
        # id(host array) -> (the host array, its device copy)
        self._constants: dict[int, tuple[np.ndarray, jax.Array]] = {}

    def __call__(self, tree: Any) -> Any:
        leaves, treedef = jax.tree.flatten(tree)
        if len(leaves) != self._num_leaves:
            n = self._num_leaves
            raise ValueError(f"{len(leaves)} step input leaves; the template has {n}")
        for i in self._shareable:
            x = leaves[i]
            # a step's own block (penalties, a grammar mask, prompt targets) goes on its own
            leaves[i] = self._shared(x) if _is_shared(x) else jax.device_put(x, self.sharding)
        return jax.tree.unflatten(treedef, leaves)

    @property
    def num_constants(self) -> int:
        """Shared blocks on the device now."""
        return len(self._constants)

    def _shared(self, x: np.ndarray) -> jax.Array:
        hit = self._constants.get(id(x))
        if hit is None or hit[0] is not x:
            if len(self._constants) >= _MAX_CONSTANTS:
                self._constants.clear()
            hit = (x, jax.device_put(x, self.sharding))
            self._constants[id(x)] = hit
        return hit[1]

    def clear(self) -> None:
        """Drops the device copies (the runner's close)."""
        for _, arr in self._constants.values():
            if not arr.is_deleted():
                arr.delete()
        self._constants.clear()
