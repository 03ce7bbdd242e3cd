"""StepInputs' shared padding blocks, kept on the device between steps.

Most steps carry large arrays that say "nothing here": the all -1 penalty ids of a batch
without penalties ([R, L] int32), the zero token bitmask of a batch without constraints
([R, V/32] uint32), the -1 ban, bias and prompt-logprob-target blocks. The host builds each of
them once per shape (lru-cached, read-only numpy arrays: sampling_metadata.py,
step_inputs.py); this module puts each on the device once too, so a step without penalties or
constraints sends only its small per-row arrays.

NOTE on commitment: jit keys its cache on whether an argument is committed to a device, so a
leaf must arrive the same way in every step (warmup included) or it compiles a second program.
A shared block is put *uncommitted* on the default device, which jit treats like the numpy a
step's own block (penalties, a grammar mask) arrives as: one program, and the step's own
arrays keep jit's C++ copy path (a Python device_put of one array costs more host time than
jit's copy of all of them). An uncommitted block lives on the default device, so this is on
only for a runner whose one device is that device (the usual engine); a data-parallel replica
elsewhere or a mesh keeps sending host arrays as before.

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


class DeviceInputs:
    """Swaps a StepInputs' shared (read-only numpy) blocks for their device copies."""

    def __init__(self, enabled: bool) -> None:
        # False: every leaf stays as staged (a runner off the default device, or a mesh)
        self.enabled = enabled
        # id(host array) -> (the host array, its device copy)
        self._constants: dict[int, tuple[np.ndarray, jax.Array]] = {}

    def __call__(self, tree: Any) -> Any:
        if not self.enabled:
            return tree
        return jax.tree.map(self._swap, tree)

    @property
    def num_constants(self) -> int:
        """Shared blocks on the device now."""
        return len(self._constants)

    def _swap(self, x: Any) -> Any:
        if not isinstance(x, np.ndarray) or x.flags.writeable:
            return x  # the step's own: jit copies it
        hit = self._constants.get(id(x))
        if hit is None or hit[0] is not x:
            if len(self._constants) >= _MAX_CONSTANTS:
                self._constants.clear()
            hit = (x, jax.device_put(x))  # uncommitted: see the NOTE above
            self._constants[id(x)] = hit
        return hit[1]

    def clear(self) -> None:
        """Drops the device copies (the runner's close)."""
        for _, arr in self._constants.values():
            if not arr.is_deleted():
                arr.delete()
        self._constants.clear()
