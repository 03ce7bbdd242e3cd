"""Multi-host steps: process 0 broadcasts each step's inputs, every process runs the step.

Process 0 (the leader) broadcasts the step's host-side StepInputs with
`multihost_utils.broadcast_one_to_all` (an XLA collective: no home-made tensor transport), and
every follower runs the same jitted step on its own devices. A step has a data-dependent bucket
shape, so each step is two broadcasts: a fixed header [command, T, R, B], then the inputs
shaped like a dummy step of that bucket.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxserve.runner.step_inputs import StepInputs, dummy_step_inputs

# header commands
_STOP, _STEP = 0, 1


def spans_processes(devices: Sequence[jax.Device]) -> bool:
    """True when the devices belong to more than one process (steps must be broadcast)."""
    return len({d.process_index for d in devices}) > 1


def send_step(inputs: StepInputs) -> None:
    """Process 0: announces the step's bucket, then broadcasts its inputs."""
    header = np.array(
        [_STEP, inputs.num_tokens, inputs.num_reqs, inputs.num_blocks_per_req],
        np.int32,
    )
    multihost_utils.broadcast_one_to_all(header)
    multihost_utils.broadcast_one_to_all(inputs)


def send_stop() -> None:
    """Process 0: tells the followers to leave their loop."""
    multihost_utils.broadcast_one_to_all(np.array([_STOP, 0, 0, 0], np.int32))


def receive_step(
    penalty_width: Callable[[int], int], bitmask_width: int | None
) -> StepInputs | None:
    """A follower: the next step's inputs from process 0, or None when it stops;
    penalty_width: B -> the penalty block's width (ModelRunner.penalty_width)."""
    header = multihost_utils.broadcast_one_to_all(np.zeros(4, np.int32))
    cmd, t, r, b = (int(x) for x in header)
    if cmd == _STOP:
        return None
    template = dummy_step_inputs((t, r, b), penalty_width(b), bitmask_width)
    return multihost_utils.broadcast_one_to_all(template)


def broadcast_int(value: int) -> int:
    """Process 0's value of an int on every process (e.g. the KV block count)."""
    return int(multihost_utils.broadcast_one_to_all(np.array(value, np.int64)))


def to_global(inputs: StepInputs, mesh: Mesh) -> StepInputs:
    """Host numpy leaves (equal on every process) -> global arrays replicated on the mesh."""
    replicated = NamedSharding(mesh, PartitionSpec())

    def put(x: np.ndarray) -> jax.Array:
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, replicated, lambda idx: x[idx])

    return jax.tree.map(put, inputs)
