"""Tensor parallel on 8 virtual CPU devices == one device; sharded layouts and loading.

The device count must be set before jax starts, so every check runs in one subprocess
(tp_worker.py, one jax start-up for all of them) and the tests assert on its JSON results.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from jaxserve.model.sharding import valid_tp_sizes
from jaxserve.model.spec import ModelSpec

WORKER = Path(__file__).with_name("tp_worker.py")
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory, smollm2_gguf: Path) -> dict:
    tmp = tmp_path_factory.mktemp("tp")
    out = tmp / "results.json"
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    groups = ["smollm2", "tiny", "orbax", "shard_map", "hlo", "lora"]
    proc = subprocess.run(
        [sys.executable, str(WORKER), str(out), str(tmp), *groups],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0 and out.is_file(), proc.stderr[-4000:]
    data = json.loads(out.read_text())
    assert data["num_devices"] == 8
    data["tmp"] = str(tmp)
    return data


def _group(results: dict, name: str) -> dict:
    group = results[name]
    assert "error" not in group, group.get("error")
    return group


def test_default_model_tp3_matches_one_device(results: dict) -> None:
    r = _group(results, "smollm2")
    one, tp3 = r["tp1"], r["tp3"]
    assert tp3["greedy"] == one["greedy"]
    assert tp3["seeded"] == one["seeded"]  # sampler runs on gathered logits: same draws
    assert len(set(one["greedy"][0])) > 1  # a real continuation, not one token repeated
    # 3 kv heads over 3 devices: one kv head each; q columns split 3 ways
    assert tp3["kv_shard_shape"][3] == 1 and tp3["kv_global_shape"][3] == 3
    assert tp3["wq_shard_shape"][-1] * 3 == tp3["wq_global_shape"][-1]
    assert tp3["kv_bytes_per_device"] == [tp3["kv_total_bytes"] // 3] * 3
    assert tp3["compiles_after_warmup"] == 0


def test_default_model_bad_tp_names_valid_sizes(results: dict) -> None:
    err = _group(results, "smollm2")["tp2_error"]
    assert err is not None and "tensor_parallel_size=2" in err
    assert "[1, 3, 9]" in err


@pytest.mark.parametrize("model", ["kv8", "kv2"])
@pytest.mark.parametrize("tp", [2, 4, 8])
def test_tiny_model_tp_matches_one_device(results: dict, model: str, tp: int) -> None:
    runs = _group(results, "tiny")[model]
    one, sharded = runs["tp1"], runs[f"tp{tp}"]
    assert sharded["greedy"] == one["greedy"]
    assert sharded["seeded"] == one["seeded"]
    assert sharded["constrained"] == one["constrained"]
    assert re.fullmatch("[a-z]{2,5}-[0-9]{2}", one["constrained"])
    for got, want in zip(sharded["prompt_logprobs"], one["prompt_logprobs"], strict=True):
        assert (got is None) == (want is None)
        if want is not None:  # the same top tokens; logprobs up to float32 rounding
            assert got.keys() == want.keys()
            assert max(abs(got[t] - want[t]) for t in want) < 1e-4
    assert sharded["kv_devices"] == tp
    diff = max(abs(a - b) for a, b in zip(sharded["embedding"], one["embedding"], strict=True))
    assert diff < 1e-5  # embeddings (unit norm) over the sharded params: same up to rounding
    assert sharded["wq_shard_shape"][-1] * tp == sharded["wq_global_shape"][-1]
    hkv = int(model[2:])
    # every device holds exactly one share of the cache (kv heads sharded or replicated)
    assert sharded["kv_bytes_per_device"] == [sharded["kv_total_bytes"] // tp] * tp
    if hkv % tp == 0:  # kv heads divide: the cache is the one-device cache split tp ways
        assert sharded["num_blocks"] == one["num_blocks"]
        assert sharded["kv_total_bytes"] == one["kv_total_bytes"]
        assert sharded["kv_shard_shape"][3] == hkv // tp
    else:  # replicated: each device holds one (repeated) kv head
        assert sharded["kv_shard_shape"][3] == 1
        assert sharded["kv_global_shape"][3] == tp


@pytest.mark.parametrize("model", ["kv8", "kv2"])
def test_lora_under_tp_matches_one_device(results: dict, model: str) -> None:
    runs = _group(results, "lora")[model]
    one = runs["tp1"]
    # the adapters change the output (base, lora 1, lora 2 on one prompt all differ)
    assert len({tuple(t) for t in one["greedy"][:3]}) == 3
    for tp in (2, 4):
        got = runs[f"tp{tp}"]
        assert got["greedy"] == one["greedy"], tp
        # B of a column-parallel weight splits its output, A of a row-parallel one its input
        assert got["b_q_shard_shape"][-1] * tp == one["b_q_shard_shape"][-1]
        assert got["a_o_shard_shape"][1] * tp == one["a_o_shard_shape"][1]
    if model == "kv2":  # TP 4 > 2 kv heads: k columns of B repeated like wk's
        assert runs["tp4"]["b_k_global_shape"][-1] == 2 * one["b_k_global_shape"][-1]


def test_orbax_sharded_round_trip_is_bit_exact(results: dict) -> None:
    r = _group(results, "orbax")
    for key in ("tpNone", "tp4", "tp8"):  # unsharded, the saved layout, another TP size
        assert r[key]["exact"], key
        assert r[key]["spec_same"], key
        assert r[key]["placement_ok"], key
    assert r["tp4"]["wq_shard_shape"] == [2, 128, 32]  # 8 heads x 16 dims over 4 devices
    assert r["tp8"]["wq_shard_shape"] == [2, 128, 16]
    assert r["tpNone"]["wq_shard_shape"] == [2, 128, 128]


def test_shard_map_attention_matches_unsharded(results: dict) -> None:
    for key, r in _group(results, "shard_map").items():
        assert r["max_abs"] > 0.1, key
        # per-device head batches change XLA:CPU's vectorisation: last-bit differences only
        assert r["max_abs_diff"] <= 1e-5, (key, r)


def test_hlo_collectives_of_tp2_step(results: dict) -> None:
    r = _group(results, "hlo")
    stats, layers = r["stats"], r["num_layers"]
    # Megatron: one all-reduce after the attention, one after the MLP, in every layer
    assert stats["per_layer"] == {"all-reduce": 2}
    assert stats["count_per_step"]["all-reduce"] >= 2 * layers
    per_layer = [op for op in stats["ops"] if op["per_layer"]]
    assert all(op["executions_per_step"] == layers for op in per_layer)
    assert all(op["operand_shapes"][0].endswith(f",{r['hidden']}]") for op in per_layer)
    # logits gathered once, vocab-parallel: each device sends its [R, V/2] half
    (gather,) = [op for op in stats["ops"] if op["op"] == "all-gather"]
    assert gather["operand_shapes"][0].endswith(f",{r['vocab'] // 2}]")
    assert stats["bytes_per_step"]["all-reduce"] > 0
    # compiled from shapes alone (bench/throughput.py's COMM report), TP=8, decode T=R=4
    abstract = r["abstract_tp8"]
    assert abstract["per_layer"] == {"all-reduce": 2}
    assert abstract["count_per_step"]["all-gather"] == 1
    per_layer_bytes = 4 * r["hidden"] * 4  # [T=4, E] float32 per all-reduce
    assert all(op["operand_bytes"] == per_layer_bytes for op in abstract["ops"] if op["per_layer"])


def _spec(hq: int, hkv: int) -> ModelSpec:
    return ModelSpec(
        architecture="llama",
        vocab_size=64,
        hidden_size=hq * 8,
        intermediate_size=32,
        num_layers=1,
        num_q_heads=hq,
        num_kv_heads=hkv,
        head_dim=8,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        rope_scaling=None,
        max_position_embeddings=64,
        tie_word_embeddings=True,
    )


def test_valid_tp_sizes() -> None:
    assert valid_tp_sizes(_spec(9, 3)) == [1, 3, 9]
    assert valid_tp_sizes(_spec(8, 2)) == [1, 2, 4, 8]
    assert valid_tp_sizes(_spec(32, 8)) == [1, 2, 4, 8, 16, 32]
    # 12 q / 4 kv: TP=6 would give a device q heads of two kv groups
    assert valid_tp_sizes(_spec(12, 4)) == [1, 2, 4, 12]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_form_one_mesh_and_match_one_process(results: dict, tmp_path: Path) -> None:
    """Process 0: LLM(tensor_parallel_size=8) over 2 processes x 4 CPU devices; process 1:
    the CLI's follower (`jaxserve generate ... --process-id 1`)."""
    reference = _group(results, "tiny")["kv8"]["tp1"]["greedy"]  # one process, one device
    model = str(Path(results["tmp"]) / "kv8")
    coordinator = f"127.0.0.1:{_free_port()}"
    env = {
        **os.environ,
        "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
        "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
    }
    dist = ["--distributed-coordinator", coordinator, "--num-processes", "2"]
    follower = subprocess.Popen(
        [sys.executable, "-m", "jaxserve.cli", "generate", "unused prompt", "--model", model]
        + ["--tensor-parallel-size", "8", "--max-model-len", "64", "--max-num-seqs", "4"]
        + ["--max-num-batched-tokens", "32", "--no-warmup", *dist, "--process-id", "1"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    out = tmp_path / "leader.json"
    try:
        leader = subprocess.run(
            [sys.executable, str(WORKER.with_name("mh_leader.py")), str(out), coordinator, model],
            env=env,
            capture_output=True,
            text=True,
            timeout=240,
        )
        follower_log, _ = follower.communicate(timeout=60)
    finally:
        if follower.poll() is None:
            follower.kill()
            follower.wait()
    assert leader.returncode == 0, leader.stderr[-4000:]
    assert follower.returncode == 0, follower_log[-4000:]  # left its loop when 0 closed
    got = json.loads(out.read_text())
    assert got["process_count"] == 2 and got["multihost"]
    assert got["mesh_devices"] == 8 and got["mesh_processes"] == [0, 1]
    assert got["local_kv_shards"] == 4  # this process holds half the cache, 1 kv head each
    assert got["greedy"] == reference
