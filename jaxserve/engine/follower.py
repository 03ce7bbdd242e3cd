"""A follower process of a multi-host deployment: its shards of the model, process 0's steps.

Processes other than 0 never schedule: they load the same model (their shards of it), then run
every step process 0 broadcasts (runner/step_broadcast.py) until process 0 closes its engine.
"""

from __future__ import annotations

import dataclasses

from jaxserve.config import EngineArgs
from jaxserve.distributed import DistributedConfig, initialize
from jaxserve.engine.core import EngineCore
from jaxserve.runner import step_broadcast
from jaxserve.runner.model_runner import ModelRunner


def run_follower(args: EngineArgs, config: DistributedConfig) -> None:
    """A follower process: loads its shards of the model and runs process 0's steps.

    Returns when process 0 closes its engine. Start it with the same engine arguments as
    process 0 (the CLI: the same `jaxserve serve|generate ...` line with --process-id i).
    """
    group = initialize(config)
    # warmup is driven by process 0's broadcasts, like every other step
    core = EngineCore(dataclasses.replace(args, enable_warmup=False), show_progress=False)
    try:
        follow(core.runner)
    finally:
        core.close()
        group.shutdown()


def follow(runner: ModelRunner) -> None:
    """A follower process's loop: runs process 0's steps until it closes its engine."""
    if not runner.multihost or runner.is_leader:
        raise RuntimeError("follow() is for processes other than 0 of a multi-host mesh")
    while (message := step_broadcast.receive(runner.bitmask_width)) is not None:
        runner.run_followed(message)
