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
from server import chat_args, protocol, sampling_args
from server.chat_config import ChatConfig
from server.constraints import NONE, Constraint, constraint_from_body
from server.errors import APIError, bad_request, param_from_message
from server.tools.base import ToolParser
from server.tools.definitions import ToolRequest, parse_tool_request
from server.tools.grammar import tool_grammar

# A prompt as the handlers take it: text, or token ids.
RawPrompt = str | list[int]
B = TypeVar("B", bound=msgspec.Struct)
_DECODERS: dict[type, msgspec.json.Decoder] = {}
# msgspec's "<what> - at `$.messages[0].role`"
_AT = re.compile(r"^(?P<detail>.*?)(?: - at (?:`key` in )?`\$(?P<path>[^`]*)`)?$", re.S)
_FIELD = re.compile(r"^Object (?P<kind>contains unknown|missing required) field `(?P<name>.*)`$")


@dataclass
class CompletionRequest:
    model: str | None
    prompts: list[RawPrompt]
    params: SamplingParams
    stream: bool
    include_usage: bool
    # usage in every chunk (stream_options.continuous_usage_stats)
    continuous_usage: bool
    echo: bool
    # top-N logprobs per token (the OpenAI `logprobs` int); None: no logprobs
    logprobs: int | None
    # the vLLM `prompt_logprobs` field as sent (its own output field); None: not asked
    prompt_logprobs: int | None
    priority: int
    cache_salt: str | None
    # the client's end-user label (logged at INFO with the request id)
    user: str | None
    # renames StructuredOutputsParams' fields in engine errors to the fields as sent
    constraint: Constraint = NONE


@dataclass
class ChatRequest:
    model: str | None
    # what the chat template takes: {"role", "content" (str or text parts), "name"?}
    messages: list[dict[str, Any]]
    add_generation_prompt: bool
    params: SamplingParams
    stream: bool
    include_usage: bool
    continuous_usage: bool
    # None: no logprobs; else how many top logprobs per token (0..max)
    top_logprobs: int | None
    prompt_logprobs: int | None
    priority: int
    cache_salt: str | None
    user: str | None
    # render the last assistant message open (no generation prompt)
    continue_final_message: bool = False
    # extra chat template variables
    chat_template_kwargs: dict[str, Any] | None = None
    # the checked tools fields (no tools: empty, mode "none")
    tools: ToolRequest | None = None
    # the parser of this request's output (None: no tools, or tool_choice "none")
    tool_parser: ToolParser | None = None
    constraint: Constraint = NONE


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
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None
    tools: ToolRequest | None = None


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
    # "[...]" is msgspec's "some value of this map" (logit_bias[...]): the map is the field
    detail, path = m.group("detail"), (m.group("path") or "").lstrip(".").replace("[...]", "")
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


def parse_completion(
    raw: bytes, limits: protocol.Limits, max_model_len: int, *, vocab_size: int | None = None
) -> CompletionRequest:
    body = decode(raw, protocol.CompletionBody)
    prompts = _prompts(body.prompt, "prompt", limits.max_prompts)
    echo = bool(body.echo)
    # echo with logprobs: the prompt's tokens come back with their logprobs first (vLLM's
    # reading), which the engine computes as prompt_logprobs (the larger N when both are sent)
    asked = [n for n in (body.prompt_logprobs, body.logprobs if echo else None) if n is not None]
    constraint = constraint_from_body(body)
    max_tokens, max_tokens_name = sampling_args.max_tokens(
        body, 16
    )  # 16: OpenAI's completions default
    params = sampling_args.sampling_params(
        body,
        limits,
        max_model_len,
        max_tokens=max_tokens,
        max_tokens_name=max_tokens_name,
        logprobs=body.logprobs,
        logprobs_name="logprobs",
        fields=protocol.COMPLETION_FIELDS,
        prompt_logprobs=max(asked) if asked else None,
        vocab_size=vocab_size,
        constraint=constraint,
    )
    include_usage, continuous_usage = sampling_args.usage_options(body)
    return CompletionRequest(
        model=body.model,
        prompts=prompts,
        params=params,
        stream=bool(body.stream),
        include_usage=include_usage,
        continuous_usage=continuous_usage,
        echo=echo,
        logprobs=body.logprobs,
        prompt_logprobs=body.prompt_logprobs,
        priority=body.priority or 0,
        cache_salt=body.cache_salt,
        user=body.user,
        constraint=constraint,
    )


def parse_chat(
    raw: bytes,
    limits: protocol.Limits,
    max_model_len: int,
    *,
    vocab_size: int | None = None,
    chat: ChatConfig | None = None,
) -> ChatRequest:
    body = decode(raw, protocol.ChatBody)
    chat = chat or ChatConfig()
    if body.top_logprobs is not None and not body.logprobs:
        raise bad_request("top_logprobs requires logprobs=true", "top_logprobs")
    top_logprobs = (body.top_logprobs or 0) if body.logprobs else None
    messages = chat_args.messages(body.messages)
    continue_final = chat_args.continue_final(body, messages)
    tools, tool_parser = chat_args.tools(body, chat)
    try:
        grammar = tool_grammar(tool_parser, tools) if tool_parser is not None else None
    except ValueError as e:
        raise bad_request(str(e), param_from_message(str(e), protocol.CHAT_FIELDS)) from None
    constraint = constraint_from_body(body, grammar)
    # chat's default is "until the context is full" (None), as in vLLM and OpenAI
    max_tokens, max_tokens_name = sampling_args.max_tokens(body, None)
    params = sampling_args.sampling_params(
        body,
        limits,
        max_model_len,
        max_tokens=max_tokens,
        max_tokens_name=max_tokens_name,
        logprobs=top_logprobs,
        logprobs_name="top_logprobs",
        fields=protocol.CHAT_FIELDS,
        prompt_logprobs=body.prompt_logprobs,
        vocab_size=vocab_size,
        constraint=constraint,
        # the parser must see its tags in the text (parsers.needs_special_tokens)
        skip_special_tokens=False
        if tool_parser is not None and chat.tool_needs_special_tokens
        else None,
    )
    include_usage, continuous_usage = sampling_args.usage_options(body)
    return ChatRequest(
        model=body.model,
        messages=messages,
        add_generation_prompt=body.add_generation_prompt is not False and not continue_final,
        params=params,
        stream=bool(body.stream),
        include_usage=include_usage,
        continuous_usage=continuous_usage,
        top_logprobs=top_logprobs,
        prompt_logprobs=body.prompt_logprobs,
        priority=body.priority or 0,
        cache_salt=body.cache_salt,
        user=body.user,
        continue_final_message=continue_final,
        chat_template_kwargs=chat_args.template_kwargs(body),
        tools=tools,
        tool_parser=tool_parser,
        constraint=constraint,
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
    messages = None if body.messages is None else chat_args.messages(body.messages)
    continue_final = messages is not None and chat_args.continue_final(body, messages)
    try:
        tools = parse_tool_request(msgspec.to_builtins(body.tools))
    except ValueError as e:
        raise bad_request(str(e), param_from_message(str(e), protocol.TOKENIZE_FIELDS)) from None
    return TokenizeRequest(
        model=body.model,
        prompt=body.prompt,
        messages=messages,
        add_special_tokens=body.add_special_tokens is not False,
        add_generation_prompt=body.add_generation_prompt is not False and not continue_final,
        continue_final_message=continue_final,
        chat_template_kwargs=chat_args.template_kwargs(body),
        tools=tools,
    )


def parse_detokenize(raw: bytes) -> protocol.DetokenizeBody:
    return decode(raw, protocol.DetokenizeBody)
