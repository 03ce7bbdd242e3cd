"""OpenAI request bodies, declared once as msgspec Structs: decoding validates them and
/openapi.json is generated from them (server/openapi.py).

Strict by design: an unknown field is a 400 naming it, not silently ignored, so a client
that sends `logit_bias` or `best_of` learns that this server does not do them instead of
getting subtly different results. Numeric bounds come from jaxserve/sampling_params.py (the
one table SamplingParams checks offline too); limits an operator sets per server (--max-n,
max_model_len, ...) are checked after decoding, in server/validate.py.

Every optional field also takes null, meaning "not given" (some clients send nulls).
"""

from dataclasses import dataclass
from typing import Annotated, Literal

import msgspec
from msgspec import Meta

from jaxserve.sampling_params import (
    FLOAT_RANGES,
    INT_RANGES,
    MAX_BANNED_TOKEN_IDS,
    MAX_LOGPROBS,
    MAX_STOP_STRINGS,
    PRIORITY_RANGE,
    TOKEN_ID_RANGE,
    Range,
)


@dataclass(frozen=True)
class Limits:
    """Per-request caps an operator sets per server, so one request cannot take it all;
    checked after decoding (the Structs hold the engine's fixed bounds)."""

    # completions per prompt
    max_n: int = 16
    # prompts (or embedding inputs) in one request; each is its own engine request
    max_prompts: int = 32
    # None: the model's max_model_len (more could never be generated anyway)
    max_tokens: int | None = None
    max_stop: int = MAX_STOP_STRINGS
    max_logprobs: int = MAX_LOGPROBS
    # request body bytes (larger bodies get 413 before they are read into memory)
    max_body_bytes: int = 8 << 20


def _meta(r: Range, description: str | None = None) -> Meta:
    lo = {"gt": r.lo} if r.is_lo_open else {"ge": r.lo}
    return Meta(**lo, le=r.hi, description=description)


def _int(name: str, description: str | None = None) -> object:
    return Annotated[int, _meta(INT_RANGES[name], description)]


def _float(name: str, description: str | None = None) -> object:
    return Annotated[float, _meta(FLOAT_RANGES[name], description)]


# Characters per stop string: the detokenizer scans this much text per generated token.
MAX_STOP_CHARS = 256
# Names (model, user, role, message name) and cache salts: short labels, not payloads.
MAX_NAME_CHARS = 256

TokenId = Annotated[int, _meta(TOKEN_ID_RANGE)]
TokenIds = Annotated[list[TokenId], Meta(min_length=1)]
NonEmptyText = Annotated[str, Meta(min_length=1)]
Name = Annotated[str, Meta(max_length=MAX_NAME_CHARS)]
# A prompt as the client gave it: text, texts, token ids, or lists of token ids. msgspec unions
# allow one array type, so the list's items are a union; validate.py refuses mixed lists.
Prompt = (
    NonEmptyText
    | Annotated[
        list[NonEmptyText | TokenId | TokenIds],
        Meta(
            min_length=1,
            description="text, texts, token ids, or lists of token ids (one engine request each)",
        ),
    ]
)
StopString = Annotated[str, Meta(min_length=1, max_length=MAX_STOP_CHARS)]
Stop = StopString | Annotated[list[StopString], Meta(max_length=MAX_STOP_STRINGS)]
MaxTokens = _int("max_tokens", "at most max_model_len minus the prompt (or the server's limit)")
MinTokens = _int("min_tokens")
N = _int("n", "completions per prompt (server limit --max-n)")
TopK = _int("top_k", "0 or -1 disables")
Seed = _int("seed")
Logprobs = _int("logprobs", "top-N alternatives per token")
Temperature = _float("temperature", "0 is greedy")
TopP = _float("top_p")
MinP = _float("min_p")
PresencePenalty = _float("presence_penalty")
FrequencyPenalty = _float("frequency_penalty")
RepetitionPenalty = _float("repetition_penalty", "1 disables")
Priority = Annotated[int, _meta(PRIORITY_RANGE, "lower runs first under priority scheduling")]
CacheSalt = Annotated[str, Meta(min_length=1, max_length=MAX_NAME_CHARS)]


