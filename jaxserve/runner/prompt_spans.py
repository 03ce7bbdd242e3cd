"""Where a step's prompt-logprob positions sit (host side, numpy).

A request with SamplingParams.prompt_logprobs asks for the distribution at each prompt
position its chunk computes; position p predicts prompt token p + 1. The spans say where those
positions are in the step's T and which tokens they predict; runner/prompt_logprobs.py
computes them on the device and reads them back by span.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from jaxserve.core.outputs import ScheduledRequest


@dataclasses.dataclass
class PromptLogprobSpan:
    """Where one request's prompt-logprob positions sit in a step."""

    request_id: str
    # index into the step's T of its first asking position
    offset: int
    # the prompt tokens those positions predict, in order
    target_ids: list[int]
    # index of the first of them in the request's prompt_logprobs (= its prompt position)
    first_index: int
    # top-N the request asked for
    top_n: int


def prompt_spans(scheduled: Sequence[ScheduledRequest]) -> list[PromptLogprobSpan]:
    """Position p (< the prompt's last) of a request with prompt_logprobs predicts token p + 1."""
    spans = []
    offset = 0
    for sr in scheduled:
        request = sr.request
        top_n = request.sampling_params.prompt_logprobs
        start, n = sr.num_computed_tokens, sr.num_scheduled_tokens
        last = min(start + n, request.num_prompt_tokens - 1)  # positions start .. last - 1
        if top_n is not None and start < last:
            targets = request.prompt_token_ids[start + 1 : last + 1]
            spans.append(PromptLogprobSpan(request.request_id, offset, targets, start, top_n))
        offset += n
    return spans


def prompt_targets(spans: list[PromptLogprobSpan], num_tokens: int) -> np.ndarray:
    """StepInputs.prompt_targets of a step of `num_tokens` (T) with these spans."""
    targets = np.full(num_tokens, -1, np.int32)
    for span in spans:
        targets[span.offset : span.offset + len(span.target_ids)] = span.target_ids
    return targets
