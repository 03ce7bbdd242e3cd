"""EngineCore: the busy loop's body. No HTTP, no tokenizer: token ids in, token ids out.

It assembles the scheduler, the runner, the token masks and the LoRA manager, checks and
admits requests, and steps them through its StepLoop (engine/step_loop.py: schedule -> launch
-> collect -> update, synchronous or with async scheduling).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Iterable, Sequence

import jax

from jaxserve.config import EngineArgs, LoRAConfig
from jaxserve.core.admission import EngineCoreRequest, RequestLimits, validate_core_request
from jaxserve.core.outputs import (
    EngineCoreOutputs,
    SchedulerStats,
)
from jaxserve.core.scheduler import Scheduler
from jaxserve.engine.attention_policy import resolve_attention_backend
from jaxserve.engine.step_loop import StepLoop
from jaxserve.lora.manager import LoRAManager
from jaxserve.lora.request import LoRARequest
from jaxserve.model import sharding
from jaxserve.model.loader import (
    LoadedModel,
    load_model,
    load_tokenizer,
    resolve_dtype,
    resolve_kv_cache_dtype,
)
from jaxserve.model.spec import ModelSpec
from jaxserve.request import Request, RequestStatus
from jaxserve.runner import step_broadcast
from jaxserve.runner.compile_cache import PersistentCompileCache
from jaxserve.runner.kv_sizing import determine_num_blocks
from jaxserve.runner.model_runner import ModelRunner
from jaxserve.structured_output.token_mask import TokenMasks

logger = logging.getLogger(__name__)

# Without --max-model-len, contexts are capped here so the default KV cache stays small.
_DEFAULT_MAX_MODEL_LEN = 2048


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
            loaded = load_model(
                model_config.model, self.dtype, mesh=mesh, load_format=model_config.load_format
            )
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
        # the cache's dtype (the weights' is self.dtype)
        self.kv_cache_dtype = resolve_kv_cache_dtype(cache_config.kv_cache_dtype, self.dtype)
        lora_config = args.lora_config()
        scheduler_config = dataclasses.replace(
            args.scheduler_config(max_model_len), num_reserved_seqs=num_reserved_seqs
        )
        params_bytes = sum(x.nbytes for x in jax.tree.leaves(self.model.params))
        num_blocks = determine_num_blocks(
            sharding.tp_spec(spec, tp),
            cache_config,
            scheduler_config,
            self.kv_cache_dtype,
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
            kv_cache_dtype=self.kv_cache_dtype,
            num_blocks=num_blocks,
            cache_config=cache_config,
            scheduler_config=scheduler_config,
            attention_backend=resolve_attention_backend(
                model_config.attention_backend,
                devices[0].platform if devices else None,
                # the shapes each device's kernel sees (kv heads repeated when TP > kv heads)
                spec=sharding.tp_spec(spec, tp),
                dtype=self.kv_cache_dtype,
                block_size=cache_config.block_size,
            ),
            tensor_parallel_size=tp,
            devices=devices,
            lora_config=lora_config,
        )
        # The runner placed its own copy (on its devices, sharded); keeping the loaded one
        # would hold the weights twice (vllm#21073-like "memory never comes back").
        self.model = dataclasses.replace(self.model, params=None)
        self.scheduler = Scheduler(
            scheduler_config,
            cache_config,
            num_blocks,
            max_loras=lora_config.max_loras if lora_config.enable_lora else None,
        )
        # the adapters (None: LoRA off): host copies and device slots
        self.lora: LoRAManager | None = None
        if lora_config.enable_lora:
            self.lora = _make_lora_manager(spec, lora_config, self.runner)
        # structured output, allowed_token_ids and bad_words, as the step's token bitmask
        tokenizer = load_tokenizer(args.tokenizer) if args.tokenizer else self.model.tokenizer
        self.token_masks = TokenMasks(tokenizer, spec.vocab_size, spec.eos_token_id)
        # what every request is checked against (core/admission.py)
        self.limits = RequestLimits(
            vocab_size=spec.vocab_size,
            max_model_len=max_model_len,
            block_size=cache_config.block_size,
            num_usable_blocks=self.scheduler.kv_cache_manager.num_usable_blocks,
            enable_lora=self.lora is not None,
        )
        self.warmup_seconds = self._warmup(
            model_config.attention_backend, args.enable_warmup, show_progress
        )
        self.startup_seconds = time.perf_counter() - start
        self.last_stats = SchedulerStats()
        self.step_seconds_total = 0.0
        # the steps; async scheduling schedules step k+1 before collecting step k (multi-host
        # steps stay synchronous: the followers' previous outputs are not the leader's)
        self.steps = StepLoop(
            self.scheduler,
            self.runner,
            self.token_masks,
            self.lora,
            async_scheduling=args.async_scheduling and not self.runner.multihost,
        )
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
        if request.lora_request is not None:
            assert self.lora is not None  # validate_core_request refused it otherwise
            # read now (a bad adapter fails this request alone); pinned while it runs
            self.lora.add(request.lora_request, pinned=self.scheduler.lora_use.refs)
        self.token_masks.add(request)  # a grammar that cannot compile fails here
        try:
            self.scheduler.add_request(request, urgent=urgent)
        except BaseException:
            self.token_masks.remove(request.request_id)
            raise
        if request.lora_request is not None and self.lora is not None:
            self.lora.stats.requests[request.lora_request.lora_name] += 1

    def add_lora(self, lora_request: LoRARequest) -> None:
        """Reads and checks an adapter into host memory (ValueError naming what is wrong)."""
        if self.lora is None:
            raise ValueError("this engine serves no LoRA adapters (start it with enable_lora)")
        self.lora.add(lora_request, pinned=self.scheduler.lora_use.refs)

    def remove_lora(self, lora_int_id: int) -> None:
        """New requests on the adapter are refused; it is freed when its last one ends."""
        if self.lora is None:
            raise ValueError("this engine serves no LoRA adapters (start it with enable_lora)")
        self.lora.remove(lora_int_id)
        self.lora.collect(self.scheduler.lora_use.refs)

    def list_loras(self) -> list[LoRARequest]:
        return [] if self.lora is None else self.lora.list_loras()

    def abort_requests(self, request_ids: Iterable[str]) -> None:
        request_ids = list(request_ids)
        self.scheduler.abort_requests(request_ids)
        for rid in request_ids:
            self.token_masks.remove(rid)
        if self.lora is not None:
            self.lora.collect(self.scheduler.lora_use.refs)

    def finish_requests(self, request_ids: Iterable[str], stop_reason: str) -> None:
        """Ends requests whose stop string the detokenizer found (finish_reason "stop")."""
        request_ids = list(request_ids)
        self.scheduler.finish_requests(
            request_ids, RequestStatus.FINISHED_STOPPED, stop_reason=stop_reason
        )
        for rid in request_ids:
            self.token_masks.remove(rid)

    def has_unfinished_requests(self) -> bool:
        return self.steps.has_work

    @property
    def num_steps(self) -> int:
        """Steps launched on the device (a schedule with nothing to run is not one)."""
        return self.steps.num_steps

    @property
    def peak_kv_cache_usage(self) -> float:
        """Highest KV cache usage while a step ran (for benchmarks and notebooks)."""
        return self.steps.peak_kv_cache_usage

    def step(self) -> EngineCoreOutputs:
        """One schedule -> launch -> collect -> update_from_output; with async scheduling,
        the outputs are those of the step launched by the previous call (engine/step_loop.py).

        NOTE on failures: what goes wrong for one request on the host (its scheduling, its
        staging, reading its token back) fails that request alone: it ends with an error
        output (EngineCoreOutput.error) and its blocks are freed, and the step goes on without
        it. Only an exception out of the device call itself leaves this method; the caller
        treats it as fatal (the KV cache was donated to the failed call).
        """
        if not self.has_unfinished_requests():
            return EngineCoreOutputs()
        start = time.perf_counter()
        outputs = self.steps.step()
        self.step_seconds_total += time.perf_counter() - start
        if outputs.scheduler_stats is not None:
            self.last_stats = self._add_engine_stats(outputs.scheduler_stats)
        return outputs

    def _add_engine_stats(self, stats: SchedulerStats) -> SchedulerStats:
        stats.num_steps = self.num_steps
        stats.step_seconds_total = self.step_seconds_total
        stats.num_compiles_after_warmup = self.runner.num_compiles_after_warmup
        if self.lora is not None:
            ls = self.lora.stats
            stats.lora_loads = ls.num_loads
            stats.lora_cpu_evictions = ls.num_cpu_evictions
            stats.lora_slot_evictions = ls.num_slot_evictions
            stats.lora_requests = dict(ls.requests)
            stats.lora_generated_tokens = dict(ls.generated_tokens)
        return stats

    def make_stats(self) -> SchedulerStats:
        """Current scheduler stats plus the engine's step and compile counters."""
        return self._add_engine_stats(self.scheduler.make_stats())

    @property
    def num_compiles_after_warmup(self) -> int:
        return self.runner.num_compiles_after_warmup

    def close(self) -> None:
        """Frees the device buffers (weights and KV cache); the engine is unusable after."""
        self.steps.close()
        self.runner.close()
        self.compile_cache.close()
        self.model = None  # type: ignore[assignment]


def _make_lora_manager(spec: ModelSpec, config: LoRAConfig, runner: ModelRunner) -> LoRAManager:
    """Adapters are read against the checkpoint's spec and written into the runner's slots."""
    from jaxserve.lora.adapter import load_peft_adapter

    def read(lora: LoRARequest) -> object:
        return load_peft_adapter(lora.lora_path, spec, config.max_lora_rank)

    return LoRAManager(
        max_loras=config.max_loras,
        max_cpu_loras=config.num_cpu_loras,
        read=read,
        write_slot=runner.write_lora,
    )
