"""OpenAI request bodies, declared once as msgspec Structs: decoding validates them and
/openapi.json is generated from them (server/openapi.py).

Strict by design: an unknown field is a 400 naming it, not silently ignored, so a client
that sends `best_of` or `guided_decoding_backend` learns that this server does not do them
instead of getting subtly different results. Numeric bounds come from
jaxserve/sampling_params.py (the one table SamplingParams checks offline too); limits an
operator sets per server (--max-n, max_model_len, ...) are checked after decoding, in
server/validate.py.

Every optional field also takes null, meaning "not given" (some clients send nulls).
"""

from dataclasses import dataclass
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

from jaxserve.sampling_params import (
    FLOAT_RANGES,
    INT_RANGES,
    LOGIT_BIAS_RANGE,
    MAX_ALLOWED_TOKEN_IDS,
    MAX_BAD_WORDS,
    MAX_BANNED_TOKEN_IDS,
    MAX_LOGIT_BIAS,
    MAX_LOGPROBS,
    MAX_STOP_STRINGS,
    PRIORITY_RANGE,
    TOKEN_ID_RANGE,
    Range,
)
from jaxserve.structured_output.params import MAX_CHOICES, MAX_SPEC_CHARS
from server.tools.protocol import MessageToolCall, ToolChoiceField, Tools


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
    # every chunk also carries the usage so far (vLLM's extension)
    continuous_usage_stats: bool | None = None


# -- structured output (server/constraints.py maps these to StructuredOutputsParams) ----------

# A JSON Schema as sent: an object (its JSON text is bounded by MAX_SPEC_CHARS once encoded)
JsonSchemaObject = Annotated[dict[str, Any], Meta(max_length=256)]
# regexes, grammars and whitespace patterns: bounded text compiled by llguidance
SpecText = Annotated[str, Meta(min_length=1, max_length=MAX_SPEC_CHARS)]
ChoiceText = Annotated[str, Meta(max_length=MAX_SPEC_CHARS)]
Choices = Annotated[list[ChoiceText], Meta(min_length=1, max_length=MAX_CHOICES)]
SchemaName = Annotated[str, Meta(pattern=r"^[A-Za-z0-9_-]{1,64}$")]


class JsonSchemaFormat(_Body, kw_only=True):
    """response_format.json_schema: OpenAI's fields (the schema is always enforced)."""

    # the schema's name (OpenAI requires it; informational here)
    name: SchemaName
    description: Annotated[str, Meta(max_length=MAX_SPEC_CHARS)] | None = None
    # None: any JSON object
    schema: JsonSchemaObject | None = None
    # OpenAI's "follow the schema exactly": true or not, the schema is enforced by the grammar
    strict: bool | None = None


class TextFormat(_Body, tag_field="type", tag="text", kw_only=True):
    """{"type": "text"}: no constraint (the default)."""


class JsonObjectFormat(_Body, tag_field="type", tag="json_object", kw_only=True):
    """{"type": "json_object"}: the output is one JSON object."""


class JsonSchemaResponseFormat(_Body, tag_field="type", tag="json_schema", kw_only=True):
    """{"type": "json_schema", "json_schema": {...}}: the output validates against it."""

    json_schema: JsonSchemaFormat


ResponseFormat = TextFormat | JsonObjectFormat | JsonSchemaResponseFormat


class StructuredOutputs(_Body, kw_only=True):
    """vLLM's `structured_outputs` extra (StructuredOutputsParams' names): exactly one of
    json / regex / choice / grammar / json_object."""

    # a JSON Schema (an object, or its JSON text)
    json: JsonSchemaObject | SpecText | None = None
    regex: SpecText | None = None
    choice: Choices | None = None
    # a Lark grammar (llguidance's dialect; GBNF is converted)
    grammar: SpecText | None = None
    json_object: bool | None = None
    # JSON only: no whitespace between JSON tokens
    disable_any_whitespace: bool | None = None
    # JSON only: the whitespace allowed between JSON tokens, as a regex
    whitespace_pattern: SpecText | None = None


