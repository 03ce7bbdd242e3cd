"""The step's device outputs read back into ModelRunnerOutput (sampled ids, logprobs).

Per request: a request whose read-back raises fails alone (named in `failed`), the others go on.
"""

from __future__ import annotations

import logging

import jax
import numpy as np

from jaxserve.core.outputs import ModelRunnerOutput, TokenLogprobs
from jaxserve.runner import prompt_logprobs as plp
from jaxserve.runner.prompt_logprobs import PromptLogprobsOutput
from jaxserve.runner.sampler import SamplerOutput
from jaxserve.runner.step_inputs import StagedStep

logger = logging.getLogger(__name__)


def host_array(x: jax.Array) -> np.ndarray:
    """A replicated step output as numpy (multi-host: this process's copy)."""
    return np.asarray(x if x.is_fully_addressable else x.addressable_data(0))


def read_step_outputs(
    staged: StagedStep,
    token_ids: np.ndarray,
    out: SamplerOutput,
    prompt_out: PromptLogprobsOutput,
    failed: dict[str, str],
) -> ModelRunnerOutput:
    """token_ids: the sampled ids already on the host; failed: req_id -> why, added to."""
    sampled: dict[str, int] = {}
    logprobs: dict[str, TokenLogprobs] = {}
    rows = staged.staged
    want_logprobs = any(
        sr.is_sampling and sr.request.sampling_params.logprobs is not None for sr in rows
    )
    if want_logprobs:
        lp, ranks = host_array(out.logprobs), host_array(out.ranks)
        top_ids, top_lps = host_array(out.top_token_ids), host_array(out.top_logprobs)
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
        host_out = jax.tree.map(host_array, prompt_out)
        for span in staged.prompt_spans:
            if span.request_id not in failed:
                entries = plp.entries(host_out, span.offset, span.target_ids, span.top_n)
                prompt_logprobs[span.request_id] = (span.first_index, entries)
    return ModelRunnerOutput(
        sampled_token_ids=sampled,
        logprobs=logprobs,
        prompt_logprobs=prompt_logprobs,
        failed=failed,
    )
