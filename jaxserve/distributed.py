"""Multi-host serving on jax.distributed: which process this is, and starting the group.

Every process of a multi-host deployment calls `initialize()` before anything touches a
device; then `jax.devices()` lists the devices of all processes and the tensor-parallel mesh
spans them. Process 0 runs the scheduler (and the API server) and broadcasts each step
(runner/step_broadcast.py); the others run engine/follower.py's loop.
"""

from __future__ import annotations

import dataclasses
import logging
import os

logger = logging.getLogger(__name__)

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


class DistributedGroup:
    """This process's membership of a jax.distributed group, from start() to shutdown().

    It owns what joining changes process-wide: the CPU collectives setting (restored on
    shutdown) and jax.distributed itself. A one-process config starts nothing.
    """

    def __init__(self, config: DistributedConfig) -> None:
        # which group and rank
        self.config = config
        # the jax.config value start() replaced (None: not started by this object)
        self._saved_collectives: str | None = None

    def start(self) -> DistributedGroup:
        """Joins the group (must run before any jax call that touches devices)."""
        import jax

        if not self.config.enabled or jax.distributed.is_initialized():
            return self
        # CPU processes need a cross-process collectives backend (GPUs/TPUs bring their own).
        self._saved_collectives = jax.config.jax_cpu_collectives_implementation
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(
            coordinator_address=self.config.coordinator,
            num_processes=self.config.num_processes,
            process_id=self.config.process_id,
        )
        logger.info(
            "jax.distributed: process %d of %d, %d local / %d global devices",
            jax.process_index(),
            jax.process_count(),
            jax.local_device_count(),
            jax.device_count(),
        )
        return self

    def shutdown(self) -> None:
        """Leaves the group (a barrier with the other processes) and restores the setting."""
        if self._saved_collectives is None:
            return
        import jax

        jax.distributed.shutdown()
        jax.config.update("jax_cpu_collectives_implementation", self._saved_collectives)
        self._saved_collectives = None


def initialize(config: DistributedConfig | None = None) -> DistributedGroup:
    """Joins jax.distributed when the config (or the environment) asks for several processes.

    Returns the group; its shutdown() leaves it (at exit, jax's own atexit hook does too).
    """
    return DistributedGroup(config or DistributedConfig.resolve()).start()


__all__ = ["DistributedConfig", "DistributedGroup", "initialize"]
