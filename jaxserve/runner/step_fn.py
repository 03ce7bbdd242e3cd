"""The one jitted step: forward, logits of the sampling rows, the sampler, prompt logprobs.

make_step_fn is the only jax.jit of a step in the engine; ModelRunner owns what it is called
with (params, LoRA slots, the donated KV cache, the previous step's sampled ids, the inputs).
"""

from __future__ import annotations

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
from jaxserve.runner.sampler import SamplerOutput, sample
from jaxserve.runner.step_inputs import StepInputs


def _step(
    params: object,
    lora: LoRAStacks | None,
    kv_cache: KVCache,
    last_token_ids: jax.Array,
    inputs: StepInputs,
    *,
    spec: ModelSpec,
    attention: AttentionFn,
    mesh: Mesh | None,
) -> tuple[KVCache, SamplerOutput, PromptLogprobsOutput, jax.Array]:
    """last_token_ids: i32[P] the previous step's sampled ids by row (P: the largest R
    bucket); tokens whose inputs.prev_rows >= 0 take their id from it (async scheduling).
    Returns this step's as the last output, for the next step."""
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
    sampled = sample(logits_of(hidden[inputs.logits_indices]), inputs.sampling)
    next_token_ids = jnp.zeros_like(last_token_ids).at[: inputs.num_reqs].set(sampled.token_ids)
    prompt_out = prompt_logprobs(hidden, inputs.prompt_targets, logits_of)
    return kv_cache, sampled, prompt_out, next_token_ids


def make_step_fn(
    spec: ModelSpec,
    attention_backend: str,
    mesh: Mesh | None,
    *,
    platform: str | None = None,
    lora_shardings: LoRAStacks | None = None,
) -> Any:
    """The one jitted step; `spec` is the execution spec (sharding.tp_spec) under a mesh;
    `platform`: its devices' (default: jax's default backend); `lora_shardings`: the LoRA
    slots' under a mesh (None: LoRA off)."""
    attention = sharding.attention_for(attention_backend, mesh, platform or jax.default_backend())
    step = functools.partial(_step, spec=spec, attention=attention, mesh=mesh)
    if mesh is None:
        return jax.jit(step, donate_argnames=("kv_cache",))
    kv_sh = sharding.kv_cache_sharding(mesh)
    replicated = NamedSharding(mesh, PartitionSpec())
    # Pinned in/out shardings: the donated cache comes back in its own layout (so the update
    # stays in place) and the step inputs/outputs are replicated on every device.
    return jax.jit(
        step,
        in_shardings=(
            sharding.param_shardings(spec, mesh),
            lora_shardings,
            kv_sh,
            replicated,
            replicated,
        ),
        out_shardings=(kv_sh, replicated, replicated, replicated),
        donate_argnames=("kv_cache",),
    )
