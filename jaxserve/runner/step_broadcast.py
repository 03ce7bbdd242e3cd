"""Multi-host steps: process 0 broadcasts each step's inputs, every process runs the step.

Process 0 (the leader) broadcasts the step's host-side inputs with
`multihost_utils.broadcast_one_to_all` (an XLA collective: no home-made tensor transport), and
every follower runs the same jitted programs on its own devices. A step runs as two programs
(runner/step_fn.py), so it is two messages: the forward's StepInputs, then the sampler's
SamplingMetadata. Their shapes follow the step's bucket, so each message is two broadcasts: a
fixed header [command, T, R, B], then the arrays shaped like a dummy step of that bucket.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxserve.runner.sampler import SamplingMetadata
from jaxserve.runner.sampler_inputs import dummy_sampling
from jaxserve.runner.step_inputs import StepInputs, dummy_step_inputs

# header commands
_STOP, _STEP, _SAMPLE = 0, 1, 2


def spans_processes(devices: Sequence[jax.Device]) -> bool:
    """True when the devices belong to more than one process (steps must be broadcast)."""
    return len({d.process_index for d in devices}) > 1


def send_step(inputs: StepInputs) -> None:
    """Process 0: announces a step's bucket, then broadcasts its forward's inputs."""
    header = [_STEP, inputs.num_tokens, inputs.num_reqs, inputs.num_blocks_per_req]
    multihost_utils.broadcast_one_to_all(np.array(header, np.int32))
    multihost_utils.broadcast_one_to_all(inputs)


def send_sampling(sampling: SamplingMetadata) -> None:
    """Process 0: broadcasts the sampler's inputs of the step send_step announced last."""
    r, width = sampling.penalty_token_ids.shape
    multihost_utils.broadcast_one_to_all(np.array([_SAMPLE, 0, r, width], np.int32))
    multihost_utils.broadcast_one_to_all(sampling)


def send_stop() -> None:
    """Process 0: tells the followers to leave their loop."""
    multihost_utils.broadcast_one_to_all(np.array([_STOP, 0, 0, 0], np.int32))


def receive(bitmask_width: int | None) -> Any:
    """A follower: process 0's next message, as it was sent: StepInputs (a forward),
    SamplingMetadata (its sampler), or None when process 0 stops (no LoRA across processes:
    the runner refuses it)."""
    header = multihost_utils.broadcast_one_to_all(np.zeros(4, np.int32))
    cmd, t, r, b = (int(x) for x in header)
    if cmd == _STOP:
        return None
    if cmd == _SAMPLE:  # (b is the penalty width here)
        return multihost_utils.broadcast_one_to_all(dummy_sampling(r, b, bitmask_width))
    return multihost_utils.broadcast_one_to_all(dummy_step_inputs((t, r, b)))


def broadcast_int(value: int) -> int:
    """Process 0's value of an int on every process (e.g. the KV block count)."""
    return int(multihost_utils.broadcast_one_to_all(np.array(value, np.int64)))


def to_global(inputs: Any, mesh: Mesh) -> Any:
    """Host numpy leaves (equal on every process) -> global arrays replicated on the mesh."""
    replicated = NamedSharding(mesh, PartitionSpec())

    def put(x: np.ndarray) -> jax.Array:
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, replicated, lambda idx: x[idx])

    return jax.tree.map(put, inputs)
