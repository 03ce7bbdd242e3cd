"""ModelRunner: owns the params and the paged KV cache on device, and runs the jitted step
(runner/step_fn.py builds its two programs: forward, then sample).

launch(SchedulerOutput) stages the flat ragged batch on the host (numpy) and dispatches the
forward (-> logits of the sampling rows) with the KV cache donated; sample() then stages the
sampler's inputs (the token bitmask is filled here, while the forward runs) and dispatches the
on-device sampler; collect() waits for it and returns only sampled ids and requested logprobs
to the host. Between launch and sample the host may read back the previous step (async
scheduling, engine/step_loop.py): this step's decodes read the sampled ids that one leaves
on the device, and its grammars advance by them before its mask is filled.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from tqdm.auto import tqdm

from jaxserve.config import CacheConfig, LoRAConfig, SchedulerConfig
from jaxserve.core.outputs import ModelRunnerOutput, SchedulerOutput
from jaxserve.model.attention import KVCache, kv_storage_dtype
from jaxserve.model.lora import LoRAStacks
from jaxserve.model.spec import ModelSpec
from jaxserve.request import Request
from jaxserve.runner import device_buffers, step_broadcast
from jaxserve.runner.buckets import Buckets
from jaxserve.runner.compile_counter import CompileCounter
from jaxserve.runner.device_inputs import DeviceInputs
from jaxserve.runner.input_batch import InputBatch
from jaxserve.runner.lora_slots import DeviceLoRASlots
from jaxserve.runner.prompt_logprobs import PromptLogprobsOutput
from jaxserve.runner.sampler import SamplerOutput, SamplingMetadata
from jaxserve.runner.sampler_inputs import FillMask, dummy_sampling, stage_sampling
from jaxserve.runner.sampling_metadata import SamplingRow, check_sampling_row, penalty_width
from jaxserve.runner.step_fn import StepFn, make_step_fn
from jaxserve.runner.step_inputs import (
    LoRASlotOf,
    StepInputs,
    dummy_step_inputs,
    stage_forward,
)
from jaxserve.runner.step_outputs import LaunchedStep, fetch_step_outputs, read_step_outputs

logger = logging.getLogger(__name__)


def _no_adapter(request: Request) -> int:
    return 0


class ModelRunner:
    def __init__(
        self,
        spec: ModelSpec,
        params: object,
        *,
        dtype: jnp.dtype,
        kv_cache_dtype: jnp.dtype | None = None,
        num_blocks: int,
        cache_config: CacheConfig,
        scheduler_config: SchedulerConfig,
        attention_backend: str = "xla",
        tensor_parallel_size: int = 1,
        devices: Sequence[jax.Device] | None = None,
        lora_config: LoRAConfig | None = None,
    ) -> None:
        """`spec`/`params`: the model as loaded (params may already be placed on the mesh).

        `dtype`: the weights'; `kv_cache_dtype`: the cache's (default: the weights').

        `lora_config` with enable_lora: the step gets max_loras adapter slots (lora_slots.py).

        `devices`: the devices this engine replica owns (default jax.devices()[:TP]); with
        tensor_parallel_size > 1 the params and the KV cache are sharded over them.
        """
        self.model_spec = spec
        self.tensor_parallel_size = tensor_parallel_size
        if devices is None:
            devices = jax.devices()[:tensor_parallel_size]
        self.devices = list(devices)
        # the devices' platform ("cpu": a Pallas kernel runs interpreted)
        self.platform = self.devices[0].platform
        # step outputs in one device_get; not on CPU, where they are host memory already
        self.batched_fetch = self.platform != "cpu"
        self.mesh, spec = device_buffers.replica_mesh(spec, tensor_parallel_size, self.devices)
        # the execution spec: kv heads as the cache stores them (repeated when TP > kv heads)
        self.spec = spec
        self.dtype = dtype
        self.kv_cache_dtype = jnp.dtype(dtype if kv_cache_dtype is None else kv_cache_dtype)
        self.block_size = cache_config.block_size
        self.num_blocks = num_blocks
        self.attention_backend = attention_backend
        # Penalties see the whole token history: at most max_model_len tokens, and a step's
        # penalty block is as wide as its B bucket holds (sampling_metadata.penalty_width).
        self.penalty_len = scheduler_config.max_model_len
        # u32 words per row of the step's token bitmask (every step carries one: one program)
        self.bitmask_width = -(-spec.vocab_size // 32)
        self.buckets = Buckets.make(
            scheduler_config.max_num_batched_tokens,
            scheduler_config.max_num_seqs,
            scheduler_config.max_model_len,
            cache_config.block_size,
        )
        kv_heads, d = spec.num_kv_heads, spec.head_dim
        self._kv_cache_shape = (spec.num_layers, num_blocks, self.block_size, kv_heads, d)
        self.params = device_buffers.place_params(
            self.model_spec, params, self.devices[0], self.mesh
        )
        self.kv_cache = self._new_kv_cache()
        # the last step's sampled ids by row, on the device (padded to the largest R bucket):
        # the next step's input for tokens still in flight (async scheduling)
        self.last_token_ids = self._new_token_ids()
        # req_id -> its row in the last launched step, for the requests that step samples
        self._last_rows: dict[str, int] = {}
        # a follower process: the logits of the forward it ran last, for its sampler message
        self._followed_logits: jax.Array | None = None
        # the step batch's rows, kept between steps (a row is written when it changes)
        self.input_batch = InputBatch(self.buckets.max_num_reqs, self.buckets.max_blocks_per_req)
        # Multi-host: process 0 (the leader) broadcasts every step's inputs to the processes
        # that own the rest of the mesh (engine/follower.py); they run the same step.
        self.multihost = self.mesh is not None and step_broadcast.spans_processes(self.devices)
        # the adapter slots (None: LoRA off, the step is the base model's program exactly)
        self.lora_slots: DeviceLoRASlots | None = None
        if lora_config is not None and lora_config.enable_lora:
            if self.multihost:
                raise ValueError("enable_lora across several processes is not supported yet")
            self.lora_slots = DeviceLoRASlots(
                self.model_spec,
                spec,
                num_slots=lora_config.max_loras,
                rank=lora_config.max_lora_rank,
                dtype=dtype,
                mesh=self.mesh,
                device=self.devices[0],
            )
        self._step_fn = self._make_step_fn(attention_backend)
        # the step's padding blocks stay on the device (only on the default device: see there)
        self.device_inputs = DeviceInputs(
            enabled=self.mesh is None and self.devices[0] == jax.devices()[0]
        )
        self.is_leader = jax.process_index() == 0
        self.is_warmed_up = False
        # XLA lowerings seen during a step (and embedding slices) after warmup; must stay 0
        self.num_compiles_after_warmup = 0
        # steps whose token bitmask was filled, and how many of those fills ended while the
        # forward was still running on the device (hidden behind it)
        self.num_mask_fills = 0
        self.num_mask_fills_hidden = 0
        # counts this process's lowerings until close() (read around each step)
        self.compiles = CompileCounter()
        self.num_steps = 0

    def _make_step_fn(self, backend: str) -> StepFn:
        lora_sh = None if self.lora_slots is None else self.lora_slots.shardings
        return make_step_fn(
            self.spec,
            backend,
            self.mesh,
            num_ids=self._num_ids,
            platform=self.platform,
            lora_shardings=lora_sh,
        )

    @property
    def _num_ids(self) -> int:
        """P, the length of last_token_ids: the largest R bucket."""
        return max(r for _, r, _ in self.buckets.all_shapes())

    def _dummy_inputs(self, shape: tuple[int, int, int]) -> tuple[StepInputs, SamplingMetadata]:
        inputs = dummy_step_inputs(shape, lora=self.lora_slots is not None)
        return inputs, dummy_sampling(shape[1], self.penalty_width(shape[2]), self.bitmask_width)

    def penalty_width(self, num_blocks_per_req: int) -> int:
        """L of the penalty block in the steps of block-table bucket B (as _stage sizes it)."""
        return penalty_width(num_blocks_per_req, self.block_size, self.penalty_len)

    @property
    def _lora_stacks(self) -> LoRAStacks | None:
        return None if self.lora_slots is None else self.lora_slots.stacks

    def write_lora(self, slot: int, weights: object) -> None:
        """Device LoRA slot `slot` := an adapter's LoRAWeights (None: zeros); never compiles
        after warmup (a compile would be counted like a step's)."""
        assert self.lora_slots is not None, "LoRA is off"
        before = self.compiles.count
        self.lora_slots.write(slot, weights)  # type: ignore[arg-type]
        self._count_compiles(before, "a LoRA slot write")

    def _new_kv_cache(self) -> KVCache:
        dtype = kv_storage_dtype(self.kv_cache_dtype, self.platform, self.attention_backend)
        return device_buffers.new_kv_cache(self._kv_cache_shape, dtype, self.devices[0], self.mesh)

    def _new_token_ids(self) -> jax.Array:
        return device_buffers.new_token_ids(self._num_ids, self.devices[0], self.mesh)

    def use_attention_backend(self, backend: str) -> None:
        """Rebuilds the step for another attention backend (auto's fallback when the Pallas
        kernel fails to compile); a KV cache a failed call consumed is allocated again."""
        self.attention_backend = backend
        self._step_fn = self._make_step_fn(backend)
        if self.kv_cache.k.is_deleted() or self.kv_cache.v.is_deleted():
            self.kv_cache = self._new_kv_cache()

    def compile_smallest_bucket(self) -> None:
        """Compiles (without running) the step of the smallest bucket: a cheap check that the
        attention backend compiles at all, for engines started without warmup."""
        inputs, sampling = self.device_inputs(self._dummy_inputs(self.buckets.all_shapes()[0]))
        fn = self._step_fn
        fn.forward.lower(*self._step_args(inputs)).compile()
        r, v = inputs.num_reqs, self.spec.vocab_size
        fn.sample.lower(jax.ShapeDtypeStruct((r, v), jnp.float32), sampling).compile()

    @property
    def kv_cache_bytes(self) -> int:
        """Bytes of the whole KV cache, summed over its devices."""
        return self.kv_cache.k.nbytes + self.kv_cache.v.nbytes

    @property
    def kv_cache_bytes_per_device(self) -> dict[jax.Device, int]:
        """KV cache bytes each device holds, read from the arrays' addressable shards."""
        return device_buffers.bytes_per_device((self.kv_cache.k, self.kv_cache.v))

    def _step_args(self, inputs: StepInputs) -> tuple[Any, ...]:
        """The step's arguments around `inputs` (already on the device)."""
        return self.params, self._lora_stacks, self.kv_cache, self.last_token_ids, inputs

    def _placed(self, tree: Any, send: Any) -> Any:
        """A program's host inputs as it takes them: multi-host, broadcast by the leader with
        `send` and made global; else with the shared padding blocks swapped for their
        device copies."""
        if not self.multihost:
            return self.device_inputs(tree)
        if self.is_leader:
            send(tree)
        return step_broadcast.to_global(tree, self.mesh)

    def _run_forward(self, inputs: StepInputs) -> tuple[jax.Array, PromptLogprobsOutput]:
        """Dispatches a step's forward (it runs on the device while the host goes on)."""
        inputs = self._placed(inputs, step_broadcast.send_step)
        self.kv_cache, logits, prompt_out = self._step_fn.forward(*self._step_args(inputs))
        return logits, prompt_out

    def _run_sample(self, logits: jax.Array, sampling: SamplingMetadata) -> SamplerOutput:
        """Dispatches the sampler on a dispatched forward's logits."""
        sampling = self._placed(sampling, step_broadcast.send_sampling)
        out, self.last_token_ids = self._step_fn.sample(logits, sampling)
        return out

    def run_followed(self, message: StepInputs | SamplingMetadata) -> None:
        """A follower process: runs what process 0 broadcast (engine/follower.py's loop): a
        step's forward, or the sampler on the last forward's logits."""
        if isinstance(message, StepInputs):
            self._followed_logits, _ = self._run_forward(message)
            self.num_steps += 1
        else:
            assert self._followed_logits is not None, "a sampler message before its forward"
            self._run_sample(self._followed_logits, message)
            self._followed_logits = None

    def compiled_step_text(self, shape: tuple[int, int, int] | None = None) -> str:
        """Optimized HLO of the step's forward for one bucket (T, R, B); default: the largest
        decode-ish bucket (max requests, widest block table). For hlo_stats.collective_stats:
        the collectives are all in the forward (the sampler runs replicated on full rows)."""
        if shape is None:
            shape = max(self.buckets.all_shapes(), key=lambda s: (s[1], s[0], s[2]))
        inputs, _ = self.device_inputs(self._dummy_inputs(shape))
        return self._step_fn.forward.lower(*self._step_args(inputs)).compile().as_text()

    def warmup(self, *, show_progress: bool = True) -> float:
        """Compiles every declared bucket once; returns the seconds it took."""
        start = time.perf_counter()
        shapes = self.buckets.all_shapes()
        for shape in tqdm(shapes, desc="Compiling step buckets", disable=not show_progress):
            inputs, sampling = self._dummy_inputs(shape)
            out = self._run_sample(self._run_forward(inputs)[0], sampling)
        if self.lora_slots is not None:
            self.lora_slots.warmup()
        jax.block_until_ready(out.token_ids)
        self.is_warmed_up = True
        elapsed = time.perf_counter() - start
        logger.info("compiled %d step buckets in %.1f s", len(shapes), elapsed)
        return elapsed

    def check_request(self, request: Request) -> None:
        """Raises ValueError naming the field when the request's part of a step could not be
        staged; EngineCore.add_request calls it, so such a request fails alone at admission."""
        # (token ids in the vocabulary: an admission rule, core/admission.py)
        check_sampling_row(SamplingRow.from_request(request), self.penalty_len)

    def launch(
        self, scheduler_output: SchedulerOutput, lora_slot_of: LoRASlotOf | None = None
    ) -> LaunchedStep:
        """Stages and dispatches one step's forward; sample() dispatches its sampler.
        lora_slot_of gives the device slot of each request's adapter (required when LoRA is
        on). A decode whose input token the previous launched step samples (async
        scheduling) reads it from that step's output on the device.

        NOTE on failures: staging is per request (one that fails is named in
        LaunchedStep.staged.failed, and the others go on); only the device call itself raises,
        and that is fatal to the engine (the cache was donated to it).
        """
        staged = stage_forward(
            scheduler_output,
            self.buckets,
            self.block_size,
            lora_slot_of=(lora_slot_of or _no_adapter) if self.lora_slots is not None else None,
            prev_rows=self._last_rows,
            batch=self.input_batch,
        )
        inputs = staged.inputs
        if inputs is None:
            return LaunchedStep(staged, None, None)
        before = self.compiles.count
        logits, prompt_out = self._run_forward(inputs)
        self._count_compiles(before, "step", inputs)
        self.num_steps += 1
        return LaunchedStep(staged, None, prompt_out, logits)

    def sample(self, launched: LaunchedStep, fill_mask: FillMask | None = None) -> dict[str, str]:
        """Stages a launched step's sampler inputs from its requests' latest tokens and
        dispatches the sampler. fill_mask gives its token bitmask rows (TokenMasks.fill), None
        when no request is constrained: the fill runs here, while the forward is on the device.
        Returns req_id -> why, for the requests whose sampling could not be staged (they
        sample nothing; the caller fails them)."""
        logits, launched.logits = launched.logits, None
        staged, inputs = launched.staged, launched.staged.inputs
        if logits is None or inputs is None:
            return {}
        failed = stage_sampling(
            staged,
            self.input_batch,
            self.block_size,
            self.penalty_len,
            bitmask_width=self.bitmask_width,
            fill_mask=fill_mask,
        )
        if fill_mask is not None:
            self.num_mask_fills += 1
            self.num_mask_fills_hidden += not logits.is_ready()
        assert staged.sampling is not None
        before = self.compiles.count
        launched.out = self._run_sample(logits, staged.sampling)
        self._count_compiles(before, "sampler", inputs)
        self._last_rows = {
            sr.request.request_id: i for i, sr in enumerate(staged.staged) if sr.is_sampling
        }
        return failed

    def _count_compiles(self, before: int, what: str, inputs: StepInputs | None = None) -> None:
        """Counts (and warns of) the lowerings since `before` once warmed up: each is a stall
        that warmup should have paid."""
        if self.is_warmed_up and self.compiles.count != before:
            self.num_compiles_after_warmup += self.compiles.count - before
            i = inputs
            shape = (
                ""
                if i is None
                else f" (T, R, B = {i.num_tokens}, {i.num_reqs}, {i.num_blocks_per_req})"
            )
            logger.warning("%s compiled after warmup%s", what, shape)

    def collect(self, launched: LaunchedStep) -> ModelRunnerOutput:
        """Waits for a launched step and reads back what its requests asked for; a request
        whose read-back fails is named in `failed` (the ones left out at staging are not:
        the caller failed them at launch)."""
        staged = launched.staged
        if launched.out is None:
            return ModelRunnerOutput(sampled_token_ids={})
        host_out, host_prompt_out = fetch_step_outputs(
            staged, launched.out, launched.prompt_out, batched=self.batched_fetch
        )
        return read_step_outputs(staged, host_out, host_prompt_out, {})

    def close(self) -> None:
        """Frees every device buffer the runner holds (params and KV cache)."""
        if self.multihost and self.is_leader and self._step_fn is not None:
            step_broadcast.send_stop()  # the followers leave their loop and free theirs
        for leaf in jax.tree.leaves((self.params, self.kv_cache)):
            if isinstance(leaf, jax.Array) and not leaf.is_deleted():
                leaf.delete()
        if self.lora_slots is not None:
            self.lora_slots.close()
        self.device_inputs.clear()
        self.compiles.close()
        self.params = None
        self.kv_cache = None  # type: ignore[assignment]
        self._step_fn = None  # type: ignore[assignment]
