"""Multi-host serving on jax.distributed: process 0 leads, the other processes follow.

Every process of a multi-host deployment calls `initialize()` before anything touches a
device; then `jax.devices()` lists the devices of all processes and the tensor-parallel mesh
spans them. Process 0 runs the scheduler (and the API server): before each step it broadcasts
the step's host-side StepInputs with `multihost_utils.broadcast_one_to_all` (an XLA collective:
no home-made tensor transport), and every follower runs the same jitted step on its own
devices. A step has a data-dependent bucket shape, so each step is two broadcasts: a fixed
header [command, T, R, B], then the inputs shaped like a dummy step of that bucket.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Sequence

import numpy as np

from jaxserve.config import EngineArgs

logger = logging.getLogger(__name__)

# header commands
_STOP, _STEP = 0, 1

# The environment variables `initialize` reads when no argument is given (the names JAX's own
# jax.distributed flags use), so a launcher can configure every process the same way.
ENV_COORDINATOR = "JAX_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "JAX_PROCESS_ID"


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
    # "host:port" of process 0's coordinator service; None: one process (no jax.distributed)
    coordinator: str | None = None
    # processes in the deployment (one per host, typically)
    num_processes: int = 1
    # this process's rank; 0 runs the scheduler and the API, the others follow its steps
    process_id: int = 0

    def __post_init__(self) -> None:
        if self.num_processes < 1:
            raise ValueError(f"num_processes must be >= 1, got {self.num_processes}")
        if not 0 <= self.process_id < self.num_processes:
            raise ValueError(
                f"process_id must be in [0, {self.num_processes}), got {self.process_id}"
            )
        if self.num_processes > 1 and not self.coordinator:
            raise ValueError("num_processes > 1 needs a distributed coordinator (host:port)")

    @classmethod
    def resolve(
        cls,
        coordinator: str | None = None,
        num_processes: int | None = None,
        process_id: int | None = None,
    ) -> DistributedConfig:
        """Arguments first, then the JAX_* environment variables, then one process."""
        env = os.environ
        return cls(
            coordinator=coordinator or env.get(ENV_COORDINATOR) or None,
            num_processes=int(num_processes or env.get(ENV_NUM_PROCESSES) or 1),
            process_id=int(process_id if process_id is not None else env.get(ENV_PROCESS_ID) or 0),
        )

    @property
    def enabled(self) -> bool:
        return self.num_processes > 1

    def export_env(self) -> None:
        """Sets the JAX_* variables, so a spawned engine-core process initialises the same."""
        if self.enabled:
            os.environ[ENV_COORDINATOR] = str(self.coordinator)
            os.environ[ENV_NUM_PROCESSES] = str(self.num_processes)
            os.environ[ENV_PROCESS_ID] = str(self.process_id)


def initialize(config: DistributedConfig | None = None) -> DistributedConfig:
    """Starts jax.distributed when the config (or the environment) asks for several processes.

    Must run before any jax call that touches devices. Idempotent within a process.
    """
    import jax

    config = config or DistributedConfig.resolve()
    if not config.enabled or jax.distributed.is_initialized():
        return config
    # CPU processes need a cross-process collectives backend (GPUs/TPUs bring their own).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=config.coordinator,
        num_processes=config.num_processes,
        process_id=config.process_id,
    )
    logger.info(
        "jax.distributed: process %d of %d, %d local / %d global devices",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
    )
    return config


def spans_processes(devices: Sequence[object]) -> bool:
    """True when the devices belong to more than one process (steps must be broadcast)."""
    return len({d.process_index for d in devices}) > 1  # type: ignore[attr-defined]


def send_step(inputs: object) -> None:
    """Process 0: announces the step's bucket, then broadcasts its inputs."""
    from jax.experimental import multihost_utils

    header = np.array(
        [_STEP, inputs.num_tokens, inputs.num_reqs, inputs.num_blocks_per_req],  # type: ignore[attr-defined]
        np.int32,
    )
    multihost_utils.broadcast_one_to_all(header)
    multihost_utils.broadcast_one_to_all(inputs)


def send_stop() -> None:
    """Process 0: tells the followers to leave their loop."""
    from jax.experimental import multihost_utils

    multihost_utils.broadcast_one_to_all(np.array([_STOP, 0, 0, 0], np.int32))


def receive_step(penalty_len: int) -> object | None:
    """A follower: the next step's inputs from process 0, or None when it stops."""
    from jax.experimental import multihost_utils

    from jaxserve.runner.step_inputs import dummy_step_inputs

    header = multihost_utils.broadcast_one_to_all(np.zeros(4, np.int32))
    cmd, t, r, b = (int(x) for x in header)
    if cmd == _STOP:
        return None
    template = dummy_step_inputs((t, r, b), penalty_len)
    return multihost_utils.broadcast_one_to_all(template)


def broadcast_int(value: int) -> int:
    """Process 0's value of an int on every process (e.g. the KV block count)."""
    from jax.experimental import multihost_utils

    return int(multihost_utils.broadcast_one_to_all(np.array(value, np.int64)))


def to_global(tree: object, mesh: object) -> object:
    """Host numpy leaves (equal on every process) -> global arrays replicated on the mesh."""
    import jax
    from jax.sharding import NamedSharding, PartitionSpec

    replicated = NamedSharding(mesh, PartitionSpec())  # type: ignore[arg-type]

    def put(x: np.ndarray) -> jax.Array:
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, replicated, lambda idx: x[idx])

    return jax.tree.map(put, tree)


def run_follower(args: EngineArgs, config: DistributedConfig) -> None:
    """A follower process: loads its shards of the model and runs process 0's steps.

    Returns when process 0 closes its engine. Start it with the same engine arguments as
    process 0 (the CLI: the same `jaxserve serve|generate ...` line with --process-id i).
    """
    from jaxserve.engine.core import EngineCore

    initialize(config)
    # warmup is driven by process 0's broadcasts, like every other step
    core = EngineCore(dataclasses.replace(args, enable_warmup=False), show_progress=False)
    try:
        core.runner.follow()
    finally:
        core.close()


__all__ = [
    "DistributedConfig",
    "broadcast_int",
    "initialize",
    "receive_step",
    "run_follower",
    "send_step",
    "send_stop",
    "spans_processes",
    "to_global",
]
