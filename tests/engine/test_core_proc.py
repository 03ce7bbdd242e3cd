"""The engine-core process on its own: it never outlives the process that started it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

ENGINE = dict(max_model_len=128, max_num_batched_tokens=64, max_num_seqs=8, enable_warmup=False)


def test_core_exits_when_its_parent_dies(tiny_model_dir, tmp_path):
    script = tmp_path / "parent.py"
    # the __main__ guard: "spawn" re-imports the parent's main module in the child
    script.write_text(
        "import asyncio\n"
        "from jaxserve.config import EngineArgs\n"
        "from jaxserve.engine.async_llm import AsyncLLM\n"
        "async def main():\n"
        f"    args = EngineArgs(model={str(tiny_model_dir)!r}, **{ENGINE})\n"
        "    llm = await AsyncLLM.create(args)\n"
        "    print(llm.core_pid, flush=True)\n"
        "    await asyncio.sleep(600)\n"
        "if __name__ == '__main__':\n"
        "    asyncio.run(main())\n"
    )
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        line = parent.stdout.readline()
    finally:
        parent.kill()  # SIGKILL: no atexit, no daemon-process cleanup
        parent.wait()
    core_pid = int(line)
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline:
        try:
            os.kill(core_pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    os.kill(core_pid, signal.SIGKILL)
    pytest.fail("the engine core outlived its parent by 5 s")
