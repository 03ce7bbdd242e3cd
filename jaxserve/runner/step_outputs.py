"""A launched step (LaunchedStep), and its device outputs read back into ModelRunnerOutput
(sampled ids, logprobs).

Only the outputs the step's requests read come back (the sampled ids; the logprob and
prompt-logprob arrays only when some row asked). On an accelerator they come in one
jax.device_get: every copy starts at once and the host waits once, instead of once per array.
On CPU the device buffers are host memory and np.asarray is a view, with no copy to batch:
measured here, 41 us of host CPU for five outputs that way against 207 us through device_get
(its pytree walk and a copy_to_host_async of ~25 us per array), so CPU reads them directly.

Per request: a request whose read-back raises fails alone (named in `failed`), the others go on.
"""

from __future__ import annotations

import dataclasses
import logging

import jax
import numpy as np

from jaxserve.core.outputs import ModelRunnerOutput, TokenLogprobs
from jaxserve.runner import prompt_logprobs as plp
from jaxserve.runner.prompt_logprobs import PromptLogprobsOutput
from jaxserve.runner.sampler import SamplerOutput
from jaxserve.runner.step_inputs import StagedStep

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class LaunchedStep:
    """A step dispatched to the device and not read back yet."""

    # its inputs, and the requests left out of it (the caller fails those at once)
    staged: StagedStep
    # its device outputs (futures until the step finishes); None when nothing ran (every
    # scheduled request failed to stage, or none was scheduled), and None until sample()
    out: SamplerOutput | None
    prompt_out: PromptLogprobsOutput | None
    # the forward's f32[R, V] logits, between launch() and sample()
    logits: jax.Array | None = None


def _local(x: jax.Array) -> jax.Array:
    """A replicated step output as this process can read it (multi-host: its own copy)."""
    return x if x.is_fully_addressable else x.addressable_data(0)


def fetch_step_outputs(
    staged: StagedStep,
    out: SamplerOutput,
    prompt_out: PromptLogprobsOutput,
    *,
    batched: bool = True,
) -> tuple[SamplerOutput, PromptLogprobsOutput | None]:
    """The outputs `staged`'s requests read, as numpy (this waits for the step); batched: in
    one device_get (accelerators), else one np.asarray each (CPU). Arrays no request reads
    are left out: `logprobs`, `ranks`, `top_*` are None when no sampling row asked for
    logprobs, the prompt-logprobs output when none asked."""
    want_logprobs = any(
        sr.is_sampling and sr.request.sampling_params.logprobs is not None for sr in staged.staged
    )
    wanted = SamplerOutput(
        token_ids=_local(out.token_ids),
        logprobs=_local(out.logprobs) if want_logprobs else None,
        ranks=_local(out.ranks) if want_logprobs else None,
        top_token_ids=_local(out.top_token_ids) if want_logprobs else None,
        top_logprobs=_local(out.top_logprobs) if want_logprobs else None,
    )
    prompt = jax.tree.map(_local, prompt_out) if staged.prompt_spans else None
    if batched:
        return jax.device_get((wanted, prompt))
    return jax.tree.map(np.asarray, (wanted, prompt))


def read_step_outputs(
    staged: StagedStep,
    out: SamplerOutput,
    prompt_out: PromptLogprobsOutput | None,
    failed: dict[str, str],
) -> ModelRunnerOutput:
    """out, prompt_out: fetch_step_outputs' host arrays; failed: req_id -> why, added to."""
    sampled: dict[str, int] = {}
    logprobs: dict[str, TokenLogprobs] = {}
    rows = staged.staged
    token_ids, lp, ranks = out.token_ids, out.logprobs, out.ranks
    top_ids, top_lps = out.top_token_ids, out.top_logprobs
    for i, sr in enumerate(rows):
        if not sr.is_sampling:
            continue
        req_id = sr.request.request_id
        try:
            sampled[req_id] = int(token_ids[i])
            n = sr.request.sampling_params.logprobs
            if n is not None:
                logprobs[req_id] = TokenLogprobs(
                    token_id=int(token_ids[i]),
                    logprob=float(lp[i]),
                    rank=int(ranks[i]),
                    top=[
                        (int(t), float(v))
                        for t, v in zip(top_ids[i, :n], top_lps[i, :n], strict=True)
                    ],
                )
        except Exception as e:  # noqa: BLE001 - this request's read-back alone failed
            logger.exception("reading back request %s failed", req_id)
            sampled.pop(req_id, None)
            failed[req_id] = f"the engine could not read this request's output: {e!r}"
    prompt_logprobs = {}
    if staged.prompt_spans:
        assert prompt_out is not None
        for span in staged.prompt_spans:
            if span.request_id not in failed:
                entries = plp.entries(prompt_out, span.offset, span.target_ids, span.top_n)
                prompt_logprobs[span.request_id] = (span.first_index, entries)
    return ModelRunnerOutput(
        sampled_token_ids=sampled,
        logprobs=logprobs,
        prompt_logprobs=prompt_logprobs,
        failed=failed,
    )