# logit_bias: OpenAI's JSON object of token id (a decimal string) -> bias in [-100, 100]
LogitBiasKey = Annotated[str, Meta(pattern=r"^[0-9]{1,10}$")]
LogitBias = Annotated[
    dict[LogitBiasKey, Annotated[float, _meta(LOGIT_BIAS_RANGE)]],
    Meta(max_length=MAX_LOGIT_BIAS, description="token id -> bias added to its logit"),
]
BadWord = Annotated[str, Meta(min_length=1, max_length=MAX_STOP_CHARS)]
# chat_template_kwargs: extra variables for the chat template (e.g. enable_thinking), JSON
# scalars only under identifier names; the template's own variables cannot be overridden
TemplateKwargName = Annotated[str, Meta(pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")]
TemplateKwargValue = bool | int | float | Annotated[str, Meta(max_length=4096)] | None
ChatTemplateKwargs = Annotated[dict[TemplateKwargName, TemplateKwargValue], Meta(max_length=32)]


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
    # the end user, for abuse monitoring: logged at INFO with the request id
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
    # OpenAI's newer name for max_tokens; wins when both are given (both endpoints)
    max_completion_tokens: MaxTokens | None = None
    # token id (as a string) -> bias in [-100, 100] added to its logit on device
    logit_bias: LogitBias | None = None
    # only these token ids may be generated
    allowed_token_ids: (
        Annotated[list[TokenId], Meta(min_length=1, max_length=MAX_ALLOWED_TOKEN_IDS)] | None
    ) = None
    # words (strings) that are never generated
    bad_words: Annotated[list[BadWord], Meta(max_length=MAX_BAD_WORDS)] | None = None
    # top-N logprobs of every prompt token (vLLM's extension; not with stream=true)
    prompt_logprobs: Logprobs | None = None
    # the output follows a JSON schema / any JSON object (OpenAI)
    response_format: ResponseFormat | None = None
    # vLLM's constraint fields; at most one constraint source per request
    structured_outputs: StructuredOutputs | None = None
    guided_json: JsonSchemaObject | SpecText | None = None
    guided_regex: SpecText | None = None
    guided_choice: Choices | None = None
    guided_grammar: SpecText | None = None
    # with guided_json / a JSON response_format: the whitespace between JSON tokens, a regex
    guided_whitespace_pattern: SpecText | None = None


class CompletionBody(GenerationBody, kw_only=True):
    """POST /v1/completions."""

    prompt: Prompt
    # top-N logprobs per token (an int here, unlike chat's bool + top_logprobs)
    logprobs: Logprobs | None = None
    # prepend the prompt text to each choice; with logprobs, the prompt tokens' logprobs too
    echo: bool | None = None


class TextPart(_Body, kw_only=True):
    """{"type": "text", "text": ...}: the only content part this server takes."""

    # required: a part without a type is refused, not guessed (msgspec tags would be optional)
    type: Literal["text"]
    text: str


class Message(_Body, kw_only=True):
    # any role the chat template accepts (system, user, assistant, tool, ...)
    role: Annotated[str, Meta(min_length=1, max_length=MAX_NAME_CHARS)]
    # None only for an assistant message that holds tool_calls
    content: str | list[TextPart] | None = None
    name: Name | None = None
    # an assistant message's past function calls
    tool_calls: Annotated[list[MessageToolCall], Meta(max_length=128)] | None = None
    # a `tool` message: the id of the call it answers
    tool_call_id: Annotated[str, Meta(min_length=1, max_length=MAX_NAME_CHARS)] | None = None
    # an assistant turn's reasoning as this server returned it (clients send their history
    # back as they got it); handed to the template, which renders it or not (Qwen3's does)
    reasoning_content: str | None = None


Messages = Annotated[list[Message], Meta(min_length=1)]


class ChatBody(GenerationBody, kw_only=True):
    """POST /v1/chat/completions: messages are rendered with the model's chat template."""

    messages: Messages
    logprobs: bool | None = None
    # top alternatives per token; needs logprobs=true
    top_logprobs: Logprobs | None = None
    # None: true, unless continue_final_message
    add_generation_prompt: bool | None = None
    # render the last (assistant) message open, so the model continues it
    continue_final_message: bool | None = None
    # extra variables for the chat template (e.g. {"enable_thinking": false})
    chat_template_kwargs: ChatTemplateKwargs | None = None
    # functions the model may call (server/tools/)
    tools: Tools | None = None
    # "none", "auto" (the default with tools), "required", or {"type": "function", ...}
    tool_choice: ToolChoiceField | None = None
    # may one turn hold several calls (default true)
    parallel_tool_calls: bool | None = None


class EmbeddingBody(_Body, kw_only=True):
    """POST /v1/embeddings."""

    input: Prompt
    model: Name | None = None
    # base64 packs little-endian float32s (what the openai client asks for by default)
    encoding_format: Literal["float", "base64"] | None = None
    user: Name | None = None


class TokenizeBody(_Body, kw_only=True):
    """POST /tokenize: exactly one of prompt or messages (rendered as chat would render
    them, with the same template options and tools)."""

    model: Name | None = None
    prompt: str | None = None
    messages: Messages | None = None
    add_special_tokens: bool | None = None
    add_generation_prompt: bool | None = None
    continue_final_message: bool | None = None
    chat_template_kwargs: ChatTemplateKwargs | None = None
    # rendered as under tool_choice "auto"
    tools: Tools | None = None


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
TOKENIZE_FIELDS = fields(TokenizeBody)
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
