"""OpenAI request bodies -> validated dataclasses (and SamplingParams) for the handlers.

Strict by design: an unknown field is a 400 naming it, not silently ignored, so a client
that sends `logit_bias` or `best_of` learns that this server does not do them instead of
getting subtly different results. Every error names the field in `param`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

from jaxserve.sampling_params import MAX_LOGPROBS, MAX_STOP_STRINGS, SamplingParams
from server.errors import APIError, bad_request, param_from_message

# A prompt as the client gave it: text, or token ids.
RawPrompt = str | list[int]

# Fields every generation endpoint shares: vLLM's sampling names. skip_special_tokens and
# include_stop_str_in_output are vLLM extensions kept for its users.
_SAMPLING_FIELDS = frozenset(
    {
        "max_tokens",
        "temperature",
        "top_p",
        "top_k",
        "min_p",
        "presence_penalty",
        "frequency_penalty",
        "repetition_penalty",
        "n",
        "seed",
        "stop",
        "stop_token_ids",
        "ignore_eos",
        "min_tokens",
        "skip_special_tokens",
        "include_stop_str_in_output",
    }
)
_COMMON_FIELDS = frozenset({"model", "stream", "stream_options", "priority", "cache_salt", "user"})
COMPLETION_FIELDS = _SAMPLING_FIELDS | _COMMON_FIELDS | {"prompt", "logprobs", "echo"}
CHAT_FIELDS = (
    _SAMPLING_FIELDS
    | _COMMON_FIELDS
    | {"messages", "max_completion_tokens", "logprobs", "top_logprobs", "add_generation_prompt"}
)
EMBEDDING_FIELDS = frozenset({"model", "input", "encoding_format", "user"})
TOKENIZE_FIELDS = frozenset(
    {"model", "prompt", "messages", "add_special_tokens", "add_generation_prompt"}
)
DETOKENIZE_FIELDS = frozenset({"model", "tokens"})
_MESSAGE_FIELDS = frozenset({"role", "content", "name"})
# seeds and priorities travel as int64 at most
_INT64_MAX = (1 << 63) - 1


@dataclass(frozen=True)
class Limits:
    """Per-request caps, so that one request cannot take the whole server."""

    # completions per prompt
    max_n: int = 16
    # prompts (or embedding inputs) in one request; each is its own engine request
    max_prompts: int = 32
    # None: the model's max_model_len (more could never be generated anyway)
    max_tokens: int | None = None
    max_stop: int = MAX_STOP_STRINGS
    # characters per stop string: the detokenizer scans this much text per token
    max_stop_len: int = 256
    max_logprobs: int = MAX_LOGPROBS
    # request body bytes (larger bodies get 413 before they are read into memory)
    max_body_bytes: int = 8 << 20


@dataclass
class CompletionRequest:
    model: str | None
    prompts: list[RawPrompt]
    params: SamplingParams
    stream: bool
    include_usage: bool
    echo: bool
    # top-N logprobs per token (the OpenAI `logprobs` int); None: no logprobs
    logprobs: int | None
    priority: int
    cache_salt: str | None


@dataclass
class ChatRequest:
    model: str | None
    messages: list[dict[str, Any]]
    add_generation_prompt: bool
    params: SamplingParams
    stream: bool
    include_usage: bool
    # None: no logprobs; else how many top logprobs per token (0..max)
    top_logprobs: int | None
    priority: int
    cache_salt: str | None


@dataclass
class EmbeddingRequest:
    model: str | None
    inputs: list[RawPrompt]
    encoding_format: str


@dataclass
class TokenizeRequest:
    model: str | None
    prompt: str | None = None
    messages: list[dict[str, Any]] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True


@dataclass
class DetokenizeRequest:
    model: str | None
    tokens: list[int] = field(default_factory=list)


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not valid JSON")


def parse_json_body(raw: bytes) -> dict[str, Any]:
    """The body as a JSON object; NaN/Infinity are refused (they slip past range checks)."""
    try:
        body = json.loads(raw, parse_constant=_reject_constant)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise bad_request(f"request body is not valid JSON: {e}", None) from None
    if not isinstance(body, dict):
        raise bad_request("request body must be a JSON object", None)
    return body


def check_fields(body: dict[str, Any], allowed: frozenset[str]) -> None:
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise bad_request(
            f"unknown field {unknown[0]!r}; this endpoint accepts: {', '.join(sorted(allowed))}",
            unknown[0],
        )


def _type_error(name: str, what: str, value: Any) -> APIError:
    return bad_request(f"{name} must be {what}, got {json.dumps(value)[:80]}", name)


def _int(
    body: dict, name: str, default: int | None, lo: int | None = None, hi: int | None = None
) -> int | None:
    v = body.get(name)
    if v is None:
        return default
    if not isinstance(v, int) or isinstance(v, bool):
        raise _type_error(name, "an integer", v)
    if lo is not None and v < lo:
        raise bad_request(f"{name} must be >= {lo}, got {v}", name)
    if hi is not None and v > hi:
        raise bad_request(f"{name} must be <= {hi}, got {v}", name)
    return v


def _float(body: dict, name: str, default: float) -> float:
    v = body.get(name)
    if v is None:
        return default
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
        raise _type_error(name, "a finite number", v)
    return float(v)


def _bool(body: dict, name: str, default: bool) -> bool:
    v = body.get(name)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise _type_error(name, "a boolean", v)
    return v


def _str(body: dict, name: str) -> str | None:
    v = body.get(name)
    if v is not None and not isinstance(v, str):
        raise _type_error(name, "a string", v)
    return v


def _token_ids(value: Any, name: str) -> list[int]:
    if not isinstance(value, list) or not all(
        isinstance(t, int) and not isinstance(t, bool) and 0 <= t <= _INT64_MAX for t in value
    ):
        raise bad_request(f"{name} must be a list of non-negative integer token ids", name)
    return value


def _is_ids(value: Any) -> bool:
    return isinstance(value, list) and all(
        isinstance(t, int) and not isinstance(t, bool) for t in value
    )


def parse_prompts(value: Any, name: str, max_prompts: int) -> list[RawPrompt]:
    """A string, a list of strings, a list of token ids, or a list of token-id lists."""
    if isinstance(value, str):
        prompts: list[RawPrompt] = [value]
    elif isinstance(value, list) and value and _is_ids(value):
        prompts = [_token_ids(value, name)]
    elif isinstance(value, list) and value and all(isinstance(p, str) for p in value):
        prompts = list(value)
    elif isinstance(value, list) and value and all(isinstance(p, list) for p in value):
        prompts = [_token_ids(p, f"{name}[{i}]") for i, p in enumerate(value)]
    else:
        raise bad_request(
            f"{name} must be a non-empty string, list of strings, list of token ids, "
            "or list of token-id lists",
            name,
        )
    if len(prompts) > max_prompts:
        raise bad_request(f"{name} holds {len(prompts)} prompts; the limit is {max_prompts}", name)
    for i, p in enumerate(prompts):
        if len(p) == 0:
            where = name if len(prompts) == 1 else f"{name}[{i}]"
            raise bad_request(f"{where} must not be empty", where)
    return prompts


def parse_messages(value: Any) -> list[dict[str, Any]]:
    """Structure only (the chat template checks the rest): roles, text content, no extras."""
    if not isinstance(value, list) or not value:
        raise bad_request(
            "messages must be a non-empty list of {role, content} objects", "messages"
        )
    for i, m in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise bad_request(f"{where} must be an object with role and content", where)
        extra = sorted(set(m) - _MESSAGE_FIELDS)
        if extra:
            raise bad_request(f"{where}.{extra[0]} is not supported", f"{where}.{extra[0]}")
        if not isinstance(m.get("role"), str) or not m["role"]:
            raise bad_request(f"{where}.role must be a non-empty string", f"{where}.role")
        content = m.get("content")
        if isinstance(content, list):
            for j, part in enumerate(content):
                p = f"{where}.content[{j}]"
                if not isinstance(part, dict) or part.get("type") != "text":
                    raise bad_request(f"{p}.type must be 'text' (only text is supported)", p)
                if set(part) - {"type", "text"} or not isinstance(part.get("text"), str):
                    raise bad_request(f"{p} must be {{'type': 'text', 'text': <string>}}", p)
        elif not isinstance(content, str):
            raise bad_request(
                f"{where}.content must be a string or a list of text parts", f"{where}.content"
            )
    return value


def _stop(body: dict, limits: Limits) -> tuple[str, ...]:
    v = body.get("stop")
    if v is None:
        return ()
    stops = [v] if isinstance(v, str) else v
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise bad_request("stop must be a non-empty string or a list of them", "stop")
    if len(stops) > limits.max_stop:
        raise bad_request(
            f"stop holds {len(stops)} strings; the limit is {limits.max_stop}", "stop"
        )
    if any(len(s) > limits.max_stop_len for s in stops):
        raise bad_request(f"stop strings may be at most {limits.max_stop_len} characters", "stop")
    return tuple(stops)


def _stream_options(body: dict, stream: bool) -> bool:
    """-> include_usage."""
    opts = body.get("stream_options")
    if opts is None:
        return False
    if not stream:
        raise bad_request("stream_options is only allowed with stream=true", "stream_options")
    if not isinstance(opts, dict):
        raise _type_error("stream_options", "an object", opts)
    extra = sorted(set(opts) - {"include_usage"})
    if extra:
        raise bad_request(
            f"stream_options.{extra[0]} is not supported", f"stream_options.{extra[0]}"
        )
    return _bool(opts, "include_usage", False) if "include_usage" in opts else False


def _sampling_params(
    body: dict,
    limits: Limits,
    max_model_len: int,
    *,
    max_tokens: int | None,
    logprobs: int | None,
    fields: frozenset[str],
) -> SamplingParams:
    """Types and server limits here; SamplingParams checks ranges and names the field."""
    max_tokens_limit = limits.max_tokens or max_model_len
    if max_tokens is not None and max_tokens > max_tokens_limit:
        raise bad_request(
            f"max_tokens must be <= {max_tokens_limit}, got {max_tokens}", "max_tokens"
        )
    stop_token_ids = body.get("stop_token_ids")
    if stop_token_ids is not None:
        _token_ids(stop_token_ids, "stop_token_ids")
    kwargs: dict[str, Any] = dict(
        n=_int(body, "n", 1, lo=1, hi=limits.max_n),
        temperature=_float(body, "temperature", 1.0),
        top_p=_float(body, "top_p", 1.0),
        top_k=_int(body, "top_k", 0, lo=-1),
        min_p=_float(body, "min_p", 0.0),
        presence_penalty=_float(body, "presence_penalty", 0.0),
        frequency_penalty=_float(body, "frequency_penalty", 0.0),
        repetition_penalty=_float(body, "repetition_penalty", 1.0),
        seed=_int(body, "seed", None, lo=0, hi=_INT64_MAX),
        max_tokens=max_tokens,
        min_tokens=_int(body, "min_tokens", 0, lo=0, hi=max_tokens_limit),
        stop=_stop(body, limits),
        stop_token_ids=tuple(stop_token_ids or ()),
        ignore_eos=_bool(body, "ignore_eos", False),
        logprobs=logprobs,
        include_stop_str_in_output=_bool(body, "include_stop_str_in_output", False),
        skip_special_tokens=_bool(body, "skip_special_tokens", True),
    )
    try:
        return SamplingParams(**kwargs)
    except ValueError as e:
        raise bad_request(str(e), param_from_message(str(e), fields)) from None


def _common(body: dict) -> tuple[str | None, bool, bool, int, str | None]:
    model = _str(body, "model")
    _str(body, "user")  # accepted for OpenAI compatibility, not used
    stream = _bool(body, "stream", False)
    include_usage = _stream_options(body, stream)
    priority = _int(body, "priority", 0, lo=-(1 << 31), hi=(1 << 31) - 1)
    cache_salt = _str(body, "cache_salt")
    if cache_salt == "":
        raise bad_request("cache_salt must not be empty", "cache_salt")
    return model, stream, include_usage, priority, cache_salt


def parse_completion(body: dict, limits: Limits, max_model_len: int) -> CompletionRequest:
    check_fields(body, COMPLETION_FIELDS)
    if "prompt" not in body:
        raise bad_request("prompt is required", "prompt")
    prompts = parse_prompts(body["prompt"], "prompt", limits.max_prompts)
    model, stream, include_usage, priority, cache_salt = _common(body)
    logprobs = _int(body, "logprobs", None, lo=0, hi=limits.max_logprobs)
    echo = _bool(body, "echo", False)
    if echo and logprobs is not None:
        # vLLM would add prompt logprobs here; the engine does not compute them
        raise bad_request("echo together with logprobs is not supported", "echo")
    # 16 is the OpenAI completions default
    max_tokens = _int(body, "max_tokens", 16, lo=1)
    params = _sampling_params(
        body,
        limits,
        max_model_len,
        max_tokens=max_tokens,
        logprobs=logprobs,
        fields=COMPLETION_FIELDS,
    )
    return CompletionRequest(
        model, prompts, params, stream, include_usage, echo, logprobs, priority, cache_salt
    )


def parse_chat(body: dict, limits: Limits, max_model_len: int) -> ChatRequest:
    check_fields(body, CHAT_FIELDS)
    if "messages" not in body:
        raise bad_request("messages is required", "messages")
    messages = parse_messages(body["messages"])
    model, stream, include_usage, priority, cache_salt = _common(body)
    want_logprobs = _bool(body, "logprobs", False)
    top = _int(body, "top_logprobs", None, lo=0, hi=limits.max_logprobs)
    if top is not None and not want_logprobs:
        raise bad_request("top_logprobs requires logprobs=true", "top_logprobs")
    top_logprobs = (top or 0) if want_logprobs else None
    # chat's default is "until the context is full" (None), as in vLLM and OpenAI
    max_tokens = _int(body, "max_completion_tokens", None, lo=1)
    name = "max_completion_tokens"
    if max_tokens is None:
        max_tokens, name = _int(body, "max_tokens", None, lo=1), "max_tokens"
    try:
        params = _sampling_params(
            body,
            limits,
            max_model_len,
            max_tokens=max_tokens,
            logprobs=top_logprobs,
            fields=CHAT_FIELDS,
        )
    except APIError as e:
        if e.param == "max_tokens":
            e.param, e.message = name, e.message.replace("max_tokens", name)
        raise
    return ChatRequest(
        model,
        messages,
        _bool(body, "add_generation_prompt", True),
        params,
        stream,
        include_usage,
        top_logprobs,
        priority,
        cache_salt,
    )


def parse_embedding(body: dict, limits: Limits) -> EmbeddingRequest:
    check_fields(body, EMBEDDING_FIELDS)
    if "input" not in body:
        raise bad_request("input is required", "input")
    inputs = parse_prompts(body["input"], "input", limits.max_prompts)
    fmt = _str(body, "encoding_format") or "float"
    if fmt not in ("float", "base64"):
        raise bad_request("encoding_format must be 'float' or 'base64'", "encoding_format")
    _str(body, "user")
    return EmbeddingRequest(_str(body, "model"), inputs, fmt)


def parse_tokenize(body: dict) -> TokenizeRequest:
    check_fields(body, TOKENIZE_FIELDS)
    has_prompt, has_messages = "prompt" in body, "messages" in body
    if has_prompt == has_messages:
        raise bad_request("give exactly one of prompt or messages", "prompt")
    req = TokenizeRequest(
        _str(body, "model"),
        add_special_tokens=_bool(body, "add_special_tokens", True),
        add_generation_prompt=_bool(body, "add_generation_prompt", True),
    )
    if has_prompt:
        req.prompt = _str(body, "prompt")
        if req.prompt is None:
            raise _type_error("prompt", "a string", None)
    else:
        req.messages = parse_messages(body["messages"])
    return req


def parse_detokenize(body: dict) -> DetokenizeRequest:
    check_fields(body, DETOKENIZE_FIELDS)
    if "tokens" not in body:
        raise bad_request("tokens is required", "tokens")
    return DetokenizeRequest(_str(body, "model"), _token_ids(body["tokens"], "tokens"))
