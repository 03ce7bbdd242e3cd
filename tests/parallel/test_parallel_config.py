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


def test_accelerator_kv_budget_counts_every_tp_device(monkeypatch: pytest.MonkeyPatch) -> None:
    """On accelerators the cache takes each device's free memory; TP devices add up."""
    import jax
    import jax.numpy as jnp

    from jaxserve.config import CacheConfig, SchedulerConfig
    from jaxserve.runner.kv_sizing import determine_num_blocks, kv_block_bytes
    from tests.model.helpers import tiny_spec

    class FakeGpu:
        process_index = 0

        def memory_stats(self) -> dict[str, int]:
            return {"bytes_limit": 1000 << 20, "bytes_in_use": 100 << 20}

    spec = tiny_spec(
        hidden_size=64,
        intermediate_size=128,
        num_layers=2,
        num_q_heads=8,
        num_kv_heads=8,
        head_dim=8,
        max_position_embeddings=64,
    )
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    cache, sched = CacheConfig(gpu_memory_utilization=0.5), SchedulerConfig(max_model_len=64)
    per_block = kv_block_bytes(spec, cache.block_size, jnp.float32)
    one = determine_num_blocks(spec, cache, sched, jnp.float32, 0, devices=[FakeGpu()])
    four = determine_num_blocks(spec, cache, sched, jnp.float32, 0, devices=[FakeGpu()] * 4)
    assert one == int(((1000 << 20) * 0.5 - (100 << 20)) * 0.9) // per_block
    assert four == int(((1000 << 20) * 0.5 - (100 << 20)) * 0.9) * 4 // per_block
