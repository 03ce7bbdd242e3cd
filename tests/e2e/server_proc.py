"""A real `python -m server` process on loopback, for tests that drive the server from outside
(the openai client, raw aiohttp, raw sockets). It inherits PYTHONPATH, so the worktree's code
is what runs."""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import openai

MODEL = "smollm2-135m"
BASE_ARGS = ["--max-model-len", "512", "--max-num-batched-tokens", "128"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`python -m server --model <model> <base_args> <args>`, ready (/readyz 200) on return."""

    def __init__(
        self,
        tmp: Path,
        *args: str,
        model: str = MODEL,
        base_args: tuple[str, ...] | list[str] = tuple(BASE_ARGS),
    ) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tmp / f"server-{self.port}.log"
        cmd = [sys.executable, "-m", "server", "--model", model, "--port", str(self.port)]
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen([*cmd, *base_args, *args], stdout=log, stderr=log)
        self._wait_ready()

    def _wait_ready(self, timeout: float = 600.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited:\n{self.log.read_text()[-4000:]}")
            try:
                with urllib.request.urlopen(f"{self.url}/readyz", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"server not ready:\n{self.log.read_text()[-4000:]}")

    def client(self, **kw) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=kw.pop("api_key", "none"), **kw)

    def metric(self, name: str) -> float:
        text = urllib.request.urlopen(f"{self.url}/metrics").read().decode()
        m = re.search(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.M)
        assert m, f"{name} not in /metrics"
        return float(m.group(1))

    def post(self, path: str, body: dict) -> dict:
        req = urllib.request.Request(
            f"{self.url}{path}", json.dumps(body).encode(), {"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(req) as r:
            return json.loads(r.read())

    def core_pid(self) -> int:
        """The engine-core process: the spawned child (not multiprocessing's resource tracker)."""
        out = subprocess.run(["pgrep", "-P", str(self.proc.pid)], capture_output=True, text=True)
        for pid in map(int, out.stdout.split()):
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            if b"spawn_main" in cmdline:
                return pid
        raise AssertionError("no engine-core child process")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
