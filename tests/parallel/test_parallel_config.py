"""Parallel and multi-host settings: validation and the CLI (no devices needed)."""

from __future__ import annotations

import pytest

from jaxserve.cli import add_distributed_args, add_engine_args, engine_args_from
from jaxserve.config import EngineArgs
from jaxserve.distributed import DistributedConfig


def test_tensor_parallel_size_must_be_positive() -> None:
    with pytest.raises(ValueError, match="tensor_parallel_size must be >= 1, got 0"):
        EngineArgs(tensor_parallel_size=0).parallel_config()
    assert EngineArgs(tensor_parallel_size=4).parallel_config().tensor_parallel_size == 4


def test_cli_parses_parallel_flags() -> None:
    import argparse

    parser = argparse.ArgumentParser()
    add_engine_args(parser)
    add_distributed_args(parser)
    ns = parser.parse_args(
        "--tensor-parallel-size 3 --distributed-coordinator 10.0.0.1:1234 "
        "--num-processes 2 --process-id 1".split()
    )
    assert engine_args_from(ns).tensor_parallel_size == 3
    cfg = DistributedConfig.resolve(ns.distributed_coordinator, ns.num_processes, ns.process_id)
    assert cfg == DistributedConfig("10.0.0.1:1234", 2, 1)


def test_distributed_config_reads_env_and_validates(monkeypatch: pytest.MonkeyPatch) -> None:
    assert not DistributedConfig.resolve().enabled  # nothing set: one process
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "h:1")
    monkeypatch.setenv("JAX_NUM_PROCESSES", "4")
    monkeypatch.setenv("JAX_PROCESS_ID", "3")
    assert DistributedConfig.resolve() == DistributedConfig("h:1", 4, 3)
    assert DistributedConfig.resolve(process_id=0).process_id == 0  # arguments win
    with pytest.raises(ValueError, match="process_id must be in"):
        DistributedConfig("h:1", 2, 2)
    with pytest.raises(ValueError, match="coordinator"):
        DistributedConfig(None, 2, 0)
