"""EngineArgs, its parts, and the CLI flags derived from it (one declaration, no drift)."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from jaxserve.cli import add_engine_args, engine_args_from, field_comments
from jaxserve.config import (
    CacheConfig,
    EngineArgs,
    ModelConfig,
    ParallelConfig,
    SchedulerConfig,
)

FIELDS = [f.name for f in dataclasses.fields(EngineArgs)]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    add_engine_args(parser)
    return parser


def test_every_field_is_a_flag_and_every_flag_a_field():
    flags = {s for a in _parser()._actions for s in a.option_strings} - {"-h", "--help"}
    bools = [f.name for f in dataclasses.fields(EngineArgs) if isinstance(f.default, bool)]
    expected = {"--" + n.replace("_", "-") for n in FIELDS}
    expected |= {"--no-" + n.replace("_", "-") for n in bools}
    expected |= {"--warmup", "--no-warmup"}  # the older spelling of --enable-warmup
    assert flags == expected


def test_every_field_has_its_comment_as_help():
    helps = field_comments(EngineArgs)
    assert set(helps) == set(FIELDS), sorted(set(FIELDS) - set(helps))
    assert all(len(h) > 10 for h in helps.values())
    actions = {a.dest: a for a in _parser()._actions}
    assert actions["block_size"].help == "tokens per KV block"


def test_defaults_and_types_round_trip():
    assert engine_args_from(_parser().parse_args([])) == EngineArgs()
    ns = _parser().parse_args(
        ["--max-model-len", "256", "--gpu-memory-utilization", "0.5", "--no-warmup"]
        + ["--no-enable-prefix-caching", "--scheduling-policy", "priority", "--dtype", "float32"]
        + ["--tokenizer", "some/dir", "--no-enable-chunked-prefill"]
    )
    args = engine_args_from(ns)
    assert args.max_model_len == 256 and args.gpu_memory_utilization == 0.5
    assert not args.enable_warmup and not args.enable_prefix_caching
    assert not args.enable_chunked_prefill and args.tokenizer == "some/dir"
    assert args.scheduling_policy == "priority" and args.dtype == "float32"
    with pytest.raises(SystemExit):
        _parser().parse_args(["--dtype", "int8"])  # Literal choices come from the annotation


def test_parts_take_their_fields_by_name():
    args = EngineArgs(
        max_model_len=300,
        block_size=32,
        enable_chunked_prefill=False,
        scheduling_policy="priority",
        tensor_parallel_size=2,
        attention_backend="xla",
    )
    assert args.model_config().max_model_len == 300
    assert args.model_config().attention_backend == "xla"
    assert args.cache_config().block_size == 32
    sched = args.scheduler_config(max_model_len=256)  # the engine's resolved length wins
    assert sched.max_model_len == 256 and sched.scheduling_policy == "priority"
    assert sched.enable_chunked_prefill is False
    assert args.parallel_config().tensor_parallel_size == 2


@pytest.mark.parametrize("part", [ModelConfig, CacheConfig, SchedulerConfig, ParallelConfig])
def test_every_part_field_is_settable(part):
    # a part's field that EngineArgs lacks could never be set by a user; the one exception is
    # the probe seat, which the engine-core process reserves for itself (EngineCore's argument)
    engine_set = {"num_reserved_seqs"} if part is SchedulerConfig else set()
    assert {f.name for f in dataclasses.fields(part)} - engine_set <= set(FIELDS)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"tensor_parallel_size": 0}, "tensor_parallel_size"),
        ({"dtype": "int8"}, "dtype"),
        ({"max_model_len": 0}, "max_model_len"),
        ({"attention_backend": "flash"}, "attention_backend"),
        ({"block_size": 24}, "block_size"),
        ({"gpu_memory_utilization": 1.5}, "gpu_memory_utilization"),
        ({"max_num_seqs": 0}, "max_num_seqs"),
        ({"scheduling_policy": "lifo"}, "scheduling_policy"),
    ],
)
def test_bad_values_name_the_field(kwargs, field):
    # each part validates what it reads, when the engine asks for it
    with pytest.raises(ValueError, match=field):
        args = EngineArgs(**kwargs)
        args.model_config()
        args.cache_config()
        args.scheduler_config(128)


def test_unknown_keyword_is_a_type_error():
    with pytest.raises(TypeError, match="max_num_seq"):
        EngineArgs.from_kwargs(max_num_seq=4)
