"""Collective traffic of a compiled step, read from its HLO text (to predict GPU/TPU comms).

`collective_stats(compiled.as_text())` finds every all-reduce / all-gather / reduce-scatter /
collective-permute / all-to-all, the bytes of its operands, and how often it runs per step:
the layer scan is one HLO while loop, so an op inside its body runs `known_trip_count` times.
Ops inside the loop whose trip count is the model's depth are the per-layer collectives
(Megatron TP: two all-reduces per layer, after the attention and after the MLP).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from jaxserve.model.spec import ModelSpec

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "collective-permute", "all-to-all")

_DTYPE_BYTES = {
    "pred": 1,
    "s8": 1,
    "u8": 1,
    "s16": 2,
    "u16": 2,
    "f16": 2,
    "bf16": 2,
    "s32": 4,
    "u32": 4,
    "f32": 4,
    "s64": 8,
    "u64": 8,
    "f64": 8,
}
# "ENTRY %main.12 (" or "%region_0.5 (" or "%body.3 {" at the start of a computation
_COMP_RE = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s*[({]")
# one instruction: "%name = <shape> opcode(operands), attrs"
_INSTR_RE = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.+?)\s+([\w\-]+)\((.*)$")
_SHAPE_RE = re.compile(r"\b(pred|[suf]\d+|bf16)\[([\d,]*)\]")
_CALLS_RE = re.compile(r"\b(?:calls|body|to_apply|branch_computations|condition)=\{?([^,}\s]+)")
_TRIP_RE = re.compile(r'known_trip_count"?\s*:\s*\{\s*"?n"?\s*:\s*"?(\d+)')


@dataclass
class CollectiveOp:
    op: str  # all-reduce, all-gather, ...
    computation: str  # the HLO computation it sits in
    operand_shapes: list[str]  # e.g. ["f32[16,576]"] (per device)
    operand_bytes: int  # bytes of its operands, per device, per execution
    result_shape: str  # e.g. "f32[16,576]" (all-gather: the gathered size)
    executions_per_step: int  # product of the trip counts of the loops around it
    per_layer: bool  # inside the layer loop


@dataclass
class CollectiveStats:
    ops: list[CollectiveOp] = field(default_factory=list)
    # op -> executions per step (summed over ops), and op -> operand bytes per step
    count_per_step: dict[str, int] = field(default_factory=dict)
    bytes_per_step: dict[str, int] = field(default_factory=dict)
    # op -> how many run in one layer (ops inside the layer loop)
    per_layer: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _shape_bytes(dtype: str, dims: str) -> int:
    n = 1
    for d in filter(None, dims.split(",")):
        n *= int(d)
    return n * _DTYPE_BYTES.get(dtype, 4)


def _split_computations(hlo: str) -> tuple[dict[str, list[str]], str]:
    comps: dict[str, list[str]] = {}
    entry, current = "", None
    for line in hlo.splitlines():
        if current is None:
            m = _COMP_RE.match(line)
            if m and line.rstrip().endswith("{"):
                current = m.group(2)
                comps[current] = []
                if m.group(1):
                    entry = current
            continue
        if line.strip() == "}":
            current = None
        else:
            comps[current].append(line)
    return comps, entry


def collective_stats(hlo: str, num_layers: int | None = None) -> CollectiveStats:
    """Parses optimized HLO text; `num_layers` marks which loop is the layer scan."""
    comps, entry = _split_computations(hlo)
    stats = CollectiveStats()

    def visit(name: str, mult: int, in_layer: bool, seen: tuple[str, ...]) -> None:
        if name not in comps or name in seen:
            return
        # operands are printed by name only: remember each instruction's result shapes
        shape_of: dict[str, list[tuple[str, str]]] = {}
        for line in comps[name]:
            m = _INSTR_RE.match(line)
            if m:  # parameters ("%p = f32[..] parameter(0)") included
                shape_of[m.group(1)] = _SHAPE_RE.findall(m.group(2))
        for line in comps[name]:
            m = _INSTR_RE.match(line)
            if not m:
                continue
            opcode = m.group(3)
            base = opcode.removesuffix("-start")
            if base in COLLECTIVES and not opcode.endswith("-done"):
                operand_names = re.findall(r"%([\w.\-]+)", m.group(4).split(")", 1)[0])
                shapes = [s for n in operand_names for s in shape_of.get(n, [])]
                result = _SHAPE_RE.findall(m.group(2))
                stats.ops.append(
                    CollectiveOp(
                        op=base,
                        computation=name,
                        operand_shapes=[f"{d}[{s}]" for d, s in shapes],
                        operand_bytes=sum(_shape_bytes(d, s) for d, s in shapes),
                        result_shape=",".join(f"{d}[{s}]" for d, s in result),
                        executions_per_step=mult,
                        per_layer=in_layer,
                    )
                )
                continue  # its to_apply is a scalar reduction, not a callee that runs ops
            if opcode == "while":
                trip = _TRIP_RE.search(line)
                n = int(trip.group(1)) if trip else 1
                body = re.search(r"\bbody=%?([\w.\-]+)", line)
                if body:
                    layer = in_layer or (num_layers is not None and n == num_layers)
                    visit(body.group(1), mult * n, layer, (*seen, name))
                continue
            for callee in _CALLS_RE.findall(line):
                for c in callee.split(","):
                    visit(c.strip().lstrip("%"), mult, in_layer, (*seen, name))

    visit(entry, 1, False, ())
    for op in stats.ops:
        stats.count_per_step[op.op] = stats.count_per_step.get(op.op, 0) + op.executions_per_step
        stats.bytes_per_step[op.op] = (
            stats.bytes_per_step.get(op.op, 0) + op.operand_bytes * op.executions_per_step
        )
        if op.per_layer:
            stats.per_layer[op.op] = stats.per_layer.get(op.op, 0) + 1
    return stats


def abstract_step_collectives(
    spec: ModelSpec,
    tp: int,
    *,
    shape: tuple[int, int, int],
    dtype: Any = "bfloat16",
    num_blocks: int = 1024,
    block_size: int = 16,
    devices: Sequence[Any] | None = None,
) -> CollectiveStats:
    """Collectives of the TP step for any model shape, compiled from shapes alone.

    Nothing is allocated: params and cache are ShapeDtypeStructs with their shardings, so a
    70B-shaped step can be lowered on 8 virtual CPU devices to predict its GPU traffic.
    `shape` is the step bucket (tokens T, requests R, block-table width B).
    """
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec

    from jaxserve.model import llama, sharding
    from jaxserve.model.attention import KVCache
    from jaxserve.runner.step_fn import make_step_fn
    from jaxserve.runner.step_inputs import dummy_step_inputs

    dt = jnp.dtype(dtype)
    mesh = sharding.make_mesh(tp, devices)
    exec_spec = sharding.tp_spec(spec, tp)
    shards = sharding.param_shardings(exec_spec, mesh)
    params = jax.tree.map(
        lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh),
        llama.abstract_params(exec_spec, dt),
        shards,
    )
    kv_shape = (exec_spec.num_layers, num_blocks, block_size)
    kv_shape = (*kv_shape, exec_spec.num_kv_heads, exec_spec.head_dim)
    kv = jax.ShapeDtypeStruct(kv_shape, dt, sharding=sharding.named(mesh, "kv_cache"))
    step = make_step_fn(exec_spec, "xla", mesh, num_ids=shape[1])
    inputs = dummy_step_inputs(shape)
    last_ids = jax.ShapeDtypeStruct(
        (shape[1],), jnp.int32, sharding=NamedSharding(mesh, PartitionSpec())
    )
    # (the forward holds every collective: the sampler runs replicated on gathered logits)
    lowered = step.forward.lower(params, None, KVCache(k=kv, v=kv), last_ids, inputs)
    text = lowered.compile().as_text()
    return collective_stats(text, exec_spec.num_layers)


__all__ = [
    "COLLECTIVES",
    "CollectiveOp",
    "CollectiveStats",
    "abstract_step_collectives",
    "collective_stats",
]
