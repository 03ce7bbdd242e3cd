"""Ragged paged attention kernels vs the jnp reference, on whatever device is present.

On TPU it runs the Mosaic TPU kernel, on a CUDA GPU the Mosaic GPU kernel (the platform comes
from jax.default_backend()). For each workload mix (decode-heavy, prefill-heavy) it checks the
kernel against the reference, times both (median of --iters runs after a warmup), and prints
achieved bytes/s (the KV, q and output bytes the step must move) against the device's HBM
bandwidth measured in the same run with a large copy. On CPU the kernels only run in Pallas
interpret mode, so it checks correctness on scaled-down mixes and reports no timings.

    python bench/kernels.py              # writes bench/results/kernels-<platform>-<time>.json
"""

from __future__ import annotations

import argparse
import dataclasses
import platform as host_platform
import statistics
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from save import save_record

from pallas_kernels.ragged_paged_attention import ragged_paged_attention, ref_ragged_paged_attention


@dataclasses.dataclass(frozen=True)
class Mix:
    name: str  # workload label
    q_lens: tuple[int, ...]  # query tokens per request this step
    kv_lens: tuple[int, ...]  # context per request after this step


def mixes(small: bool) -> list[Mix]:
    """Decode-heavy: many single-token requests with long contexts, one small prefill chunk.
    Prefill-heavy: two long chunks and a few decodes. `small`: scaled down for interpret."""
    if small:
        return [
            Mix("decode_heavy", (1,) * 6 + (5,), (40, 17, 33, 64, 9, 48, 21)),
            Mix("prefill_heavy", (24, 20, 1, 1), (40, 20, 30, 12)),
        ]
    return [
        Mix("decode_heavy", (1,) * 63 + (64,), (1024,) * 63 + (512,)),
        Mix("prefill_heavy", (512, 508, 1, 1, 1, 1), (1024, 508, 2048, 2048, 2048, 2048)),
    ]


