"""EmbedQueue: FIFO embeddings a bounded slice at a time, compiled at warmup, failures isolated."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from jaxserve.config import CacheConfig, SchedulerConfig
from jaxserve.engine import ipc
from jaxserve.engine.embed_queue import EmbedQueue
from jaxserve.model.loader import load_model, resolve_dtype
from jaxserve.runner.model_runner import ModelRunner


def make_core(model_dir, *, warmed_up: bool) -> SimpleNamespace:
    """What EmbedQueue reads of an EngineCore: a real runner (whose step is never compiled
    here: `warmed_up` stands for its warmup), max_model_len and the scheduler config."""
    dtype = resolve_dtype("float32")
    loaded = load_model(str(model_dir), dtype)
    sched = SchedulerConfig(max_num_batched_tokens=32, max_num_seqs=4, max_model_len=128)
    runner = ModelRunner(
        loaded.spec,
        loaded.params,
        dtype=dtype,
        num_blocks=16,
        cache_config=CacheConfig(),
        scheduler_config=sched,
    )
    runner.is_warmed_up = warmed_up
    scheduler = SimpleNamespace(scheduler_config=sched)
    return SimpleNamespace(runner=runner, max_model_len=128, schedulers=[scheduler])


@pytest.fixture(scope="module")
def core(tiny_model_dir):
    return make_core(tiny_model_dir, warmed_up=True)


@pytest.fixture(scope="module")
def queue(core):
    return EmbedQueue(core)  # the core was warmed up: this compiles the embedder


def drain(queue):
    """Runs slices until the queue is empty; the replies in order, with the slice count."""
    replies, slices = [], 0
    while queue.has_work:
        slices += 1
        if (r := queue.run_slice()) is not None:
            replies.append(r)
    return replies, slices


def test_fifo_in_bounded_slices_without_compiling(core, queue):
    assert queue.is_warmed_up and queue.warmup_seconds > 0
    assert queue.chunk_size == 32  # capped by max_num_batched_tokens
    long, short = list(range(10, 138)), [5, 6, 7]
    queue.add("a", long)
    queue.add("b", short)
    assert queue.num_queued == 2
    replies, slices = drain(queue)
    assert slices == 4 + 1  # 128 tokens in chunks of 32, then one chunk of 16
    assert [r.req_id for r in replies] == ["a", "b"]
    assert all(isinstance(r, ipc.EmbedResult) for r in replies)
    direct = queue._get_embedder()
    np.testing.assert_allclose(replies[0].embedding, direct.embed(long), atol=1e-7)
    np.testing.assert_allclose(replies[1].embedding, direct.embed(short), atol=1e-7)
    assert core.runner.num_compiles_after_warmup == 0
    assert queue.run_slice() is None and not queue.has_work


def test_bad_length_queues_nothing(queue):
    with pytest.raises(ValueError, match="max_model_len=128"):
        queue.add("x", list(range(129)))
    with pytest.raises(ValueError, match="token_ids"):
        queue.add("x", [])
    assert not queue.has_work


def test_a_failing_slice_fails_its_job_alone(queue, monkeypatch):
    embedder = queue._get_embedder()
    real = embedder.run_slice

    def flaky(job):
        if job.num_tokens == 40 and job.num_done == 32:
            raise RuntimeError("device said no")
        return real(job)

    monkeypatch.setattr(embedder, "run_slice", flaky)
    queue.add("bad", list(range(40)))
    queue.add("good", list(range(20)))
    replies, _ = drain(queue)
    assert isinstance(replies[0], ipc.Error) and replies[0].request_id == "bad"
    assert "device said no" in replies[0].message
    assert isinstance(replies[1], ipc.EmbedResult) and replies[1].req_id == "good"


def test_a_compile_after_warmup_is_counted(core, queue):
    queue._get_embedder()._chunk_fn.clear_cache()  # as if warmup had missed this program
    queue.add("c", [1, 2, 3])
    drain(queue)
    assert core.runner.num_compiles_after_warmup >= 1
    core.runner.num_compiles_after_warmup = 0  # the module's other tests read it


def test_without_warmup_it_compiles_lazily(tiny_model_dir):
    queue = EmbedQueue(make_core(tiny_model_dir, warmed_up=False))
    assert not queue.is_warmed_up and queue._embedder is None
    queue.add("e", [1, 2, 3])
    replies, _ = drain(queue)
    assert isinstance(replies[0], ipc.EmbedResult) and len(replies[0].embedding) == 64
