"""Process 0 of the two-process test: LLM(...) on a mesh spanning both processes.

usage: mh_leader.py OUT.json COORDINATOR MODEL_DIR (process 1 runs the `jaxserve generate`
CLI with --process-id 1, the follower loop). Writes the greedy tokens and the mesh it saw.
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"

import json  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

from jaxserve import distributed  # noqa: E402


def main() -> None:
    out, coordinator, model = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
    distributed.initialize(
        distributed.DistributedConfig(coordinator=coordinator, num_processes=2, process_id=0)
    )
    import jax

    from jaxserve import LLM, SamplingParams
    from tests.parallel.configs import ENGINE, TINY_PROMPTS

    greedy = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    with LLM(model, tensor_parallel_size=8, **ENGINE) as llm:
        outs = llm.generate(TINY_PROMPTS, greedy, use_tqdm=False)
        runner = llm.engine.core.runner
        result = {
            "greedy": [o.outputs[0].token_ids for o in outs],
            "process_count": jax.process_count(),
            "mesh_devices": len(runner.devices),
            "mesh_processes": sorted({d.process_index for d in runner.devices}),
            "local_kv_shards": len(runner.kv_cache.k.addressable_shards),
            "multihost": runner.multihost,
        }
    out.write_text(json.dumps(result))


if __name__ == "__main__":
    main()
