"""EmbedQueue: the engine-core process's embeddings, one bounded slice per loop turn.

NOTE on the design: an embedding used to run as one forward over the whole prompt inside the
loop turn that received it (2048 tokens of smollm2-135m: ~14 s on an idle 2-core CPU, 77 s
measured on a loaded one), so every
stream stalled and the heartbeat that /livez reads stopped. Now the Embed message only queues
a job; each turn of the loop runs at most one slice (runner/embedder.py: one chunk of at most
`chunk_size` tokens) after core.step(), then sends its heartbeat. So a stream waits at most one
step plus one slice for its next token, whatever embeddings are queued.

Why slices between steps and not embeddings through the scheduler's token budget: pooling needs
every prompt token's hidden state, which the step does not return (it samples one row per
request), and a prompt's KV would take blocks from the serving cache; a side path with its own
scratch cache and its own small programs changes neither the step nor the scheduler, and a
failure in it cannot touch a running request's state.

The chunk size, capped by max_num_batched_tokens (so a slice never costs more than the largest
step): 64 tokens on CPU, 512 on accelerators. Measured on smollm2-135m, f32, this 2-core CPU
under load (other jobs running): a 2048-token embedding in 64-token slices took 24 s in all,
each slice at most 1.5 s; in 128-token slices 42 s, slices up to 4.2 s (attention over the
2048-token bucket is most of a late slice). /livez calls a core stuck after 5 s without a
heartbeat, so 128 leaves no margin on a loaded CPU. On an accelerator a slice is a few ms of
weight reads either way; 512 (the default step budget) is a guess not measured here, where
the only device is the CPU.

Order: FIFO, one job at a time, so at most one scratch cache exists (the largest is one
max_model_len request's KV); a queued job holds only its token ids. A job whose API caller went
away still runs to the end (its result is dropped by AsyncLLM); the queue's length is bounded
by what the API admits. DP: replica 0 computes every embedding; multi-host is refused.
"""

from __future__ import annotations

import collections
import logging
import time

from jaxserve.engine import ipc
from jaxserve.engine.core_interface import EngineCoreInterface
from jaxserve.runner.embedder import Embedder, EmbedJob

logger = logging.getLogger(__name__)

# Tokens per slice by platform (see the module NOTE).
CPU_CHUNK_SIZE = 64
ACCELERATOR_CHUNK_SIZE = 512


class EmbedQueue:
    """Embed requests waiting in the core process; run_slice() advances the oldest one."""

    def __init__(self, core: EngineCoreInterface, *, chunk_size: int | None = None) -> None:
        """Compiles the embedder now when the core was warmed up (enable_warmup), so that no
        embedding compiles after warmup; otherwise it is built on the first embedding.
        `chunk_size`: tokens per slice (default: by platform, see the module NOTE)."""
        self._core = core
        if chunk_size is None:
            is_cpu = core.runner.devices[0].platform == "cpu"
            chunk_size = CPU_CHUNK_SIZE if is_cpu else ACCELERATOR_CHUNK_SIZE
        max_batched = core.schedulers[0].scheduler_config.max_num_batched_tokens
        self.chunk_size = min(chunk_size, max_batched)
        self._embedder: Embedder | None = None
        # (req_id, job), oldest first; only the first one has device state
        self._jobs: collections.deque[tuple[str, EmbedJob]] = collections.deque()
        # compiles after warmup are counted (in the runner's counter) once this is set
        self.is_warmed_up = False
        self.warmup_seconds = 0.0
        runner = core.runner
        if runner.is_warmed_up and not runner.multihost:
            start = time.perf_counter()
            self._get_embedder().warmup()
            self.warmup_seconds = time.perf_counter() - start
            self.is_warmed_up = True

    @property
    def has_work(self) -> bool:
        return bool(self._jobs)

    @property
    def num_queued(self) -> int:
        return len(self._jobs)

    def _get_embedder(self) -> Embedder:
        if self._embedder is None:
            runner = self._core.runner  # replica 0's under DP
            if runner.multihost:
                # its jit would run on process 0 alone over a mesh the followers share
                raise ValueError("embeddings are not supported on a multi-host deployment yet")
            self._embedder = Embedder.for_runner(runner, self._core.max_model_len, self.chunk_size)
        return self._embedder

    def add(self, req_id: str, token_ids: list[int]) -> None:
        """Queues one embedding; ValueError (nothing queued) for a bad length or multi-host."""
        self._jobs.append((req_id, self._get_embedder().start(token_ids)))

    def run_slice(self) -> ipc.EmbedResult | ipc.Error | None:
        """One slice of the oldest job: its result when that was its last slice, an Error
        naming it if it failed (the job is dropped, nothing else is affected), else None."""
        if not self._jobs:
            return None
        req_id, job = self._jobs[0]
        assert self._embedder is not None  # add() built it
        compiles = self._core.runner.compiles
        before = compiles.count
        try:
            embedding = self._embedder.run_slice(job)
        except Exception as e:  # noqa: BLE001 - the scratch cache is the job's own
            self._jobs.popleft()
            logger.exception("embedding %s failed", req_id)
            message = f"embedding failed: {type(e).__name__}: {e}"
            return ipc.Error(message=message, request_id=req_id)
        finally:
            compiled = compiles.count - before
            if self.is_warmed_up and compiled:
                runner = self._core.runner
                runner.num_compiles_after_warmup += compiled
                logger.warning("embedding slice compiled after warmup (%d blocks)", job.num_blocks)
        if embedding is None:
            return None
        self._jobs.popleft()
        return ipc.EmbedResult(req_id=req_id, embedding=embedding)
