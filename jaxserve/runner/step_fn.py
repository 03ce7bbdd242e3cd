"""The jitted step, in two programs: forward (-> logits of the sampling rows), then sample.

The step is split where vLLM splits it (`execute_model`, then `sample_tokens`): the host
dispatches the forward, and while the device runs it, fills what the sampler needs that only
the host knows (the structured-output bitmask, penalty ids), then dispatches the sampler on
the forward's logits. With async scheduling, the previous step is read back in that gap too,
so a grammar advances by its last token before its next mask is filled: constrained and
penalized requests no longer make a step synchronous.

The forward program is keyed by the step's bucket (T, R, B); the sampler's by (R, L), the
rows and the penalty width (which follows B): each bucket's sampler is compiled once, not once
inside every (T, R, B) program. make_step_fn is the only place a step is jitted; ModelRunner
owns what it is called with (params, LoRA slots, the donated KV cache, the previous step's
sampled ids, the inputs).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxserve.model import sharding
from jaxserve.model.attention import KVCache
from jaxserve.model.layers import AttentionFn
from jaxserve.model.llama import compute_logits, forward
from jaxserve.model.lora import LoRAStacks
from jaxserve.model.spec import ModelSpec
from jaxserve.runner.prompt_logprobs import PromptLogprobsOutput, prompt_logprobs
from jaxserve.runner.sampler import SamplerOutput, SamplingMetadata, sample
from jaxserve.runner.step_inputs import StepInputs


def _forward(
    params: object,
    lora: LoRAStacks | None,
    kv_cache: KVCache,
    last_token_ids: jax.Array,
    inputs: StepInputs,
    *,
    spec: ModelSpec,
    attention: AttentionFn,
    mesh: Mesh | None,
) -> tuple[KVCache, jax.Array, PromptLogprobsOutput]:
    """last_token_ids: i32[P] the previous step's sampled ids by row (P: the largest R
    bucket); tokens whose inputs.prev_rows >= 0 take their id from it (async scheduling).
    Returns the cache, f32[R, V] logits of each row's last token, and the prompt logprobs."""
    prev_rows = inputs.prev_rows
    input_ids = jnp.where(
        prev_rows >= 0, last_token_ids[jnp.maximum(prev_rows, 0)], inputs.input_ids
    )
    hidden, kv_cache = forward(
        params,
        spec,
        input_ids,
        inputs.positions,
        inputs.attn,
        kv_cache,
        attention=attention,
        lora=lora,
        lora_slots=inputs.lora_slots,
    )

    def logits_of(h: jax.Array) -> jax.Array:
        logits = compute_logits(params, spec, h)
        if mesh is not None:
            # Vocab-parallel logits [R, V/tp] per device (without this constraint XLA gathers
            # the whole [E, V] lm_head instead), then gathered once; the sampler runs
            # replicated on full rows, so seeded sampling draws exactly what one device draws.
            logits = sharding.constrain(logits, mesh, "logits")
            logits = jax.lax.with_sharding_constraint(logits, NamedSharding(mesh, PartitionSpec()))
        return logits.astype(jnp.float32)

    # Logits only for each request's last token: [R, V] instead of [T, V].
    logits = logits_of(hidden[inputs.logits_indices])
    prompt_out = prompt_logprobs(hidden, inputs.prompt_targets, logits_of)
    return kv_cache, logits, prompt_out


def _sample(
    logits: jax.Array, sampling: SamplingMetadata, *, num_ids: int
) -> tuple[SamplerOutput, jax.Array]:
    """logits: f32[R, V] from the forward. Returns the sampled tokens and i32[num_ids] of
    them by row (zeros past R), the next step's last_token_ids."""
    sampled = sample(logits, sampling)
    next_token_ids = jnp.zeros(num_ids, jnp.int32).at[: logits.shape[0]].set(sampled.token_ids)
    return sampled, next_token_ids


@dataclasses.dataclass(frozen=True)
class StepFn:
    """The step's two jitted programs."""

    # (params, lora, kv_cache [donated], last_token_ids, StepInputs) -> (kv_cache, f32[R, V]
    # logits, PromptLogprobsOutput)
    forward: Any
    # (logits, SamplingMetadata) -> (SamplerOutput, i32[P] sampled ids by row)
    sample: Any

    def __call__(
        self,
        params: object,
        lora: LoRAStacks | None,
        kv_cache: KVCache,
        last_token_ids: jax.Array,
        inputs: StepInputs,
        sampling: SamplingMetadata,
    ) -> tuple[KVCache, SamplerOutput, PromptLogprobsOutput, jax.Array]:
        """Both programs in turn, with nothing on the host between them (warmup, followers
        of a multi-host mesh, benchmarks)."""
        kv_cache, logits, prompt_out = self.forward(params, lora, kv_cache, last_token_ids, inputs)
        out, next_ids = self.sample(logits, sampling)
        return kv_cache, out, prompt_out, next_ids


def make_step_fn(
    spec: ModelSpec,
    attention_backend: str,
    mesh: Mesh | None,
    *,
    num_ids: int,
    platform: str | None = None,
    lora_shardings: LoRAStacks | None = None,
) -> StepFn:
    """The step's programs; `spec` is the execution spec (sharding.tp_spec) under a mesh;
    `num_ids`: P, the length of last_token_ids (the largest R bucket); `platform`: the
    devices' (default: jax's default backend); `lora_shardings`: the LoRA slots' under a mesh
    (None: LoRA off)."""
    attention = sharding.attention_for(attention_backend, mesh, platform or jax.default_backend())
    fwd = functools.partial(_forward, spec=spec, attention=attention, mesh=mesh)
    smp = functools.partial(_sample, num_ids=num_ids)
    if mesh is None:
        return StepFn(jax.jit(fwd, donate_argnames=("kv_cache",)), jax.jit(smp))
    kv_sh = sharding.kv_cache_sharding(mesh)
    replicated = NamedSharding(mesh, PartitionSpec())
    # Pinned in/out shardings: the donated cache comes back in its own layout (so the update
    # stays in place) and the step inputs/outputs are replicated on every device.
    return StepFn(
        jax.jit(
            fwd,
            in_shardings=(
                sharding.param_shardings(spec, mesh),
                lora_shardings,
                kv_sh,
                replicated,
                replicated,
            ),
            out_shardings=(kv_sh, replicated, replicated),
            donate_argnames=("kv_cache",),
        ),
        jax.jit(smp, in_shardings=(replicated, replicated), out_shardings=(replicated, replicated)),
    )
