"""Request: one sequence's state as the engine core tracks it (host-side, plain Python).

A request is its prompt, its generated tokens, and `num_computed_tokens` (how many of those
tokens have KV in the cache). The scheduler hands out tokens until `num_computed_tokens`
catches up with `num_tokens`; there is no prefill or decode mode.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass

from jaxserve.core.admission import EngineCoreRequest
from jaxserve.lora.request import LoRARequest
from jaxserve.sampling_params import SamplingParams


class RequestStatus(enum.IntEnum):
    WAITING = enum.auto()
    RUNNING = enum.auto()
    PREEMPTED = enum.auto()
    # everything from here on is finished
    FINISHED_STOPPED = enum.auto()
    FINISHED_LENGTH_CAPPED = enum.auto()
    FINISHED_ABORTED = enum.auto()

    @staticmethod
    def is_finished(status: RequestStatus) -> bool:
        return status >= RequestStatus.FINISHED_STOPPED


class FinishReason(enum.StrEnum):
    """The OpenAI finish_reason strings."""

    STOP = "stop"
    LENGTH = "length"
    ABORT = "abort"


_FINISH_REASONS = {
    RequestStatus.FINISHED_STOPPED: FinishReason.STOP,
    RequestStatus.FINISHED_LENGTH_CAPPED: FinishReason.LENGTH,
    RequestStatus.FINISHED_ABORTED: FinishReason.ABORT,
}


@dataclass
class TokenLogprobs:
    """One position's logprobs (a sampled token's, or a prompt token's); core/outputs.py's
    messages carry them, and a Request keeps its prompt's."""

    # the sampled token and its log-probability under the model (before sampling filters)
    token_id: int
    logprob: float
    # 1-based rank of the sampled token in the full distribution
    rank: int
    # the top-N (token id, logprob) pairs, most likely first; N = SamplingParams.logprobs
    top: list[tuple[int, float]]


class Request:
    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        sampling_params: SamplingParams,
        eos_token_id: int | None,
        *,
        sampling_seed: int,
        arrival_time: float | None = None,
        priority: int = 0,
        cache_salt: str | None = None,
        lora_request: LoRARequest | None = None,
        max_tokens: int,
    ) -> None:
        self.request_id = request_id
        self.prompt_token_ids = list(prompt_token_ids)
        self.sampling_params = sampling_params
        self.eos_token_id = eos_token_id
        # the seed actually used: the user's, or one the engine drew for an unseeded request
        self.sampling_seed = sampling_seed
        self.arrival_time = time.monotonic() if arrival_time is None else arrival_time
        self.priority = priority
        # extra keys of the block hashes: requests with different salts never share blocks
        self.cache_salt = cache_salt
        # the adapter it runs with (None: the base model)
        self.lora_request = lora_request
        # the other extra key: requests on different adapters never share blocks
        self.adapter_id = None if lora_request is None else str(lora_request.lora_int_id)
        # max_tokens resolved against max_model_len
        self.max_tokens = max_tokens
        self.status = RequestStatus.WAITING
        self.output_token_ids: list[int] = []
        # prompt + output, the sequence whose KV the cache holds
        self.all_token_ids: list[int] = list(prompt_token_ids)
        # how many of all_token_ids have KV in the cache (with async scheduling, also the
        # in-flight sampled token: its KV is computed by the step after the one sampling it)
        self.num_computed_tokens = 0
        # tokens a scheduled step samples for this request that are not appended yet: 1 from
        # schedule() to update_from_output() of that step (vLLM's num_output_placeholders);
        # with async scheduling the next step is scheduled in between, as if it were there
        self.num_output_placeholders = 0
        # prompt tokens served from the prefix cache when first scheduled (for usage accounting)
        self.num_cached_tokens = -1
        self.num_preemptions = 0
        # chained hashes of the full blocks of all_token_ids, filled by the KV cache manager
        self.block_hashes: list[bytes] = []
        # the stop token id (int) or stop string (str) that ended the request
        self.stop_reason: int | str | None = None
        # with sampling_params.prompt_logprobs: entry i is prompt token i + 1's, as computed
        # so far (a recompute after preemption adds nothing twice)
        self.prompt_logprobs: list[TokenLogprobs] = []

    @classmethod
    def from_core_request(cls, m: EngineCoreRequest) -> Request:
        """The core's state of a request message (validate it first: validate_core_request)."""
        return cls(
            m.request_id,
            m.prompt_token_ids,
            m.sampling_params,
            m.eos_token_id,
            sampling_seed=m.sampling_seed,
            arrival_time=m.arrival_time,
            priority=m.priority,
            cache_salt=m.cache_salt,
            lora_request=m.lora_request,
            max_tokens=m.max_tokens,
        )

    @property
    def lora_int_id(self) -> int:
        """The adapter's id, 0 for the base model."""
        return 0 if self.lora_request is None else self.lora_request.lora_int_id

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_planned_tokens(self) -> int:
        """num_tokens plus the in-flight sampled tokens: what the scheduler plans against."""
        return len(self.all_token_ids) + self.num_output_placeholders

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def is_finished(self) -> bool:
        return RequestStatus.is_finished(self.status)

    @property
    def finish_reason(self) -> FinishReason | None:
        return _FINISH_REASONS.get(self.status)

    def append_output_token_ids(self, token_ids: int | list[int]) -> None:
        if isinstance(token_ids, int):
            token_ids = [token_ids]
        self.output_token_ids.extend(token_ids)
        self.all_token_ids.extend(token_ids)

    def check_stop(self, token_id: int, max_model_len: int) -> bool:
        """Sets a finished status (and stop_reason) when the token just appended ends it."""
        params = self.sampling_params
        num_output = self.num_output_tokens
        if num_output >= params.min_tokens:
            if not params.ignore_eos and token_id == self.eos_token_id:
                self.status = RequestStatus.FINISHED_STOPPED
                return True
            if token_id in params.stop_token_ids:
                self.status = RequestStatus.FINISHED_STOPPED
                self.stop_reason = token_id
                return True
        if num_output >= self.max_tokens or self.num_tokens >= max_model_len:
            self.status = RequestStatus.FINISHED_LENGTH_CAPPED
            return True
        return False

    def add_prompt_logprobs(self, first: int, entries: list[TokenLogprobs]) -> None:
        """Entries first .. of prompt_logprobs from one step; a recompute after preemption
        adds only what is missing."""
        have = len(self.prompt_logprobs)
        if first <= have:
            self.prompt_logprobs.extend(entries[have - first :])

    @property
    def prompt_logprobs_to_send(self) -> list[TokenLogprobs] | None:
        """The prompt logprobs, on the output of the first sampled token only."""
        if self.sampling_params.prompt_logprobs is None or self.num_output_tokens != 1:
            return None
        return self.prompt_logprobs

    def __repr__(self) -> str:
        return (
            f"Request({self.request_id!r}, status={self.status.name}, "
            f"prompt={self.num_prompt_tokens}, output={self.num_output_tokens}, "
            f"computed={self.num_computed_tokens})"
        )
