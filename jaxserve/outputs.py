"""What the offline API returns: vLLM-shaped RequestOutput / CompletionOutput / Logprob."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class RequestOutputKind(enum.IntEnum):
    """What each RequestOutput of a request carries (vLLM's names and values)."""

    # everything so far (the last one is the whole result): LLM.stream's default
    CUMULATIVE = 0
    # only what is new since the previous one: the server, LLM.stream(delta=True)
    DELTA = 1
    # one RequestOutput, when the request finishes: generate(); nothing is built or copied
    # per step, so a request's cost stays O(its tokens) instead of O(tokens^2)
    FINAL_ONLY = 2


@dataclass
class Logprob:
    # log-probability of the token under the model's distribution
    logprob: float
    # 1-based rank of the token in that distribution
    rank: int | None = None
    # the token's text
    decoded_token: str | None = None


# One generated position: token id -> Logprob, holding the top-N and the sampled token.
SampleLogprobs = list[dict[int, Logprob]]
# One per prompt token: its top-N plus the prompt token itself; None for the first (nothing
# predicts it), as vLLM returns them.
PromptLogprobs = list[dict[int, Logprob] | None]


@dataclass
class CompletionOutput:
    # index of this completion among the request's n
    index: int
    # the generated text (stop string removed unless include_stop_str_in_output)
    text: str
    # the generated token ids
    token_ids: list[int]
    # sum of the sampled tokens' logprobs; None unless logprobs were requested
    cumulative_logprob: float | None = None
    # per generated token, the top-N logprobs plus the sampled one; None unless requested
    logprobs: SampleLogprobs | None = None
    # "stop", "length", "abort" once finished, else None
    finish_reason: str | None = None
    # the stop token id or stop string that ended it (None for eos or length)
    stop_reason: int | str | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    # the prompt text (None when the prompt was given as token ids)
    prompt: str | None
    prompt_token_ids: list[int]
    # one per completion (n of them), in index order
    outputs: list[CompletionOutput]
    # True once every completion has finished
    finished: bool
    # prompt tokens served from the prefix cache
    num_cached_tokens: int = 0
    # with SamplingParams.prompt_logprobs: one entry per prompt token (in the first output of a
    # streamed request, once the whole prompt is computed); else None
    prompt_logprobs: PromptLogprobs | None = None
    # wall-clock timings: arrival, first token, finish (time.monotonic seconds)
    metrics: dict[str, float] = field(default_factory=dict)
