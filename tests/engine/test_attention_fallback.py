"""A Pallas kernel that fails to compile is not an outage under attention_backend=auto.

On CPU "auto" means xla, so the tests make it pick "pallas" (as on a TPU or a GPU) and make
the pallas step fail to compile; "auto" then falls back to xla with one ERROR line naming
why, and an explicit "pallas" raises.
"""

from __future__ import annotations

import logging

import pytest

from jaxserve.config import EngineArgs
from jaxserve.core.admission import EngineCoreRequest
from jaxserve.engine import core as core_module
from jaxserve.engine.core import EngineCore
from jaxserve.runner import model_runner
from jaxserve.sampling_params import SamplingParams

ENGINE = dict(max_model_len=64, max_num_batched_tokens=32, max_num_seqs=4)
WHY = "Mosaic lowering failed: injected for the test"


class _FailingStep:
    """Stands in for the jitted pallas step: compiling it (call or lower) raises."""

    def __call__(self, *args: object, **kwargs: object) -> None:
        raise RuntimeError(f"{WHY}\n  a second line the log line leaves out")

    def lower(self, *args: object, **kwargs: object) -> None:
        self()

    @property
    def forward(self) -> _FailingStep:  # the runner calls the step's programs by name
        return self

    sample = forward


@pytest.fixture
def pallas_fails(monkeypatch):
    def resolve(backend: str, platform: str | None = None, **kwargs: object) -> str:
        return "pallas" if backend == "auto" else backend

    real = model_runner.make_step_fn

    def make_step_fn(spec, attention_backend, mesh, **kwargs):
        if attention_backend == "pallas":
            return _FailingStep()
        return real(spec, attention_backend, mesh, **kwargs)

    monkeypatch.setattr(core_module, "resolve_attention_backend", resolve)
    monkeypatch.setattr(model_runner, "make_step_fn", make_step_fn)


@pytest.mark.parametrize("enable_warmup", [True, False])
def test_auto_falls_back_to_xla_with_one_error_line(
    tiny_model_dir, pallas_fails, caplog, enable_warmup
):
    args = EngineArgs(
        model=str(tiny_model_dir), attention_backend="auto", enable_warmup=enable_warmup, **ENGINE
    )
    with caplog.at_level(logging.WARNING):
        core = EngineCore(args, show_progress=False)
    try:
        assert core.runner.attention_backend == "xla"
        errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
        assert len(errors) == 1, [r.getMessage() for r in errors]
        line = errors[0].getMessage()
        assert "attention_backend=auto" in line and WHY in line and "\n" not in line
        params = SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True)
        core.add_request(
            EngineCoreRequest(
                request_id="r",
                prompt_token_ids=[5, 6, 7],
                sampling_params=params,
                eos_token_id=None,
                sampling_seed=0,
                max_tokens=5,
            )
        )
        tokens = []
        while core.has_unfinished_requests():
            tokens += [t for o in core.step().outputs for t in o.new_token_ids]
        assert len(tokens) == 5
        if enable_warmup:
            assert core.num_compiles_after_warmup == 0
    finally:
        core.close()


def test_explicit_pallas_fails_loudly(tiny_model_dir, pallas_fails):
    args = EngineArgs(
        model=str(tiny_model_dir), attention_backend="pallas", enable_warmup=True, **ENGINE
    )
    with pytest.raises(RuntimeError, match="injected"):
        EngineCore(args, show_progress=False)
