"""The batched LoRA delta, three ways, against the base projection it rides on.

For one layer's q projection of the default model (576 -> 576) and its MLP up projection
(576 -> 1536), with S adapter slots of rank r and T tokens spread over them (slot 0 = none):
- base: x @ W alone (the cost a delta is measured against);
- onehot: what jaxserve runs (model/lora.py): x @ A_all [in, S*r], a one-hot mask, @ B_all;
- ragged: jax.lax.ragged_dot over tokens sorted by slot (sort, two ragged dots, unsort);
- gather: each token's own A and B gathered ([T, in, r]), then two batched dots (BGMV).
Each is one jitted function, timed as the median of reps after a compile; reported as ms and
as the delta's cost relative to base. Writes one JSON record to bench/results/.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.save import save_record  # noqa: E402
from bench.timing import timed  # noqa: E402
from jaxserve.model.lora import lora_delta  # noqa: E402


def base(x, w, a, b, slots):
    return x @ w


def onehot(x, w, a, b, slots):
    s = a.shape[1]
    oh = (slots[:, None] == jnp.arange(1, s + 1)[None, :]).astype(x.dtype)
    return x @ w + lora_delta(x, a, b, oh)


def ragged(x, w, a, b, slots):
    # slot 0 (no adapter) becomes group 0 with zero weights, so every token is in a group
    s = a.shape[1]
    a_g = jnp.concatenate([jnp.zeros_like(a[:, :1]), a], axis=1).transpose(1, 0, 2)  # [S+1,in,r]
    b_g = jnp.concatenate([jnp.zeros_like(b[:1]), b], axis=0)  # [S+1, r, out]
    order = jnp.argsort(slots)
    sizes = jnp.bincount(slots, length=s + 1).astype(jnp.int32)
    xs = x[order]
    xa = jax.lax.ragged_dot(xs, a_g, sizes)
    delta = jax.lax.ragged_dot(xa, b_g, sizes)
    return x @ w + jnp.zeros_like(delta).at[order].set(delta)


def gather(x, w, a, b, slots):
    a_g = jnp.concatenate([jnp.zeros_like(a[:, :1]), a], axis=1)  # [in, S+1, r]
    b_g = jnp.concatenate([jnp.zeros_like(b[:1]), b], axis=0)  # [S+1, r, out]
    a_t = a_g[:, slots].transpose(1, 0, 2)  # [T, in, r]
    b_t = b_g[slots]  # [T, r, out]
    xa = jnp.einsum("ti,tir->tr", x, a_t)
    return x @ w + jnp.einsum("tr,tro->to", xa, b_t)


WAYS = {"base": base, "onehot": onehot, "ragged": ragged, "gather": gather}


def time_fn(fn, args, reps: int) -> float:
    f = jax.jit(fn)
    return statistics.median(timed(lambda: f(*args), reps))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slots", type=int, default=8)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--tokens", type=int, nargs="+", default=[64, 512])
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    results: dict[str, Any] = {"args": vars(args), "machine": platform.platform(), "cases": []}
    print(f"{'proj':>6} {'T':>5} " + " ".join(f"{k:>9}" for k in WAYS) + "   delta/base")
    for name, (d_in, d_out) in {"q": (576, 576), "up": (576, 1536)}.items():
        for t in args.tokens:
            x = jnp.asarray(rng.standard_normal((t, d_in)), jnp.float32)
            w = jnp.asarray(rng.standard_normal((d_in, d_out)) * 0.02, jnp.float32)
            a = jnp.asarray(rng.standard_normal((d_in, args.slots, args.rank)), jnp.float32)
            b = jnp.asarray(rng.standard_normal((args.slots, args.rank, d_out)), jnp.float32)
            slots = jnp.asarray(rng.integers(0, args.slots + 1, t), jnp.int32)
            ops = (x, w, a, b, slots)
            want = np.asarray(jax.jit(onehot)(*ops))
            for k in ("ragged", "gather"):  # the three ways compute the same thing
                got = np.asarray(jax.jit(WAYS[k])(*ops))
                assert np.allclose(got, want, rtol=1e-4, atol=1e-3), k
            ms = {k: 1000 * time_fn(fn, ops, args.reps) for k, fn in WAYS.items()}
            over = {k: (ms[k] - ms["base"]) / ms["base"] for k in ("onehot", "ragged", "gather")}
            results["cases"].append({"proj": name, "tokens": t, "ms": ms, "delta_over_base": over})
            print(
                f"{name:>6} {t:5d} "
                + " ".join(f"{ms[k]:9.3f}" for k in WAYS)
                + "   "
                + " ".join(f"{k}={v:+.2f}" for k, v in over.items())
            )
    save_record(results, args.out, "lora_kernels")


if __name__ == "__main__":
    main()
