"""Data-parallel checks, run in a subprocess that sees 8 host devices (see test_dp.py).

Usage: python -m tests.parallel.dp_check MODEL TP -> one JSON line on stdout with, for the
same greedy prompts: one engine's tokens, the offline DP=2 engine's tokens and routing and
devices, and the server-side (AsyncLLM, engine-core process) DP=2 tokens, routing and health.
"""

from __future__ import annotations

import asyncio
import json
import sys

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time",
    "The three primary colors are",
    "In 1969, astronauts",
    "import numpy as np",
    "The quick brown fox",
    "Water boils at",
]


def main() -> None:
    model, tp = sys.argv[1], int(sys.argv[2])
    from jaxserve import LLM, SamplingParams
    from jaxserve.config import EngineArgs
    from jaxserve.engine.async_llm import AsyncLLM

    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    common = dict(
        model=model,
        max_model_len=128,
        max_num_seqs=8,
        max_num_batched_tokens=64,
        enable_warmup=False,
        tensor_parallel_size=tp,
    )
    result: dict[str, object] = {}
    with LLM(**common) as one:
        result["one"] = [o.outputs[0].token_ids for o in one.generate(PROMPTS, params)]
    with LLM(**common, data_parallel_size=2) as dp:
        result["offline"] = [o.outputs[0].token_ids for o in dp.generate(PROMPTS, params)]
        core = dp.engine.core
        from jaxserve.engine.core_interface import EngineCoreInterface

        result["is_core_interface"] = isinstance(core, EngineCoreInterface)
        result["offline_routed"] = list(core.requests_per_replica)
        result["devices"] = [
            sorted(d.id for d in r.runner.kv_cache.k.sharding.device_set) for r in core.replicas
        ]
        result["leaked_blocks"] = [
            s.kv_cache_manager.num_usable_blocks - s.kv_cache_manager.num_free_blocks
            for s in core.schedulers
        ]

    async def serve() -> None:
        args = EngineArgs(**common, data_parallel_size=2)
        async with await AsyncLLM.create(args) as llm:

            async def one_request(i: int) -> list[int]:
                final = []
                async for out in llm.generate(PROMPTS[i], params, f"req-{i}"):
                    final.extend(out.outputs[0].token_ids)
                return final

            result["server"] = await asyncio.gather(*(one_request(i) for i in range(8)))
            await llm.check_health(timeout=60)
            result["health"] = "ok"
            while not llm.stats.requests_per_replica:  # the next heartbeat carries them
                await asyncio.sleep(0.1)
            result["server_routed"] = list(llm.stats.requests_per_replica)

    asyncio.run(serve())
    print(json.dumps(result))


if __name__ == "__main__":
    main()
