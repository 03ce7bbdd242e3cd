"""Online serving benchmark (in the style of vLLM's benchmark_serving), with the offline
throughput of the same requests measured in the same run as its baseline.

Starts `python -m server` (or uses --base-url), sends streaming /v1/completions requests at a
fixed concurrency or a Poisson request rate, from a random or shared-prefix dataset, and
reports output tok/s, TTFT, TPOT and ITL (p50 / p99). Then runs the same requests through the
offline LLM and reports HTTP throughput as a fraction of it. Writes JSON and a PNG plot to
bench/results/.

The speed issue's serving target (ITL p99 <= 3x ITL p50, HTTP tok/s kept) is measured at
  python bench/serve.py --num-prompts 64 --input-len 128 --output-len 128 --concurrency 16
and each concurrency's line says whether its ITL p99 / p50 meets it; give
--long-prefill-token-threshold 0 64 to compare the prefill cap with no cap in the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import aiohttp

# The speed issue's serving target: ITL p99 at most this many times ITL p50.
ITL_P99_OVER_P50_TARGET = 3.0


def make_dataset(args: argparse.Namespace) -> list[list[int]]:
    rng = random.Random(args.seed)
    vocab = 49152

    def tokens(n: int) -> list[int]:
        return [rng.randrange(100, vocab) for _ in range(n)]

    if args.dataset == "shared-prefix":
        prefix = tokens(args.prefix_len)
        return [prefix + tokens(args.input_len) for _ in range(args.num_prompts)]
    return [tokens(args.input_len) for _ in range(args.num_prompts)]


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q / 100 * len(values)))]


async def one_request(
    session: aiohttp.ClientSession, url: str, prompt: list[int], output_len: int
) -> dict[str, Any]:
    body = {
        "prompt": prompt,
        "max_tokens": output_len,
        "temperature": 0.0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    start = time.perf_counter()
    chunk_times: list[float] = []
    usage = None
    async with session.post(f"{url}/v1/completions", json=body) as resp:
        if resp.status != 200:
            return {"ok": False, "status": resp.status, "error": await resp.text()}
        async for line in resp.content:
            if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
                continue
            event = json.loads(line[6:])
            if event.get("usage"):
                usage = event["usage"]
            if event.get("choices") and event["choices"][0].get("text"):
                chunk_times.append(time.perf_counter())
    end = time.perf_counter()
    n_out = usage["completion_tokens"] if usage else len(chunk_times)
    ttft = chunk_times[0] - start if chunk_times else float("nan")
    return {
        "ok": True,
        "ttft": ttft,
        "e2e": end - start,
        "itl": [b - a for a, b in zip(chunk_times, chunk_times[1:], strict=False)],
        "tpot": (end - start - ttft) / max(1, n_out - 1),
        "output_tokens": n_out,
        "cached_tokens": (usage or {}).get("prompt_tokens_details", {}).get("cached_tokens", 0),
    }


async def run_online(
    url: str, prompts: list[list[int]], output_len: int, concurrency: int, rate: float, seed: int
) -> dict[str, Any]:
    sem = asyncio.Semaphore(concurrency)
    rng = random.Random(seed)
    timeout = aiohttp.ClientTimeout(total=None)
    async with aiohttp.ClientSession(timeout=timeout) as session:

        async def limited(p: list[int]) -> dict[str, Any]:
            async with sem:
                return await one_request(session, url, p, output_len)

        start = time.perf_counter()
        tasks = []
        for p in prompts:
            tasks.append(asyncio.ensure_future(limited(p)))
            if rate != float("inf"):
                await asyncio.sleep(rng.expovariate(rate))
        results = await asyncio.gather(*tasks)
        wall = time.perf_counter() - start
    ok = [r for r in results if r["ok"]]
    itl = [x for r in ok for x in r["itl"]]
    total_out = sum(r["output_tokens"] for r in ok)
    return {
        "concurrency": concurrency,
        "request_rate": rate,
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "seconds": wall,
        "output_tok_s": total_out / wall,
        "ttft_p50_s": pct([r["ttft"] for r in ok], 50),
        "ttft_p99_s": pct([r["ttft"] for r in ok], 99),
        "tpot_p50_s": pct([r["tpot"] for r in ok], 50),
        "tpot_p99_s": pct([r["tpot"] for r in ok], 99),
        "itl_p50_s": pct(itl, 50),
        "itl_p99_s": pct(itl, 99),
        # a step that stalls every stream (a long prefill chunk) shows here, not in the p50
        "itl_p99_over_p50": pct(itl, 99) / pct(itl, 50) if itl and min(itl) > 0 else float("nan"),
        "mean_cached_tokens": statistics.fmean(r["cached_tokens"] for r in ok) if ok else 0,
    }


def run_offline(args: argparse.Namespace, prompts: list[list[int]]) -> dict[str, Any]:
    from jaxserve import LLM, SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)
    with LLM(args.model, show_progress=False, **engine_kwargs(args)) as llm:
        start = time.perf_counter()
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        wall = time.perf_counter() - start
    total = sum(len(o.outputs[0].token_ids) for o in outs)
    return {"seconds": wall, "output_tok_s": total / wall}


def engine_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "max_model_len": args.max_model_len,
        "max_num_seqs": args.max_num_seqs,
        "max_num_batched_tokens": args.max_num_batched_tokens,
    }


def start_server(
    args: argparse.Namespace, log_path: Path, long_prefill_token_threshold: int
) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "server", "--model", args.model, "--port", str(port)]
    # Same engine arguments as the offline run (the server keeps one of the max_num_seqs
    # slots for health probes, so its users get one fewer).
    cmd += [
        "--max-model-len",
        str(args.max_model_len),
        "--max-num-seqs",
        str(args.max_num_seqs),
        "--max-num-batched-tokens",
        str(args.max_num_batched_tokens),
        "--max-waiting-requests",
        "100000",
        "--long-prefill-token-threshold",
        str(long_prefill_token_threshold),
    ]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=log)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited; see {log_path}")
        try:
            with urllib.request.urlopen(f"{url}/readyz", timeout=2) as r:
                if r.status == 200:
                    return proc, url
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"server not ready; see {log_path}")


def plot(record: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = record["online"]
    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    xs = [r["concurrency"] for r in runs]
    ax[0].plot(xs, [r["output_tok_s"] for r in runs], "o-", label="HTTP")
    if record.get("offline"):
        ax[0].axhline(record["offline"]["output_tok_s"], color="gray", ls="--", label="offline")
    ax[0].set_xlabel("concurrency")
    ax[0].set_ylabel("output tok/s")
    ax[0].legend()
    ax[1].plot([r["output_tok_s"] for r in runs], [r["ttft_p50_s"] for r in runs], "o-")
    for r in runs:
        ax[1].annotate(str(r["concurrency"]), (r["output_tok_s"], r["ttft_p50_s"]))
    ax[1].set_xlabel("output tok/s")
    ax[1].set_ylabel("TTFT p50 (s)")
    fig.suptitle(f"jaxserve serve: {record['args']['model']} ({record['args']['dataset']})")
    fig.tight_layout()
    fig.savefig(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--base-url", default=None, help="use a running server instead")
    ap.add_argument("--dataset", choices=["random", "shared-prefix"], default="random")
    ap.add_argument("--num-prompts", type=int, default=128)
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--prefix-len", type=int, default=512)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[32])
    ap.add_argument(
        "--request-rate",
        type=float,
        default=float("inf"),
        help="Poisson arrivals per second (inf: all at once, capped by concurrency)",
    )
    ap.add_argument("--max-model-len", type=int, default=512)
    ap.add_argument("--max-num-seqs", type=int, default=32)
    ap.add_argument("--max-num-batched-tokens", type=int, default=512)
    ap.add_argument(
        "--long-prefill-token-threshold",
        type=int,
        nargs="+",
        default=[0],
        help="one server per value, in this order (the ITL stall of a prompt beside decodes)",
    )
    ap.add_argument("--skip-offline", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args()
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    prompts = make_dataset(args)
    record: dict[str, Any] = {"bench": "serve", "time": stamp, "args": vars(args), "online": []}
    # a running server (--base-url) has its own threshold: one pass, recorded as None
    thresholds = [None] if args.base_url else args.long_prefill_token_threshold
    for threshold in thresholds:
        proc = None
        url = args.base_url
        if url is None:
            proc, url = start_server(args, out_dir / f"serve-{stamp}-{threshold}.log", threshold)
        try:
            # One short warm request so the first measured request does not pay for anything.
            asyncio.run(run_online(url, prompts[:1], 2, 1, float("inf"), args.seed))
            for c in args.concurrency:
                row = asyncio.run(
                    run_online(url, prompts, args.output_len, c, args.request_rate, args.seed)
                )
                record["online"].append({"long_prefill_token_threshold": threshold, **row})
        finally:
            if proc is not None:
                proc.terminate()
                proc.wait(60)
    if not args.skip_offline:
        record["offline"] = run_offline(args, prompts)
        for r in record["online"]:
            r["fraction_of_offline"] = r["output_tok_s"] / record["offline"]["output_tok_s"]
    print(
        f"\n{'lpt':>5} {'conc':>5} {'tok/s':>8} {'of offline':>10} {'TTFT p50/p99 (s)':>18} "
        f"{'TPOT p50 (ms)':>14} {'ITL p50/p99 (ms)':>18} {'p99/p50':>8}"
    )
    for r in record["online"]:
        frac = f"{r['fraction_of_offline'] * 100:.0f}%" if "fraction_of_offline" in r else "-"
        print(
            f"{r['long_prefill_token_threshold']!s:>5} {r['concurrency']:>5} "
            f"{r['output_tok_s']:>8.1f} {frac:>10} "
            f"{r['ttft_p50_s']:>8.2f}/{r['ttft_p99_s']:<8.2f} {r['tpot_p50_s'] * 1e3:>14.0f} "
            f"{r['itl_p50_s'] * 1e3:>8.0f}/{r['itl_p99_s'] * 1e3:<8.0f} "
            f"{r['itl_p99_over_p50']:>7.1f}x "
            f"({'meets' if r['itl_p99_over_p50'] <= ITL_P99_OVER_P50_TARGET else 'misses'} "
            f"target <= {ITL_P99_OVER_P50_TARGET:g}x)"
        )
    if record.get("offline"):
        print(f"offline: {record['offline']['output_tok_s']:.1f} tok/s")
    path = out_dir / f"serve-{stamp}.json"
    path.write_text(json.dumps(record, indent=2))
    try:
        plot(record, out_dir / f"serve-{stamp}.png")
    except ImportError:
        print("matplotlib not installed: no plot")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
