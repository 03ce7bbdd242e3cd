"""ModelRunner: owns the params and the paged KV cache on device, and the one jitted step.

execute(SchedulerOutput) stages the flat ragged batch on the host (numpy), runs the step
(forward -> logits of sampling rows -> on-device sampler) with the KV cache donated, and
returns only sampled ids and requested logprobs to the host.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from jaxserve.config import CacheConfig, SchedulerConfig
from jaxserve.core.outputs import ModelRunnerOutput, SchedulerOutput, TokenLogprobs
from jaxserve.model.attention import KVCache
from jaxserve.model.llama import compute_logits, forward
from jaxserve.model.spec import ModelSpec
from jaxserve.runner.sampler import SamplerOutput, sample
from jaxserve.runner.step_inputs import Buckets, StepInputs, build_step_inputs, dummy_step_inputs

logger = logging.getLogger(__name__)

# On CPU, with no kv_cache_memory given, the cache holds max_num_seqs full-length requests
# but never more than this many bytes.
_DEFAULT_CPU_KV_CACHE_BYTES = 1 << 30

# Counts XLA lowerings in this process (each is a program compiled or fetched from the
# persistent cache); the runner reads it around execute() to count compiles after warmup.
_lowerings = 0
_lowerings_lock = threading.Lock()


def _on_duration_event(event: str, duration: float, **kwargs: object) -> None:
    global _lowerings
    if event == "/jax/core/compile/jaxpr_to_mlir_module_duration":
        with _lowerings_lock:
            _lowerings += 1


jax.monitoring.register_event_duration_secs_listener(_on_duration_event)


def _step(
    params: object,
    kv_cache: KVCache,
    inputs: StepInputs,
    *,
    spec: ModelSpec,
    attention_backend: str,
) -> tuple[KVCache, SamplerOutput]:
    hidden, kv_cache = forward(
        params,
        spec,
        inputs.input_ids,
        inputs.positions,
        inputs.attn,
        kv_cache,
        attention_backend=attention_backend,
    )
    # Logits only for each request's last token: [R, V] instead of [T, V].
    logits = compute_logits(params, spec, hidden[inputs.logits_indices])
    return kv_cache, sample(logits.astype(jnp.float32), inputs.sampling)


def kv_block_bytes(spec: ModelSpec, block_size: int, dtype: jnp.dtype) -> int:
    """Bytes of one KV block over all layers (K and V)."""
    itemsize = jnp.dtype(dtype).itemsize
    return 2 * spec.num_layers * block_size * spec.num_kv_heads * spec.head_dim * itemsize


def determine_num_blocks(
    spec: ModelSpec,
    cache_config: CacheConfig,
    scheduler_config: SchedulerConfig,
    dtype: jnp.dtype,
    params_bytes: int,
) -> int:
    """How many KV blocks to allocate (block 0, the null block, included)."""
    if cache_config.num_gpu_blocks_override is not None:
        return cache_config.num_gpu_blocks_override
    per_block = kv_block_bytes(spec, cache_config.block_size, dtype)
    if cache_config.kv_cache_memory is not None:
        budget = cache_config.kv_cache_memory
    elif jax.default_backend() != "cpu":
        stats = jax.devices()[0].memory_stats() or {}
        limit = stats.get("bytes_limit", 0)
        # The weights are already resident (bytes_in_use); keep 10% of the rest for activations.
        in_use = stats.get("bytes_in_use", params_bytes)
        budget = int((limit * cache_config.gpu_memory_utilization - in_use) * 0.9)
    else:
        blocks_per_seq = -(-scheduler_config.max_model_len // cache_config.block_size)
        wanted = scheduler_config.max_num_seqs * blocks_per_seq + 1
        budget = min(wanted * per_block, _DEFAULT_CPU_KV_CACHE_BYTES)
    num_blocks = budget // per_block
    min_blocks = -(-scheduler_config.max_model_len // cache_config.block_size) + 1
    if num_blocks < min_blocks:
        raise ValueError(
            f"the KV cache budget ({budget} bytes, {num_blocks} blocks of {per_block} bytes) "
            f"cannot hold one max_model_len={scheduler_config.max_model_len} request "
            f"({min_blocks} blocks); raise kv_cache_memory / gpu_memory_utilization or lower "
            "max_model_len"
        )
    return int(num_blocks)


class ModelRunner:
    def __init__(
        self,
        spec: ModelSpec,
        params: object,
        *,
        dtype: jnp.dtype,
        num_blocks: int,
        cache_config: CacheConfig,
        scheduler_config: SchedulerConfig,
        attention_backend: str = "xla",
        devices: Sequence[jax.Device] | None = None,
    ) -> None:
        self.spec = spec
        self.dtype = dtype
        self.block_size = cache_config.block_size
        self.num_blocks = num_blocks
        self.attention_backend = attention_backend
        # Penalties see the whole token history, so their width is max_model_len (static).
        self.penalty_len = scheduler_config.max_model_len
        self.buckets = Buckets.make(
            scheduler_config.max_num_batched_tokens,
            scheduler_config.max_num_seqs,
            scheduler_config.max_model_len,
            cache_config.block_size,
        )
        # Commit params and cache to the device: jit keys its cache on committed-ness, and the
        # step returns a committed cache, so an uncommitted first cache would compile twice.
        device = devices[0] if devices else jax.devices()[0]
        self.params = jax.device_put(params, device)
        shape = (num_blocks, self.block_size, spec.num_kv_heads, spec.head_dim)
        shape = (spec.num_layers, *shape)
        kv_cache = KVCache(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype))
        self.kv_cache = jax.device_put(kv_cache, device)
        self._step_fn = jax.jit(
            functools.partial(_step, spec=spec, attention_backend=attention_backend),
            donate_argnames=("kv_cache",),
        )
        self.is_warmed_up = False
        # XLA lowerings seen during execute() after warmup; must stay 0
        self.num_compiles_after_warmup = 0
        self.num_steps = 0

    @property
    def kv_cache_bytes(self) -> int:
        return self.kv_cache.k.nbytes + self.kv_cache.v.nbytes

    def warmup(self, *, show_progress: bool = True) -> float:
        """Compiles every declared bucket once; returns the seconds it took."""
        start = time.perf_counter()
        shapes = self.buckets.all_shapes()
        for shape in tqdm(shapes, desc="Compiling step buckets", disable=not show_progress):
            inputs = dummy_step_inputs(shape, self.penalty_len)
            self.kv_cache, out = self._step_fn(self.params, self.kv_cache, inputs)
        jax.block_until_ready(out.token_ids)
        self.is_warmed_up = True
        elapsed = time.perf_counter() - start
        logger.info("compiled %d step buckets in %.1f s", len(shapes), elapsed)
        return elapsed

    def execute(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        if scheduler_output.is_empty:
            return ModelRunnerOutput(sampled_token_ids={})
        inputs = build_step_inputs(
            scheduler_output, self.buckets, self.block_size, self.penalty_len
        )
        before = _lowerings
        self.kv_cache, out = self._step_fn(self.params, self.kv_cache, inputs)
        token_ids = np.asarray(out.token_ids)
        if self.is_warmed_up and _lowerings != before:
            self.num_compiles_after_warmup += _lowerings - before
            logger.warning(
                "step compiled after warmup (T, R, B = %d, %d, %d)",
                inputs.num_tokens,
                inputs.num_reqs,
                inputs.num_blocks_per_req,
            )
        self.num_steps += 1
        sampled: dict[str, int] = {}
        logprobs: dict[str, TokenLogprobs] = {}
        want_logprobs = [
            i
            for i, sr in enumerate(scheduler_output.scheduled)
            if sr.is_sampling and sr.request.sampling_params.logprobs is not None
        ]
        if want_logprobs:
            lp, ranks = np.asarray(out.logprobs), np.asarray(out.ranks)
            top_ids, top_lps = np.asarray(out.top_token_ids), np.asarray(out.top_logprobs)
        for i, sr in enumerate(scheduler_output.scheduled):
            if not sr.is_sampling:
                continue
            req_id = sr.request.request_id
            sampled[req_id] = int(token_ids[i])
        for i in want_logprobs:
            sr = scheduler_output.scheduled[i]
            n = sr.request.sampling_params.logprobs or 0
            logprobs[sr.request.request_id] = TokenLogprobs(
                token_id=int(token_ids[i]),
                logprob=float(lp[i]),
                rank=int(ranks[i]),
                top=[
                    (int(t), float(v)) for t, v in zip(top_ids[i, :n], top_lps[i, :n], strict=True)
                ],
            )
        return ModelRunnerOutput(sampled_token_ids=sampled, logprobs=logprobs)

    def close(self) -> None:
        """Frees every device buffer the runner holds (params and KV cache)."""
        for leaf in jax.tree.leaves((self.params, self.kv_cache)):
            if isinstance(leaf, jax.Array) and not leaf.is_deleted():
                leaf.delete()
        self.params = None
        self.kv_cache = None  # type: ignore[assignment]
        self._step_fn = None  # type: ignore[assignment]