class _Body(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Common options of every body: unknown fields refused, fields by keyword only."""


class StreamOptions(_Body, kw_only=True):
    # append a chunk with usage (and empty choices) before [DONE]
    include_usage: bool | None = None


class GenerationBody(_Body, kw_only=True):
    """Fields both generation endpoints take: vLLM's sampling names (skip_special_tokens and
    include_stop_str_in_output are vLLM extensions kept for its users) and the envelope."""

    # must be the served model name (404 otherwise)
    model: Name | None = None
    stream: bool | None = None
    # only with stream=true
    stream_options: StreamOptions | None = None
    # lower runs first under the "priority" scheduling policy
    priority: Priority | None = None
    # separates this request's prefix-cache entries from other tenants'
    cache_salt: CacheSalt | None = None
    # the end user, for abuse monitoring: logged at DEBUG with the request id
    user: Name | None = None
    # None: 16 for completions (OpenAI's default), until max_model_len for chat
    max_tokens: MaxTokens | None = None
    # sampling: SamplingParams' names, defaults and bounds (None: its default)
    temperature: Temperature | None = None
    top_p: TopP | None = None
    top_k: TopK | None = None
    min_p: MinP | None = None
    presence_penalty: PresencePenalty | None = None
    frequency_penalty: FrequencyPenalty | None = None
    repetition_penalty: RepetitionPenalty | None = None
    n: N | None = None
    seed: Seed | None = None
    stop: Stop | None = None
    stop_token_ids: Annotated[list[TokenId], Meta(max_length=MAX_BANNED_TOKEN_IDS - 1)] | None = (
        None
    )
    ignore_eos: bool | None = None
    min_tokens: MinTokens | None = None
    skip_special_tokens: bool | None = None
    include_stop_str_in_output: bool | None = None


class CompletionBody(GenerationBody, kw_only=True):
    """POST /v1/completions."""

    prompt: Prompt
    # top-N logprobs per token (an int here, unlike chat's bool + top_logprobs)
    logprobs: Logprobs | None = None
    # prepend the prompt text to each choice (not with logprobs)
    echo: bool | None = None


class TextPart(_Body, kw_only=True):
    """{"type": "text", "text": ...}: the only content part this server takes."""

    # required: a part without a type is refused, not guessed (msgspec tags would be optional)
    type: Literal["text"]
    text: str


class Message(_Body, kw_only=True):
    # any role the chat template accepts (system, user, assistant, ...)
    role: Annotated[str, Meta(min_length=1, max_length=MAX_NAME_CHARS)]
    content: str | list[TextPart]
    name: Name | None = None


Messages = Annotated[list[Message], Meta(min_length=1)]


class ChatBody(GenerationBody, kw_only=True):
    """POST /v1/chat/completions: messages are rendered with the model's chat template."""

    messages: Messages
    # OpenAI's newer name for max_tokens; wins when both are given
    max_completion_tokens: MaxTokens | None = None
    logprobs: bool | None = None
    # top alternatives per token; needs logprobs=true
    top_logprobs: Logprobs | None = None
    add_generation_prompt: bool | None = None


class EmbeddingBody(_Body, kw_only=True):
    """POST /v1/embeddings."""

    input: Prompt
    model: Name | None = None
    # base64 packs little-endian float32s (what the openai client asks for by default)
    encoding_format: Literal["float", "base64"] | None = None
    user: Name | None = None


class TokenizeBody(_Body, kw_only=True):
    """POST /tokenize: exactly one of prompt or messages."""

    model: Name | None = None
    prompt: str | None = None
    messages: Messages | None = None
    add_special_tokens: bool | None = None
    add_generation_prompt: bool | None = None


class DetokenizeBody(_Body, kw_only=True):
    """POST /detokenize."""

    tokens: list[TokenId]
    model: Name | None = None


def fields(body: type[msgspec.Struct]) -> frozenset[str]:
    """The wire names a body accepts."""
    return frozenset(body.__struct_fields__)


COMPLETION_FIELDS = fields(CompletionBody)
CHAT_FIELDS = fields(ChatBody)
EMBEDDING_FIELDS = fields(EmbeddingBody)
# the names SamplingParams and the bodies share (copied across when given)
SAMPLING_FIELDS = fields(GenerationBody) & (set(INT_RANGES) | set(FLOAT_RANGES)) | {
    "stop",
    "stop_token_ids",
    "ignore_eos",
    "skip_special_tokens",
    "include_stop_str_in_output",
}
# every body, in the order /openapi.json lists them
BODIES: tuple[type[msgspec.Struct], ...] = (
    CompletionBody,
    ChatBody,
    EmbeddingBody,
    TokenizeBody,
    DetokenizeBody,
)
