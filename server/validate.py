"""Request bytes -> what the handlers need: msgspec decodes and checks a body Struct
(server/protocol.py), then the checks that span fields or depend on this server (its Limits,
max_model_len) run, and SamplingParams is built from the Struct.

Every refusal is a 400 whose `param` is the field path, e.g. "messages[0].role".
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, TypeVar

import msgspec

from jaxserve.sampling_params import SamplingParams, check_text
from server import protocol
from server.errors import APIError, bad_request, param_from_message

# A prompt as the handlers take it: text, or token ids.
RawPrompt = str | list[int]
B = TypeVar("B", bound=msgspec.Struct)
_DECODERS: dict[type, msgspec.json.Decoder] = {}
# msgspec's "<what> - at `$.messages[0].role`"
_AT = re.compile(r"^(?P<detail>.*?)(?: - at `\$(?P<path>[^`]*)`)?$", re.S)
_FIELD = re.compile(r"^Object (?P<kind>contains unknown|missing required) field `(?P<name>.*)`$")


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
    # the client's end-user label (logged at DEBUG)
    user: str | None


@dataclass
class ChatRequest:
    model: str | None
    # what the chat template takes: {"role", "content" (str or text parts), "name"?}
    messages: list[dict[str, Any]]
    add_generation_prompt: bool
    params: SamplingParams
    stream: bool
    include_usage: bool
    # None: no logprobs; else how many top logprobs per token (0..max)
    top_logprobs: int | None
    priority: int
    cache_salt: str | None
    user: str | None


@dataclass
class EmbeddingRequest:
    model: str | None
    inputs: list[RawPrompt]
    encoding_format: str
    user: str | None


@dataclass
class TokenizeRequest:
    model: str | None
    # exactly one of prompt and messages is set
    prompt: str | None
    messages: list[dict[str, Any]] | None
    add_special_tokens: bool
    add_generation_prompt: bool


def decode(raw: bytes, body_type: type[B]) -> B:
    """The body as `body_type`, or a 400 naming the field path."""
    decoder = _DECODERS.get(body_type)
    if decoder is None:
        decoder = _DECODERS[body_type] = msgspec.json.Decoder(body_type)
    try:
        return decoder.decode(raw)
    except msgspec.ValidationError as e:
        raise _validation_error(str(e), body_type) from None
    except msgspec.DecodeError as e:
        raise _decode_error(raw, e) from None


def _validation_error(message: str, body_type: type) -> APIError:
    m = _AT.match(message)
    assert m is not None  # the pattern matches any string
    detail, path = m.group("detail"), (m.group("path") or "").lstrip(".")
    f = _FIELD.match(detail)
    if f is None:
        if not path:  # the body itself is not an object
            return bad_request(f"request body must be a JSON object: {detail}", None)
        if path.endswith(".type") and detail.startswith("Invalid enum value"):
            detail += " (only text content parts are supported)"
        return bad_request(f"{path}: {detail}", path)
    param = f"{path}.{f.group('name')}" if path else f.group("name")
    if f.group("kind") == "missing required":
        return bad_request(f"{param} is required", param)
    if path:
        return bad_request(f"{param} is not supported", param)
    accepted = ", ".join(sorted(protocol.fields(body_type)))
    return bad_request(f"unknown field {param!r}; this endpoint accepts: {accepted}", param)


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not valid JSON")


def _decode_error(raw: bytes, e: msgspec.DecodeError) -> APIError:
    """msgspec refuses malformed JSON and lone surrogates alike, without a path; the
    standard parser tells the two apart, and check_text finds the field for the second."""
    try:
        parsed = json.loads(raw, parse_constant=_reject_constant)
    except (ValueError, UnicodeDecodeError, RecursionError) as e2:
        return bad_request(f"request body is not valid JSON: {e2}", None)
    bad = _find_bad_text(parsed, "")
    if bad is not None:
        return bad
    return bad_request(f"request body is not valid JSON: {e}", None)


def _find_bad_text(value: Any, path: str) -> APIError | None:
    """The first string (key or value) check_text refuses, as a 400 naming its path."""
    stack = [(value, path)]
    while stack:
        v, p = stack.pop()
        if isinstance(v, str):
            try:
                check_text(v, p or "request body")
            except ValueError as e:
                return bad_request(str(e), p or None)
        elif isinstance(v, list):
            stack.extend((x, f"{p}[{i}]") for i, x in reversed(list(enumerate(v))))
        elif isinstance(v, dict):
            for k, x in reversed(list(v.items())):
                # a bad key is named escaped: the path goes into the (UTF-8) response
                name = k.encode("utf-8", "backslashreplace").decode()
                stack.append((x, f"{p}.{name}" if p else name))
                stack.append((k, f"{p}.{name}" if p else name))
    return None


def _prompts(value: str | list, name: str, max_prompts: int) -> list[RawPrompt]:
    """A string, a list of strings, a list of token ids, or a list of token-id lists."""
    if isinstance(value, str):
        prompts: list[RawPrompt] = [value]
    elif all(isinstance(p, int) for p in value):
        prompts = [value]
    elif all(isinstance(p, (str, list)) for p in value) and len({type(p) for p in value}) == 1:
        prompts = list(value)
    else:
        raise bad_request(
            f"{name} must be a string, a list of strings, a list of token ids or a list of "
            "token-id lists (not a mix)",
            name,
        )
    if len(prompts) > max_prompts:
        raise bad_request(f"{name} holds {len(prompts)} prompts; the limit is {max_prompts}", name)
    return prompts


def _messages(messages: list[protocol.Message]) -> list[dict[str, Any]]:
    out = []
    for m in messages:
        content: str | list[dict[str, str]] = (
            m.content
            if isinstance(m.content, str)
            else [{"type": "text", "text": p.text} for p in m.content]
        )
        d: dict[str, Any] = {"role": m.role, "content": content}
        if m.name is not None:
            d["name"] = m.name
        out.append(d)
    return out


# What one message costs the template beyond its text (its role, the template's markup):
# thousands of empty messages are no tiny input either.
_MESSAGE_OVERHEAD_CHARS = 32


def message_chars(messages: list[dict[str, Any]]) -> int:
    """The size of the messages in characters (decides whether rendering leaves the loop)."""
    total = 0
    for m in messages:
        c = m["content"]
        total += _MESSAGE_OVERHEAD_CHARS + len(m["role"])
        total += len(c) if isinstance(c, str) else sum(len(p["text"]) for p in c)
    return total


def _include_usage(body: protocol.GenerationBody) -> bool:
    if body.stream_options is None:
        return False
    if not body.stream:
        raise bad_request("stream_options is only allowed with stream=true", "stream_options")
    return bool(body.stream_options.include_usage)


def _sampling_params(
    body: protocol.GenerationBody,
    limits: protocol.Limits,
    max_model_len: int,
    *,
    max_tokens: int | None,
    max_tokens_name: str,
    logprobs: int | None,
    logprobs_name: str,
    fields: frozenset[str],
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
    if logprobs is not None and logprobs > limits.max_logprobs:
        raise bad_request(
            f"{logprobs_name} must be <= {limits.max_logprobs}, got {logprobs}", logprobs_name
        )
    kwargs = {f: v for f in protocol.SAMPLING_FIELDS if (v := getattr(body, f)) is not None}
    kwargs.update(max_tokens=max_tokens, logprobs=logprobs)
    try:
        return SamplingParams(**kwargs)
    except ValueError as e:
        param = param_from_message(str(e), fields)
        if param == "max_tokens":
            param = max_tokens_name
        raise bad_request(str(e), param) from None


def parse_completion(raw: bytes, limits: protocol.Limits, max_model_len: int) -> CompletionRequest:
    body = decode(raw, protocol.CompletionBody)
    prompts = _prompts(body.prompt, "prompt", limits.max_prompts)
    echo = bool(body.echo)
    if echo and body.logprobs is not None:
        # vLLM would add prompt logprobs here; the engine does not compute them
        raise bad_request("echo together with logprobs is not supported", "echo")
    params = _sampling_params(
        body,
        limits,
        max_model_len,
        # 16 is the OpenAI completions default
        max_tokens=16 if body.max_tokens is None else body.max_tokens,
        max_tokens_name="max_tokens",
        logprobs=body.logprobs,
        logprobs_name="logprobs",
        fields=protocol.COMPLETION_FIELDS,
    )
    return CompletionRequest(
        model=body.model,
        prompts=prompts,
        params=params,
        stream=bool(body.stream),
        include_usage=_include_usage(body),
        echo=echo,
        logprobs=body.logprobs,
        priority=body.priority or 0,
        cache_salt=body.cache_salt,
        user=body.user,
    )


def parse_chat(raw: bytes, limits: protocol.Limits, max_model_len: int) -> ChatRequest:
    body = decode(raw, protocol.ChatBody)
    if body.top_logprobs is not None and not body.logprobs:
        raise bad_request("top_logprobs requires logprobs=true", "top_logprobs")
    top_logprobs = (body.top_logprobs or 0) if body.logprobs else None
    # chat's default is "until the context is full" (None), as in vLLM and OpenAI
    if body.max_completion_tokens is not None:
        max_tokens, name = body.max_completion_tokens, "max_completion_tokens"
    else:
        max_tokens, name = body.max_tokens, "max_tokens"
    params = _sampling_params(
        body,
        limits,
        max_model_len,
        max_tokens=max_tokens,
        max_tokens_name=name,
        logprobs=top_logprobs,
        logprobs_name="top_logprobs",
        fields=protocol.CHAT_FIELDS,
    )
    return ChatRequest(
        model=body.model,
        messages=_messages(body.messages),
        add_generation_prompt=body.add_generation_prompt is not False,
        params=params,
        stream=bool(body.stream),
        include_usage=_include_usage(body),
        top_logprobs=top_logprobs,
        priority=body.priority or 0,
        cache_salt=body.cache_salt,
        user=body.user,
    )


def parse_embedding(raw: bytes, limits: protocol.Limits) -> EmbeddingRequest:
    body = decode(raw, protocol.EmbeddingBody)
    return EmbeddingRequest(
        model=body.model,
        inputs=_prompts(body.input, "input", limits.max_prompts),
        encoding_format=body.encoding_format or "float",
        user=body.user,
    )


def parse_tokenize(raw: bytes) -> TokenizeRequest:
    body = decode(raw, protocol.TokenizeBody)
    if (body.prompt is None) == (body.messages is None):
        raise bad_request("give exactly one of prompt or messages", "prompt")
    return TokenizeRequest(
        model=body.model,
        prompt=body.prompt,
        messages=None if body.messages is None else _messages(body.messages),
        add_special_tokens=body.add_special_tokens is not False,
        add_generation_prompt=body.add_generation_prompt is not False,
    )


def parse_detokenize(raw: bytes) -> protocol.DetokenizeBody:
    return decode(raw, protocol.DetokenizeBody)
