"""What asks the engine core for a completion, and the rules it must meet to get in.

`EngineCoreRequest` is the one request message: the API side's InputProcessor makes it once
(offline `LLM` and the server alike), the server's wire carries it as it is (engine/ipc.py), and
the core turns it into its mutable `Request` state once (`Request.from_core_request`).

NOTE: each admission rule is stated once, here. The API side runs `validate_core_request`
before sending, so a bad request fails before it is queued or anything is registered; the core
runs the same function again in `EngineCore.add_request`, because it trusts no process for
what would corrupt its state (ids out of the vocabulary, lengths past its arrays, a request its
cache could never hold). Nothing here imports jax: the scheduler side stays host-only.
"""

from __future__ import annotations

from collections.abc import Container

import msgspec

from jaxserve.lora.request import LoRARequest
from jaxserve.sampling_params import PRIORITY_RANGE, SamplingParams, as_token_ids, check_text

# Health-probe request ids start with this; user request ids may not (engine/core_proc.py).
PROBE_ID_PREFIX = "__jaxserve_probe__:"


class EngineCoreRequest(msgspec.Struct, tag=True):
    """One completion for the core (a user request with n > 1 makes n, ids f"{id}:{i}")."""

    request_id: str
    prompt_token_ids: list[int]
    # validated again by SamplingParams.__post_init__ when decoded from the wire
    sampling_params: SamplingParams
    # the seed the request samples with (drawn by the API side when the user gave none)
    sampling_seed: int
    # max_tokens resolved against max_model_len (RequestLimits.resolve_max_tokens)
    max_tokens: int
    eos_token_id: int | None
    priority: int = 0
    # extra key of the prefix-cache block hashes
    cache_salt: str | None = None
    # time.monotonic() of the process that made it (None: the core stamps it on arrival); only
    # compared with other requests' arrival times
    arrival_time: float | None = None
    # the LoRA adapter it runs with (None: the base model)
    lora_request: LoRARequest | None = None


def check_prompt_len(num_tokens: int, max_model_len: int, field: str = "prompt") -> None:
    """A prompt must leave room for at least one generated token."""
    if num_tokens == 0:
        raise ValueError(f"{field} must not be empty (it has 0 tokens)")
    if num_tokens >= max_model_len:
        raise ValueError(
            f"{field} has {num_tokens} tokens; with max_model_len={max_model_len} at most "
            f"{max_model_len - 1} prompt tokens leave room to generate"
        )


def check_embed_len(num_tokens: int, max_model_len: int, field: str = "input") -> None:
    """An embedding input generates nothing, so it may fill max_model_len."""
    if not 0 < num_tokens <= max_model_len:
        raise ValueError(
            f"{field} must hold 1 to max_model_len={max_model_len} tokens, got {num_tokens}"
        )


class RequestLimits(msgspec.Struct, frozen=True):
    """The engine's sizes every request is checked against (sent to the API side in Ready)."""

    # token ids must lie in [0, vocab_size)
    vocab_size: int
    # longest prompt + output a request may have
    max_model_len: int
    # tokens per KV block
    block_size: int
    # KV blocks a request can be given (the null block is never handed out)
    num_usable_blocks: int
    # requests may name a LoRA adapter (EngineArgs.enable_lora)
    enable_lora: bool = False

    def resolve_max_tokens(self, num_prompt_tokens: int, max_tokens: int | None) -> int:
        """max_tokens capped by the room max_model_len leaves (None: all of it)."""
        room = self.max_model_len - num_prompt_tokens
        return room if max_tokens is None else min(max_tokens, room)

    def check_kv_capacity(self, num_prompt_tokens: int, max_tokens: int) -> None:
        """Raises ValueError when the whole cache could never hold this request.

        Admitting such a request could only end in it preempting itself forever. The last
        sampled token is never computed, so the KV holds at most prompt + max_tokens - 1 tokens.
        """
        max_kv_tokens = min(num_prompt_tokens + max_tokens - 1, self.max_model_len)
        num_blocks_needed = -(-max_kv_tokens // self.block_size)
        if num_blocks_needed > self.num_usable_blocks:
            raise ValueError(
                f"prompt + max_tokens need up to {num_blocks_needed} KV blocks, more than the "
                f"{self.num_usable_blocks} in the cache; lower max_tokens or max_model_len"
            )


def check_new_request_id(request_id: str, known: Container[str]) -> None:
    """The id-uniqueness rule (the API side's user ids, each core's and the DP router's ids)."""
    if request_id in known:
        raise ValueError(f"request_id {request_id!r} is already in use")


def validate_core_request(
    req: EngineCoreRequest, limits: RequestLimits, *, is_probe: bool = False
) -> None:
    """Every rule a core request must meet; ValueError naming the field, nothing taken.

    is_probe: the core's own health probes may use the reserved id prefix, and a priority
    ahead of every user's.
    """
    if not is_probe and req.request_id.startswith(PROBE_ID_PREFIX):
        raise ValueError(f"request_id must not start with {PROBE_ID_PREFIX!r}")
    params = req.sampling_params
    if not isinstance(params, SamplingParams):
        raise ValueError(f"sampling_params must be SamplingParams, got {type(params)}")
    as_token_ids(req.prompt_token_ids, limits.vocab_size, "prompt_token_ids")
    as_token_ids(params.stop_token_ids, limits.vocab_size, "stop_token_ids")
    if req.eos_token_id is not None:
        as_token_ids([req.eos_token_id], limits.vocab_size, "eos_token_id")
    so = params.structured_outputs
    if so is not None and so.after_token_id is not None:
        as_token_ids([so.after_token_id], limits.vocab_size, "structured_outputs.after_token_id")
    num_prompt = len(req.prompt_token_ids)
    check_prompt_len(num_prompt, limits.max_model_len, "prompt_token_ids")
    room = limits.max_model_len - num_prompt
    if not 1 <= req.max_tokens <= room:
        raise ValueError(f"max_tokens must be in [1, {room}] for this prompt, got {req.max_tokens}")
    limits.check_kv_capacity(num_prompt, req.max_tokens)
    if req.lora_request is not None and not limits.enable_lora:
        raise ValueError(
            "lora_request: this engine serves no LoRA adapters (start it with enable_lora=True, "
            "or --enable-lora)"
        )
    if not is_probe and req.priority not in PRIORITY_RANGE:
        raise ValueError(
            f"priority must be an integer in {PRIORITY_RANGE.describe()}, got {req.priority!r}"
        )
    if req.cache_salt is not None:
        check_text(req.cache_salt, "cache_salt")
