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


def _messages(messages: list[protocol.Message]) -> list[dict[str, Any]]:
    out = []
    for i, m in enumerate(messages):
        content: str | list[dict[str, str]] | None
        if m.content is None:
            if not (m.role == "assistant" and m.tool_calls):
                raise bad_request(
                    f"messages[{i}].content is required (null only for an assistant "
                    "message with tool_calls)",
                    f"messages[{i}].content",
                )
            content = None
        elif isinstance(m.content, str):
            content = m.content
        else:
            content = [{"type": "text", "text": p.text} for p in m.content]
        d: dict[str, Any] = {"role": m.role, "content": content}
        if m.name is not None:
            d["name"] = m.name
        if m.tool_calls is not None:
            d["tool_calls"] = msgspec.to_builtins(m.tool_calls)
        if m.tool_call_id is not None:
            d["tool_call_id"] = m.tool_call_id
        if m.reasoning_content is not None:
            d["reasoning_content"] = m.reasoning_content
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
        if isinstance(c, str):
            total += len(c)
        elif c is not None:
            total += sum(len(p["text"]) for p in c)
        for call in m.get("tool_calls") or ():
            total += _MESSAGE_OVERHEAD_CHARS + len(call["function"]["arguments"])
        total += len(m.get("reasoning_content") or "")
    return total


def _usage_options(body: protocol.GenerationBody) -> tuple[bool, bool]:
    """(include_usage, continuous_usage_stats) of stream_options."""
    if body.stream_options is None:
        return False, False
    if not body.stream:
        raise bad_request("stream_options is only allowed with stream=true", "stream_options")
    opts = body.stream_options
    return bool(opts.include_usage), bool(opts.continuous_usage_stats)


def _check_token_ids(ids: Any, name: str, vocab_size: int | None) -> None:
    if vocab_size is None or not ids:
        return
    bad = [t for t in ids if t >= vocab_size]
    if bad:
        raise bad_request(
            f"{name} holds token id {bad[0]}, outside the vocabulary [0, {vocab_size})", name
        )


def _logit_bias(body: protocol.GenerationBody, vocab_size: int | None) -> dict[int, float]:
    if body.logit_bias is None:
        return {}
    bias = {int(k): v for k, v in body.logit_bias.items()}
    _check_token_ids(bias, "logit_bias", vocab_size)
    return bias


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
    _check_token_ids(body.allowed_token_ids, "allowed_token_ids", vocab_size)
    kwargs = {f: v for f in protocol.SAMPLING_FIELDS if (v := getattr(body, f)) is not None}
    kwargs.update(
        max_tokens=max_tokens,
        logprobs=logprobs,
        prompt_logprobs=prompt_logprobs,
        logit_bias=_logit_bias(body, vocab_size),
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


def _max_tokens(body: protocol.GenerationBody, default: int | None) -> tuple[int | None, str]:
    """max_completion_tokens wins over max_tokens (OpenAI's newer name), on both endpoints."""
    if body.max_completion_tokens is not None:
        return body.max_completion_tokens, "max_completion_tokens"
    return (default if body.max_tokens is None else body.max_tokens), "max_tokens"


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
    max_tokens, max_tokens_name = _max_tokens(body, 16)  # 16: OpenAI's completions default
    params = _sampling_params(
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
    include_usage, continuous_usage = _usage_options(body)
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


# Variables the chat template gets from the server itself (or transformers uses as options):
# chat_template_kwargs may not replace them.
RESERVED_TEMPLATE_KWARGS = frozenset(
    {
        "messages",
        "conversation",
        "tools",
        "documents",
        "add_generation_prompt",
        "continue_final_message",
        "chat_template",
        "tokenize",
        "return_dict",
        "return_tensors",
        "return_assistant_tokens_mask",
        "tokenizer_kwargs",
        "padding",
        "truncation",
        "max_length",
        "sanitize_control_tokens",
        "bos_token",
        "eos_token",
        "raise_exception",
    }
)


def _continue_final(
    body: protocol.ChatBody | protocol.TokenizeBody, messages: list[dict[str, Any]]
) -> bool:
    """continue_final_message, checked (vLLM's rules: not with add_generation_prompt=true,
    and the last message must be the assistant's)."""
    if not body.continue_final_message:
        return False
    if body.add_generation_prompt:
        raise bad_request(
            "continue_final_message and add_generation_prompt cannot both be true",
            "continue_final_message",
        )
    if messages[-1]["role"] != "assistant":
        raise bad_request(
            "continue_final_message needs the last message to be the assistant's",
            f"messages[{len(messages) - 1}].role",
        )
    return True


def _template_kwargs(body: protocol.ChatBody | protocol.TokenizeBody) -> dict[str, Any] | None:
    kwargs = body.chat_template_kwargs
    if not kwargs:
        return None
    for name in kwargs:
        if name in RESERVED_TEMPLATE_KWARGS:
            raise bad_request(
                f"chat_template_kwargs.{name} is set by the server and cannot be overridden",
                f"chat_template_kwargs.{name}",
            )
    return dict(kwargs)


def _tools(body: protocol.ChatBody, chat: ChatConfig) -> tuple[ToolRequest, ToolParser | None]:
    """The tools fields checked; the parser for the output (None: calls are not parsed)."""
    try:
        request = parse_tool_request(
            msgspec.to_builtins(body.tools),
            msgspec.to_builtins(body.tool_choice),
            body.parallel_tool_calls,
        )
    except ValueError as e:
        raise bad_request(str(e), param_from_message(str(e), protocol.CHAT_FIELDS)) from None
    if not request.tools or request.choice.mode == "none":
        return request, None
    if chat.tool_parser is None:
        raise bad_request(
            "this server cannot parse tool calls for its chat template; start it with "
            "--tool-call-parser hermes or llama3_json",
            "tools",
        )
    return request, chat.tool_parser(request.tool_names)


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
    messages = _messages(body.messages)
    continue_final = _continue_final(body, messages)
    tools, tool_parser = _tools(body, chat)
    try:
        grammar = tool_grammar(tool_parser, tools) if tool_parser is not None else None
    except ValueError as e:
        raise bad_request(str(e), param_from_message(str(e), protocol.CHAT_FIELDS)) from None
    constraint = constraint_from_body(body, grammar)
    # chat's default is "until the context is full" (None), as in vLLM and OpenAI
    max_tokens, max_tokens_name = _max_tokens(body, None)
    params = _sampling_params(
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
    include_usage, continuous_usage = _usage_options(body)
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
        chat_template_kwargs=_template_kwargs(body),
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
    messages = None if body.messages is None else _messages(body.messages)
    continue_final = messages is not None and _continue_final(body, messages)
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
        chat_template_kwargs=_template_kwargs(body),
        tools=tools,
    )


def parse_detokenize(raw: bytes) -> protocol.DetokenizeBody:
    return decode(raw, protocol.DetokenizeBody)
