"""EngineCoreRequest messages for tests that drive an EngineCore directly."""

from __future__ import annotations

from jaxserve.core.admission import EngineCoreRequest
from jaxserve.sampling_params import SamplingParams


def core_request(rid: str, prompt: list[int], params: SamplingParams) -> EngineCoreRequest:
    """A checked-shape request message: no eos, seed 0, the params' max_tokens."""
    return EngineCoreRequest(
        request_id=rid,
        prompt_token_ids=prompt,
        sampling_params=params,
        eos_token_id=None,
        sampling_seed=0,
        max_tokens=params.max_tokens,
    )
