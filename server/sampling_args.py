"""Body -> SamplingParams under this server's limits: the sampling fields of both generation
endpoints, their server-side caps (--max-n, max_tokens, logprobs), token ids in the vocabulary,
and the stream options. A refusal is a 400 naming the field (server/validate.py decodes).
"""

from __future__ import annotations

from typing import Any

from jaxserve.sampling_params import SamplingParams
from server import protocol
from server.constraints import NONE, Constraint
from server.errors import bad_request, param_from_message


def usage_options(body: protocol.GenerationBody) -> tuple[bool, bool]:
    """(include_usage, continuous_usage_stats) of stream_options."""
    if body.stream_options is None:
        return False, False
    if not body.stream:
        raise bad_request("stream_options is only allowed with stream=true", "stream_options")
    opts = body.stream_options
    return bool(opts.include_usage), bool(opts.continuous_usage_stats)


def check_token_ids(ids: Any, name: str, vocab_size: int | None) -> None:
    if vocab_size is None or not ids:
        return
    bad = [t for t in ids if t >= vocab_size]
    if bad:
        raise bad_request(
            f"{name} holds token id {bad[0]}, outside the vocabulary [0, {vocab_size})", name
        )


def logit_bias(body: protocol.GenerationBody, vocab_size: int | None) -> dict[int, float]:
    if body.logit_bias is None:
        return {}
    bias = {int(k): v for k, v in body.logit_bias.items()}
    check_token_ids(bias, "logit_bias", vocab_size)
    return bias


def sampling_params(
    body: protocol.GenerationBody,
    limits: protocol.Limits,
    max_model_len: int,
    *,
    max_tokens: int | None,
    max_tokens_name: str,
    logprobs: int | None,
    logprobs_name: str,
    fields: frozenset[str],
    prompt_logprobs: int | None = None,
    vocab_size: int | None = None,
    constraint: Constraint = NONE,
    skip_special_tokens: bool | None = None,
) -> SamplingParams:
    """The Struct's sampling fields (None: SamplingParams' default) under this server's limits;
    SamplingParams checks the rest and names the field."""
    max_tokens_limit = limits.max_tokens or max_model_len
    if max_tokens is not None and max_tokens > max_tokens_limit:
        raise bad_request(
            f"{max_tokens_name} must be <= {max_tokens_limit}, got {max_tokens}", max_tokens_name
        )
    if body.min_tokens is not None and body.min_tokens > max_tokens_limit:
        raise bad_request(
            f"min_tokens must be <= {max_tokens_limit}, got {body.min_tokens}", "min_tokens"
        )
    if body.n is not None and body.n > limits.max_n:
        raise bad_request(f"n must be <= {limits.max_n} (--max-n), got {body.n}", "n")
    if isinstance(body.stop, list) and len(body.stop) > limits.max_stop:
        raise bad_request(
            f"stop holds {len(body.stop)} strings; the limit is {limits.max_stop}", "stop"
        )
    for value, name in ((logprobs, logprobs_name), (prompt_logprobs, "prompt_logprobs")):
        if value is not None and value > limits.max_logprobs:
            raise bad_request(f"{name} must be <= {limits.max_logprobs}, got {value}", name)
    if body.prompt_logprobs is not None and body.stream:
        # vLLM's rule too: they would all arrive in one chunk after the whole prompt ran
        raise bad_request("prompt_logprobs is not available with stream=true", "prompt_logprobs")
    check_token_ids(body.allowed_token_ids, "allowed_token_ids", vocab_size)
    kwargs = {f: v for f in protocol.SAMPLING_FIELDS if (v := getattr(body, f)) is not None}
    kwargs.update(
        max_tokens=max_tokens,
        logprobs=logprobs,
        prompt_logprobs=prompt_logprobs,
        logit_bias=logit_bias(body, vocab_size),
        allowed_token_ids=body.allowed_token_ids,
        bad_words=tuple(body.bad_words or ()),
        structured_outputs=constraint.params,
    )
    if skip_special_tokens is not None:
        kwargs["skip_special_tokens"] = skip_special_tokens
    try:
        return SamplingParams(**kwargs)
    except ValueError as e:
        param = param_from_message(str(e), fields)
        if param == "max_tokens":
            param = max_tokens_name
        raise bad_request(str(e), param) from None


def max_tokens(body: protocol.GenerationBody, default: int | None) -> tuple[int | None, str]:
    """max_completion_tokens wins over max_tokens (OpenAI's newer name), on both endpoints."""
    if body.max_completion_tokens is not None:
        return body.max_completion_tokens, "max_completion_tokens"
    return (default if body.max_tokens is None else body.max_tokens), "max_tokens"
