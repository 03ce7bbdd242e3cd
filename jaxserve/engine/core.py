"""EngineCore: the busy loop's body. No HTTP, no tokenizer: token ids in, token ids out.

step() is three calls joined by two dataclasses:
scheduler.schedule() -> SchedulerOutput -> runner.execute() -> ModelRunnerOutput
-> scheduler.update_from_output() -> EngineCoreOutputs.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Iterable, Sequence

import jax

from jaxserve.config import EngineArgs
from jaxserve.core.admission import EngineCoreRequest, RequestLimits, validate_core_request
from jaxserve.core.outputs import EngineCoreOutputs, SchedulerStats
from jaxserve.core.scheduler import Scheduler
from jaxserve.model import sharding
from jaxserve.model.loader import LoadedModel, load_model, load_tokenizer, resolve_dtype
from jaxserve.model.spec import ModelSpec
from jaxserve.request import Request, RequestStatus
from jaxserve.runner import step_broadcast
from jaxserve.runner.compile_cache import PersistentCompileCache
from jaxserve.runner.model_runner import ModelRunner, determine_num_blocks
from jaxserve.structured_output.token_mask import TokenMasks

logger = logging.getLogger(__name__)

# Without --max-model-len, contexts are capped here so the default KV cache stays small.
_DEFAULT_MAX_MODEL_LEN = 2048


def resolve_attention_backend(
    backend: str,
    platform: str | None = None,
    *,
    spec: ModelSpec | None = None,
    dtype: object = None,  # the KV cache dtype (a jnp dtype or its name)
    block_size: int | None = None,
) -> str:
    """auto: the Pallas kernels on TPU and CUDA, the jnp attention elsewhere (CPU).

    `platform` defaults to jax's default backend; on CPU "pallas" still works, interpreted.
    Given the model `spec`, cache `dtype` and `block_size`, a configuration the platform's
    kernel cannot take (say head_dim 96 on CUDA) makes "auto" fall back to "xla" with a
    warning naming why, and makes an explicit "pallas" raise ValueError here, at engine start,
    instead of inside the first step.
    """
    platform = platform or jax.default_backend()
    chosen = backend
    if backend == "auto":
        chosen = "pallas" if platform in ("tpu", "gpu", "cuda") else "xla"
    if chosen != "pallas" or spec is None or dtype is None or block_size is None:
        return chosen
    # Imported here: pallas_kernels pulls in Pallas/Mosaic, which the xla path never needs.
    from pallas_kernels.ragged_paged_attention.api import config_error, kernel_platform

    kernel = kernel_platform(platform)
    reason = config_error(
        kernel, spec.num_q_heads, spec.num_kv_heads, spec.head_dim, block_size, dtype
    )
    if reason is None:
        return chosen
    if backend == "auto":
        logger.warning(
            "attention_backend=auto: using xla, the %s Pallas kernel cannot serve this model: %s",
            kernel,
            reason,
        )
        return "xla"
    raise ValueError(
        f"attention_backend='pallas': the {kernel} Pallas kernel cannot serve this model: {reason}"
    )


class EngineCore:
    def __init__(
        self,
        args: EngineArgs,
        *,
        loaded: LoadedModel | None = None,
        show_progress: bool = True,
        devices: Sequence[jax.Device] | None = None,
        num_reserved_seqs: int = 0,
    ) -> None:
        """`devices`: the devices this engine replica owns (default jax.devices()[:TP]).

        num_reserved_seqs: seats only urgent requests (health probes) may take.
        """
        start = time.perf_counter()
        # the jax.config settings of the persistent compile cache, until close()
        self.compile_cache = PersistentCompileCache()
        model_config = args.model_config()
        tp = args.parallel_config().tensor_parallel_size
        self.dtype = resolve_dtype(model_config.dtype)
        mesh = sharding.make_mesh(tp, devices) if tp > 1 else None
        if loaded is None:
            loaded = load_model(model_config.model, self.dtype, mesh=mesh)
        self.model = loaded
        spec = self.model.spec
        if tp > 1:
            sharding.check_tp_size(spec, tp)
        if model_config.max_model_len is None:
            max_model_len = min(spec.max_position_embeddings, _DEFAULT_MAX_MODEL_LEN)
        else:
            max_model_len = model_config.max_model_len
            if max_model_len > spec.max_position_embeddings:
                raise ValueError(
                    f"max_model_len={max_model_len} is larger than the model's "
                    f"max_position_embeddings={spec.max_position_embeddings}"
                )
        self.max_model_len = max_model_len
        cache_config = args.cache_config()
        scheduler_config = dataclasses.replace(
            args.scheduler_config(max_model_len), num_reserved_seqs=num_reserved_seqs
        )
        params_bytes = sum(x.nbytes for x in jax.tree.leaves(self.model.params))
        num_blocks = determine_num_blocks(
            sharding.tp_spec(spec, tp),
            cache_config,
            scheduler_config,
            self.dtype,
            params_bytes,
            devices=list(mesh.devices.flat) if mesh is not None else devices,
        )
        if mesh is not None and step_broadcast.spans_processes(list(mesh.devices.flat)):
            # every process must allocate the same cache: process 0's count wins
            num_blocks = step_broadcast.broadcast_int(num_blocks)
        self.runner = ModelRunner(
            spec,
            self.model.params,
            dtype=self.dtype,
            num_blocks=num_blocks,
            cache_config=cache_config,
            scheduler_config=scheduler_config,
            attention_backend=resolve_attention_backend(
                model_config.attention_backend,
                devices[0].platform if devices else None,
                # the shapes each device's kernel sees (kv heads repeated when TP > kv heads)
                spec=sharding.tp_spec(spec, tp),
                dtype=self.dtype,
                block_size=cache_config.block_size,
            ),
            tensor_parallel_size=tp,
            devices=devices,
        )
        # The runner placed its own copy (on its devices, sharded); keeping the loaded one
        # would hold the weights twice (vllm#21073-like "memory never comes back").
        self.model = dataclasses.replace(self.model, params=None)
        self.scheduler = Scheduler(scheduler_config, cache_config, num_blocks)
        # structured output, allowed_token_ids and bad_words, as the step's token bitmask
        tokenizer = load_tokenizer(args.tokenizer) if args.tokenizer else self.model.tokenizer
        self.token_masks = TokenMasks(tokenizer, spec.vocab_size, spec.eos_token_id)
        # what every request is checked against (core/admission.py)
        self.limits = RequestLimits(
            vocab_size=spec.vocab_size,
            max_model_len=max_model_len,
            block_size=cache_config.block_size,
            num_usable_blocks=self.scheduler.kv_cache_manager.num_usable_blocks,
        )
        self.warmup_seconds = self._warmup(
            model_config.attention_backend, args.enable_warmup, show_progress
        )
        self.startup_seconds = time.perf_counter() - start
        self.last_stats = SchedulerStats()
        # highest KV cache usage seen after any step (for benchmarks and notebooks)
        self.peak_kv_cache_usage = 0.0
        self.num_steps = 0
        self.step_seconds_total = 0.0
        logger.info(
            "engine ready in %.1f s: %d KV blocks of %d tokens, max_model_len=%d",
            self.startup_seconds,
            num_blocks,
            cache_config.block_size,
            max_model_len,
        )

    def _warmup(self, requested_backend: str, enable_warmup: bool, show_progress: bool) -> float:
        """Compiles the step buckets; returns the seconds it took (0 without warmup).

        NOTE: a Pallas kernel that "auto" picked but that fails to compile here (a Mosaic
        version this kernel does not suit, say) is not an outage: the engine falls back to
        the xla attention with one ERROR line naming why. An explicit "pallas" raises. Without
        warmup, "auto" still compiles the smallest bucket to find out.
        """
        runner = self.runner
        is_auto_pallas = requested_backend == "auto" and runner.attention_backend == "pallas"
        try:
            if enable_warmup:
                return runner.warmup(show_progress=show_progress)
            if is_auto_pallas:
                runner.compile_smallest_bucket()
            return 0.0
        except Exception as e:
            if not is_auto_pallas:
                runner.close()  # the engine never comes to be: free its device buffers now
                raise
            why = (str(e).strip().splitlines() or [""])[0][:300]
            logger.error(
                "attention_backend=auto: the Pallas kernel failed to compile, using xla: %s: %s",
                type(e).__name__,
                why,
            )
            runner.use_attention_backend("xla")
            return runner.warmup(show_progress=show_progress) if enable_warmup else 0.0

    @property
    def spec(self) -> ModelSpec:
        return self.model.spec

    @property
    def replicas(self) -> list[EngineCore]:
        """[self]; DPEngineCore has the same interface (engine/core_interface.py) with several."""
        return [self]

    @property
    def num_replicas(self) -> int:
        return 1

    @property
    def schedulers(self) -> list[Scheduler]:
        return [self.scheduler]

    def add_request(
        self, request: EngineCoreRequest, *, urgent: bool = False, replica: int | None = None
    ) -> None:
        """urgent=True: ahead of the waiting queue, may take a reserved seat (health probes).

        replica: ignored here (one replica); DPEngineCore uses it to pin a request.
        A bad request raises ValueError naming the field, before anything is taken.
        """
        self.admit(self.to_request(request, is_probe=urgent), urgent=urgent)

    def to_request(self, message: EngineCoreRequest, *, is_probe: bool = False) -> Request:
        """The one place a request message is checked and decoded into the core's state."""
        validate_core_request(message, self.limits, is_probe=is_probe)
        return Request.from_core_request(message)

    def admit(self, request: Request, *, urgent: bool = False) -> None:
        """Queues a checked request. A request whose part of a step could not be staged (a
        value its arrays cannot hold) raises ValueError naming the field, before it is queued."""
        self.runner.check_request(request)
        self.token_masks.add(request)  # a grammar that cannot compile fails here
        try:
            self.scheduler.add_request(request, urgent=urgent)
        except BaseException:
            self.token_masks.remove(request.request_id)
            raise

    def abort_requests(self, request_ids: Iterable[str]) -> None:
        request_ids = list(request_ids)
        self.scheduler.abort_requests(request_ids)
        for rid in request_ids:
            self.token_masks.remove(rid)

    def finish_requests(self, request_ids: Iterable[str], stop_reason: str) -> None:
        """Ends requests whose stop string the detokenizer found (finish_reason "stop")."""
        request_ids = list(request_ids)
        self.scheduler.finish_requests(
            request_ids, RequestStatus.FINISHED_STOPPED, stop_reason=stop_reason
        )
        for rid in request_ids:
            self.token_masks.remove(rid)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests()

    def step(self) -> EngineCoreOutputs:
        """One schedule -> execute -> update_from_output.

        NOTE on failures: what goes wrong for one request on the host (its scheduling, its
        staging, reading its token back) fails that request alone: it ends with an error
        output (EngineCoreOutput.error) and its blocks are freed, and the step goes on without
        it. Only an exception out of the device call itself leaves this method; the caller
        treats it as fatal (the KV cache was donated to the failed call).
        """
        if not self.scheduler.has_unfinished_requests():
            return EngineCoreOutputs()
        start = time.perf_counter()
        scheduler_output = self.scheduler.schedule()
        # Usage peaks while the step runs (finished requests free their blocks after it).
        usage = self.scheduler.kv_cache_manager.usage
        self.peak_kv_cache_usage = max(self.peak_kv_cache_usage, usage)
        masks = self.token_masks
        runner_output = self.runner.execute(
            scheduler_output, fill_mask=masks.fill if masks.num_requests else None
        )
        outputs = self.scheduler.update_from_output(scheduler_output, runner_output)
        if masks.num_requests:
            for o in outputs.outputs:
                masks.accept(o.request_id, o.new_token_ids)
                if o.finished:
                    masks.remove(o.request_id)
        self.num_steps += 1
        self.step_seconds_total += time.perf_counter() - start
        if outputs.scheduler_stats is not None:
            self.last_stats = self._add_engine_stats(outputs.scheduler_stats)
        return outputs

    def _add_engine_stats(self, stats: SchedulerStats) -> SchedulerStats:
        stats.num_steps = self.num_steps
        stats.step_seconds_total = self.step_seconds_total
        stats.num_compiles_after_warmup = self.runner.num_compiles_after_warmup
        return stats

    def make_stats(self) -> SchedulerStats:
        """Current scheduler stats plus the engine's step and compile counters."""
        return self._add_engine_stats(self.scheduler.make_stats())

    @property
    def num_compiles_after_warmup(self) -> int:
        return self.runner.num_compiles_after_warmup

    def close(self) -> None:
        """Frees the device buffers (weights and KV cache); the engine is unusable after."""
        self.runner.close()
        self.compile_cache.close()
        self.model = None  # type: ignore[assignment]
