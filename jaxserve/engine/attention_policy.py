"""Which attention the step runs: the Pallas kernels where they can serve the model, else xla.

The one policy both engine start-up and the tests ask; a configuration a kernel cannot take is
found here, at start, not inside the first step.
"""

from __future__ import annotations

import logging

import jax

from jaxserve.model.spec import ModelSpec

logger = logging.getLogger(__name__)


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
