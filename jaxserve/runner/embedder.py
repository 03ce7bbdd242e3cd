"""Embedder: a prompt's pooled final hidden state, computed in bounded slices.

NOTE on the design: the embedding forward never touches the engine's paged KV cache. It runs
the same `forward` over a scratch cache of its own, so an embedding can neither corrupt a
running request's KV nor take blocks from the scheduler. A job's prompt goes through in chunks
of at most `chunk_size` tokens, one call of a jitted program each: chunk k writes its K/V into
the job's scratch cache and attends to chunks 0..k there (causality comes from positions, as
for a chunked prefill in the engine), and adds the sum of its final hidden states to a running
f32 accumulator. So:
- one call costs at most one chunk_size-token forward over max_model_len keys, whatever the
  prompt length: the engine-core loop runs one such slice per turn between its steps
  (engine/embed_queue.py) instead of one forward over the whole prompt;
- the scratch cache is sized to the prompt's bucket (a power of two of KV blocks, 1 ..
  ceil(max_model_len / block_size)), exists only while the job runs (made by its first slice,
  dropped after its last), and the bucket fixes the program: the chunk is
  min(chunk_size, bucket tokens) long, so a short prompt runs one small chunk and there is one
  compiled program per bucket (8 for max_model_len 2048 and blocks of 16), all compiled by
  warmup().

Pooling: mean over the prompt's tokens of the final hidden states (after the final RMSNorm,
i.e. what the LM head reads), then L2-normalized, so cosine similarity is a dot product.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxserve.core.admission import check_embed_len
from jaxserve.model import sharding
from jaxserve.model.attention import AttentionMetadata, KVCache, kv_storage_dtype
from jaxserve.model.layers import AttentionFn
from jaxserve.model.llama import forward
from jaxserve.model.spec import ModelSpec
from jaxserve.runner.buckets import powers_of_two

if TYPE_CHECKING:
    from jaxserve.runner.model_runner import ModelRunner

# Tokens per slice when the caller does not say (engine/embed_queue.py picks by platform).
DEFAULT_CHUNK_SIZE = 64


def _embed_chunk(
    params: object,
    kv_cache: KVCache,  # the job's scratch cache: block 0 its null block, 1..B the prompt
    acc: jax.Array,  # f32[E] sum of the final hidden states of the chunks before this one
    input_ids: jax.Array,  # i32[C] this chunk's tokens, padded with 0
    start: jax.Array,  # i32[] position of input_ids[0] in the prompt
    num_tokens: jax.Array,  # i32[] real tokens in this chunk, 1..C
    *,
    spec: ModelSpec,
    block_size: int,
    attention: AttentionFn,
) -> tuple[KVCache, jax.Array]:
    c = input_ids.shape[0]
    num_blocks = kv_cache.k.shape[1] - 1
    idx = jnp.arange(c, dtype=jnp.int32)
    is_real = idx < num_tokens
    pos = start + idx
    md = AttentionMetadata(
        slot_mapping=jnp.where(is_real, pos + block_size, 0),  # padding writes the null block
        token_req_idx=jnp.zeros(c, jnp.int32),
        block_tables=jnp.arange(1, num_blocks + 1, dtype=jnp.int32)[None, :],
        kv_lens=(start + num_tokens).reshape(1),
        cu_q_lens=jnp.stack([jnp.int32(0), num_tokens]),
    )
    positions = jnp.where(is_real, pos, 0)
    hidden, kv_cache = forward(
        params,
        spec,
        input_ids,
        positions,
        md,
        kv_cache,
        attention=attention,
    )  # [C, E]
    mask = is_real[:, None].astype(jnp.float32)
    return kv_cache, acc + (hidden.astype(jnp.float32) * mask).sum(0)


@dataclasses.dataclass
class EmbedJob:
    """One embedding in progress: its tokens, its bucket, how far it got, its device state."""

    # the prompt (1..max_model_len tokens)
    token_ids: np.ndarray
    # KV blocks of its scratch cache (the bucket; the null block not counted)
    num_blocks: int
    # tokens per slice: min(chunk_size, num_blocks * block_size)
    chunk: int
    # tokens already run through the model (a multiple of `chunk` until the end)
    num_done: int = 0
    # the scratch KV cache and the running sum; None before the first slice and after the last
    kv_cache: KVCache | None = None
    acc: jax.Array | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_slices_left(self) -> int:
        return -(-(self.num_tokens - self.num_done) // self.chunk)


class Embedder:
    """Chunked pooled embeddings over the runner's params (shared, never copied)."""

    def __init__(
        self,
        spec: ModelSpec,
        params: object,
        *,
        dtype: jnp.dtype,
        block_size: int,
        max_model_len: int,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        attention_backend: str = "xla",
        mesh: Mesh | None = None,
        device: jax.Device | None = None,
    ) -> None:
        """`spec`: the execution spec (kv heads as the params hold them under TP); `params`
        placed on `device`, or sharded over `mesh` (tensor parallel); both None: the default
        device."""
        if chunk_size <= 0:
            raise ValueError(f"chunk_size must be positive, got {chunk_size}")
        self.params = params
        self.spec = spec
        self.dtype = dtype
        self.block_size = block_size
        self.max_model_len = max_model_len
        self.chunk_size = chunk_size
        # scratch cache sizes in KV blocks, one compiled program each
        self.block_buckets = powers_of_two(1, -(-max_model_len // block_size))
        if mesh is None and device is None:
            device = jax.devices()[0]
        platform = device.platform if mesh is None else mesh.devices.flat[0].platform
        chunk = functools.partial(
            _embed_chunk,
            spec=spec,
            block_size=block_size,
            attention=sharding.attention_for(attention_backend, mesh, platform),
        )
        if mesh is None:
            self._cache_sharding: Any = jax.sharding.SingleDeviceSharding(device)
            self._acc_sharding: Any = self._cache_sharding
            self._chunk_fn = jax.jit(chunk, donate_argnames=("kv_cache", "acc"))
        else:
            # Pinned shardings, as for the step (runner/step_fn.make_step_fn): the donated
            # scratch cache comes back in its own layout, so every slice of a bucket runs one
            # program.
            self._cache_sharding = sharding.kv_cache_sharding(mesh)
            self._acc_sharding = NamedSharding(mesh, PartitionSpec())
            rep = self._acc_sharding
            self._chunk_fn = jax.jit(
                chunk,
                in_shardings=(
                    sharding.param_shardings(spec, mesh),
                    self._cache_sharding,
                    *([rep] * 4),
                ),
                out_shardings=(self._cache_sharding, rep),
                donate_argnames=("kv_cache", "acc"),
            )
        # The allocation is jitted with its outputs placed where the chunk wants them (committed,
        # same layout), so a job's first slice runs the same program as its others.
        self._zeros_fn = jax.jit(
            self._zeros,
            static_argnames=("num_blocks",),
            out_shardings=(self._cache_sharding, self._acc_sharding),
        )

    @classmethod
    def for_runner(
        cls, runner: ModelRunner, max_model_len: int, chunk_size: int = DEFAULT_CHUNK_SIZE
    ) -> Embedder:
        """An embedder over `runner`'s params, on its device or TP mesh."""
        return cls(
            runner.spec,  # the execution spec: kv heads as the (TP) params hold them
            runner.params,
            dtype=kv_storage_dtype(
                runner.kv_cache_dtype, runner.platform, runner.attention_backend
            ),
            block_size=runner.block_size,
            max_model_len=max_model_len,
            chunk_size=chunk_size,
            attention_backend=runner.attention_backend,
            mesh=runner.mesh,
            device=runner.devices[0],
        )

    def _zeros(self, num_blocks: int) -> tuple[KVCache, jax.Array]:
        s = self.spec
        shape = (s.num_layers, num_blocks + 1, self.block_size, s.num_kv_heads, s.head_dim)
        cache = KVCache(k=jnp.zeros(shape, self.dtype), v=jnp.zeros(shape, self.dtype))
        return cache, jnp.zeros(s.hidden_size, jnp.float32)

    def scratch_bytes(self, num_blocks: int) -> int:
        """Device bytes of a scratch KV cache of `num_blocks` blocks (+ the null block)."""
        s = self.spec
        per_block = 2 * s.num_layers * self.block_size * s.num_kv_heads * s.head_dim
        return per_block * (num_blocks + 1) * jnp.dtype(self.dtype).itemsize

    def start(self, token_ids: list[int]) -> EmbedJob:
        """A job for `token_ids` (nothing runs yet); ValueError on a bad length."""
        n = len(token_ids)
        check_embed_len(n, self.max_model_len, "token_ids")
        blocks = next(b for b in self.block_buckets if b * self.block_size >= n)
        return EmbedJob(
            token_ids=np.asarray(token_ids, dtype=np.int32),
            num_blocks=blocks,
            chunk=min(self.chunk_size, blocks * self.block_size),
        )

    def run_slice(self, job: EmbedJob) -> list[float] | None:
        """Runs the job's next chunk (and waits for it); its embedding after the last one."""
        if job.kv_cache is None:
            job.kv_cache, job.acc = self._zeros_fn(num_blocks=job.num_blocks)
        start = job.num_done
        n = min(job.chunk, job.num_tokens - start)
        input_ids = np.zeros(job.chunk, np.int32)
        input_ids[:n] = job.token_ids[start : start + n]
        job.kv_cache, job.acc = self._chunk_fn(
            self.params, job.kv_cache, job.acc, input_ids, np.int32(start), np.int32(n)
        )
        # Waiting here keeps a slice's cost inside the loop turn that ran it (bounded), rather
        # than queued on the device ahead of the next step.
        acc = np.asarray(job.acc if job.acc.is_fully_addressable else job.acc.addressable_data(0))
        job.num_done = start + n
        if job.num_done < job.num_tokens:
            return None
        job.kv_cache = job.acc = None  # the scratch cache goes now, not when the job is dropped
        pooled = acc / np.float32(job.num_tokens)
        pooled = pooled / max(float(np.linalg.norm(pooled)), 1e-12)
        return pooled.astype(np.float32).tolist()

    def embed(self, token_ids: list[int]) -> list[float]:
        """The unit-norm mean-pooled final hidden state (hidden_size floats) of `token_ids`,
        all slices back to back."""
        job = self.start(token_ids)
        while (out := self.run_slice(job)) is None:
            pass
        return out

    def warmup(self) -> float:
        """Compiles (and runs once) every bucket's chunk and allocation; returns seconds."""
        t0 = time.perf_counter()
        for blocks in self.block_buckets:
            job = self.start([0] * min(blocks * self.block_size, self.max_model_len))
            job.num_done = job.num_tokens - min(job.chunk, job.num_tokens)  # its last chunk only
            self.run_slice(job)
        return time.perf_counter() - t0
