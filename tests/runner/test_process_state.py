"""Process-wide state has owners: compile counting and the compile cache settings end with them."""

from __future__ import annotations

import subprocess
import sys

import jax
import numpy as np

from jaxserve.runner.compile_counter import CompileCounter


def test_counts_new_programs_only_while_open():
    f = jax.jit(lambda x: x * 3 + 1)
    # numpy inputs: nothing but f itself is lowered
    x3, x5, x7 = (np.ones(n, np.float32) for n in (3, 5, 7))
    counter = CompileCounter()
    f(x3)
    assert counter.count == 1
    f(x3 * 2)  # same shapes: the cached program, nothing lowered
    assert counter.count == 1
    f(x5)
    assert counter.count == 2
    counter.close()
    counter.close()  # idempotent
    f(x7)
    assert counter.count == 2


def test_importing_the_engine_registers_no_listener():
    code = (
        "import jax._src.monitoring as m\n"
        "before = len(m.get_event_duration_listeners())\n"
        "import jaxserve.llm, jaxserve.engine.async_llm, jaxserve.engine.core_proc\n"
        "import jaxserve.runner.model_runner\n"
        "print(len(m.get_event_duration_listeners()) - before)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "0"


def test_the_compile_cache_settings_last_while_an_owner_is_open(monkeypatch, tmp_path):
    from jaxserve.runner.compile_cache import PersistentCompileCache

    monkeypatch.setenv("JAXSERVE_CACHE", str(tmp_path))
    monkeypatch.delenv("JAXSERVE_XLA_CACHE", raising=False)
    # as if no engine of this test process were open (earlier tests may leave one)
    monkeypatch.setattr(PersistentCompileCache, "_num_open", 0)
    before = jax.config.jax_compilation_cache_dir
    a, b = PersistentCompileCache(), PersistentCompileCache()
    assert jax.config.jax_compilation_cache_dir == a.path == str(tmp_path / "xla")
    assert jax.config.jax_persistent_cache_min_compile_time_secs == 0
    a.close()
    a.close()  # idempotent: b still holds them
    assert jax.config.jax_compilation_cache_dir == b.path
    b.close()
    assert jax.config.jax_compilation_cache_dir == before
    monkeypatch.setenv("JAXSERVE_XLA_CACHE", "0")
    off = PersistentCompileCache()
    assert off.path is None and jax.config.jax_compilation_cache_dir == before
    off.close()