def make_inputs(mix: Mix, hq: int, hkv: int, d: int, bs: int, dtype, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    pages = [-(-k // bs) for k in mix.kv_lens]
    num_blocks = 1 + sum(pages)
    b = max(pages)
    tables = np.zeros((len(pages), b), np.int32)
    ids = rng.permutation(np.arange(1, num_blocks)).astype(np.int32)
    start = 0
    for i, n in enumerate(pages):
        tables[i, :n] = ids[start : start + n]
        start += n
    t = sum(mix.q_lens)
    key = jax.random.key(seed)
    kq, kk, kv = jax.random.split(key, 3)
    return dict(
        q=jax.random.normal(kq, (t, hq, d), dtype),
        k_cache=jax.random.normal(kk, (num_blocks, bs, hkv, d), dtype),
        v_cache=jax.random.normal(kv, (num_blocks, bs, hkv, d), dtype),
        kv_lens=jnp.asarray(mix.kv_lens, jnp.int32),
        block_tables=jnp.asarray(tables),
        cu_q_lens=jnp.asarray(np.concatenate([[0], np.cumsum(mix.q_lens)]), jnp.int32),
        num_seqs=jnp.asarray([len(mix.q_lens)], jnp.int32),
    )


def bytes_moved(mix: Mix, hq: int, hkv: int, d: int, bs: int, itemsize: int) -> int:
    """The least HBM traffic of one call: each request's KV pages once, q in, output out."""
    kv = sum(-(-k // bs) * bs for k in mix.kv_lens) * hkv * d * 2 * itemsize
    return kv + 2 * sum(mix.q_lens) * hq * d * itemsize


def timed(fn, args: dict, iters: int) -> float:
    """Median seconds of fn(**args) over iters runs, after one compile+warmup run."""
    jax.block_until_ready(fn(**args))
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(**args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def copy_bandwidth(nbytes: int, iters: int) -> float:
    """HBM bytes/s of a large elementwise pass (reads and writes nbytes each)."""
    x = jnp.ones((nbytes // 4,), jnp.float32)
    f = jax.jit(lambda x: x + 1.0)
    secs = timed(lambda x: f(x), {"x": x}, iters)
    return 2 * x.nbytes / secs


def run(args: argparse.Namespace) -> dict[str, Any]:
    backend = jax.default_backend()
    on_cpu = backend == "cpu"
    platforms = {"tpu": ["tpu"], "gpu": ["cuda"], "cuda": ["cuda"]}.get(backend, ["tpu", "cuda"])
    if args.platforms:
        platforms = [p for p in platforms if p in args.platforms.split(",")]
    dtype = jnp.float32 if on_cpu else jnp.bfloat16
    hq, hkv, d, bs = args.num_q_heads, args.num_kv_heads, args.head_dim, args.block_size
    if on_cpu:
        print("CPU: kernels run in Pallas interpret mode; checking correctness only, no timings.")
        hq, hkv, d = min(hq, 4), min(hkv, 2), min(d, 128)
    record: dict[str, Any] = {
        "bench": "kernels",
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "machine": host_platform.platform(),
        "backend": backend,
        "devices": [str(x.device_kind) for x in jax.devices()],
        "dtype": jnp.dtype(dtype).name,
        "shape": dict(num_q_heads=hq, num_kv_heads=hkv, head_dim=d, block_size=bs),
        "results": [],
    }
    if not on_cpu:
        bw = copy_bandwidth(args.copy_mib << 20, args.iters)
        record["copy_bandwidth_bytes_s"] = bw
        print(f"{backend}: measured copy bandwidth {bw / 1e9:.0f} GB/s")
    tol = {"float32": 2e-5, "bfloat16": 3e-2}[jnp.dtype(dtype).name]
    ref = jax.jit(ref_ragged_paged_attention, static_argnames=("sm_scale",))
    for mix in mixes(on_cpu):
        if args.mixes and mix.name not in args.mixes.split(","):
            continue
        inputs = make_inputs(mix, hq, hkv, d, bs, dtype, seed=0)
        want = ref(**inputs, sm_scale=d**-0.5)
        for plat in platforms:
            row: dict[str, Any] = {"mix": mix.name, "platform": plat}
            kernel = jax.jit(
                lambda plat=plat, **kw: ragged_paged_attention(
                    **kw, sm_scale=d**-0.5, platform=plat, interpret=on_cpu
                )
            )
            try:
                got = kernel(**inputs)
            except ImportError as e:  # gpu.py not on this branch yet
                row["unavailable"] = str(e)
                print(f"{mix.name:14s} {plat:5s} kernel not available: {e}")
                record["results"].append(row)
                continue
            except Exception as e:  # noqa: BLE001 - report and go on to the other kernels
                row["error"] = f"{type(e).__name__}: {e}"
                print(f"{mix.name:14s} {plat:5s} {row['error']}")
                record["results"].append(row)
                continue
            err = float(jnp.max(jnp.abs(got.astype(jnp.float32) - want.astype(jnp.float32))))
            row["max_abs_err"] = err
            row["correct"] = bool(err <= tol * (1 + float(jnp.max(jnp.abs(want)))))
            line = (
                f"{mix.name:14s} {plat:5s} max|err| {err:.2e} {'ok' if row['correct'] else 'WRONG'}"
            )
            if not on_cpu:
                nbytes = bytes_moved(mix, hq, hkv, d, bs, jnp.dtype(dtype).itemsize)
                t_kernel = timed(kernel, inputs, args.iters)
                t_ref = timed(lambda **kw: ref(**kw, sm_scale=d**-0.5), inputs, args.iters)
                row.update(
                    bytes=nbytes,
                    kernel_s=t_kernel,
                    reference_s=t_ref,
                    kernel_bytes_s=nbytes / t_kernel,
                    fraction_of_copy_bw=nbytes / t_kernel / record["copy_bandwidth_bytes_s"],
                    speedup_vs_reference=t_ref / t_kernel,
                )
                line += (
                    f"  kernel {t_kernel * 1e3:8.3f} ms ({nbytes / t_kernel / 1e9:6.0f} GB/s, "
                    f"{row['fraction_of_copy_bw'] * 100:4.0f}% of copy)  reference "
                    f"{t_ref * 1e3:8.3f} ms"
                )
            print(line)
            record["results"].append(row)
    return record


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--num-q-heads", type=int, default=32)
    ap.add_argument("--num-kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--copy-mib", type=int, default=1024)
    ap.add_argument("--platforms", default="", help="comma list of kernels (tpu,cuda) to run")
    ap.add_argument("--mixes", default="", help="comma list of mixes (decode_heavy,...) to run")
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args()
    record = run(args)
    record["args"] = vars(args)
    path = save_record(record, args.out, f"kernels-{record['backend']}")
    bad = [r for r in record["results"] if "error" in r or r.get("correct") is False]
    if bad:
        raise SystemExit(f"{len(bad)} kernel run(s) failed or were wrong: see {path}")


if __name__ == "__main__":
    main()
