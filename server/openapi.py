"""GET /openapi.json: OpenAPI 3.1, generated from the msgspec Structs.

Request schemas come from the very Structs that validate the bodies (server/protocol.py), so
the document cannot drift from what the server enforces; response schemas come from the
Structs below, which describe the JSON the handlers write (the schemathesis test checks every
response against them). tests/server/test_metrics_openapi.py fails if a route is missing.
"""

from __future__ import annotations

import functools
from typing import Any, Literal

import msgspec

import jaxserve
from server import lora_api, protocol

# -- responses --------------------------------------------------------------------------------


class _Out(msgspec.Struct, kw_only=True):
    """Response shapes: extra fields allowed (clients must ignore what they do not know)."""


class ErrorDetail(_Out):
    message: str
    type: str
    # the request field at fault, e.g. "messages[0].role"
    param: str | None
    code: str | None


class Error(_Out):
    error: ErrorDetail


class PromptTokensDetails(_Out):
    cached_tokens: int


class Usage(_Out):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


class CompletionLogprobs(_Out):
    tokens: list[str]
    # null for the first prompt token of an echo (nothing predicts it)
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class PromptLogprob(_Out):
    logprob: float
    rank: int | None
    decoded_token: str


# vLLM's prompt_logprobs: per prompt token, null (the first) or token id -> its logprob
PromptLogprobs = list[dict[str, PromptLogprob] | None]


class CompletionChoice(_Out):
    index: int
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: str | None
    # the stop string or stop token id that ended the choice
    stop_reason: int | str | None
    # only when the request sent prompt_logprobs
    prompt_logprobs: PromptLogprobs | None = None


class CompletionResponse(_Out):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class TopLogprob(_Out):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(TopLogprob, kw_only=True):
    logprob: float | None
    top_logprobs: list[TopLogprob]


class ChatLogprobs(_Out):
    content: list[TokenLogprob]


class ToolCallFunction(_Out):
    name: str
    # the arguments object as JSON text
    arguments: str


class ToolCall(_Out):
    id: str
    type: Literal["function"]
    function: ToolCallFunction


class ChatMessage(_Out):
    role: Literal["assistant"]
    # null when the model only called tools (or only reasoned)
    content: str | None
    # with --reasoning-parser: the <think> part
    reasoning_content: str | None = None
    # the calls the model made (finish_reason "tool_calls")
    tool_calls: list[ToolCall] | None = None


class ChatChoice(_Out):
    index: int
    message: ChatMessage
    logprobs: ChatLogprobs | None
    finish_reason: str | None
    stop_reason: int | str | None


class ChatResponse(_Out):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    # only when the request sent prompt_logprobs
    prompt_logprobs: PromptLogprobs | None = None


class Embedding(_Out):
    object: Literal["embedding"]
    index: int
    # floats, or base64 of little-endian float32s
    embedding: list[float] | str


class EmbeddingUsage(_Out):
    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(_Out):
    object: Literal["list"]
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage


class ModelCard(_Out):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    # the served model: its path; a LoRA adapter: its directory
    root: str
    # a LoRA adapter: the served model's id; the served model: null
    parent: str | None
    max_model_len: int


class ModelList(_Out):
    object: Literal["list"]
    data: list[ModelCard]


class TokenizeResponse(_Out):
    tokens: list[int]
    count: int
    max_model_len: int


class DetokenizeResponse(_Out):
    prompt: str


class Version(_Out):
    version: str


class Status(_Out):
    status: str
    reason: str | None = None


_RESPONSES = (
    Error,
    CompletionResponse,
    ChatResponse,
    EmbeddingResponse,
    ModelList,
    ModelCard,
    TokenizeResponse,
    DetokenizeResponse,
    Version,
    Status,
)
_REF = "#/components/schemas/{name}"

# -- paths ------------------------------------------------------------------------------------

_WHY = {
    400: "invalid request; error.param names the field",
    401: "missing or wrong API key",
    404: "unknown model",
    413: "request body too large",
    429: "engine queue full (see Retry-After)",
    503: "engine dead or server draining",
}
_GEN_CODES = (400, 401, 404, 413, 429, 503)


def _ref(struct: type) -> dict[str, str]:
    return {"$ref": _REF.format(name=struct.__name__)}


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {"content": {"application/json": {"schema": schema}}}


def _responses(ok: dict[str, Any], codes: tuple[int, ...]) -> dict[str, Any]:
    errors = {str(c): {"description": _WHY[c], **_json(_ref(Error))} for c in codes}
    return {"200": {"description": "OK", **ok}, **errors}


def _post(
    summary: str, body: type, response: type, codes: tuple[int, ...], *, sse: bool = False
) -> dict[str, Any]:
    ok = _json(_ref(response))
    if sse:
        # One schema per event (OpenAPI 3.2's SSE reading, as schemathesis validates it): every
        # event's data is a JSON chunk of `response`'s stream form or an error body, and the
        # last one is the literal [DONE].
        ok["content"]["text/event-stream"] = {
            "schema": {
                "type": "object",
                "properties": {"data": {"type": "string"}, "event": {"type": "string"}},
                "required": ["data"],
                "description": "data: {chunk}\\n\\n ... data: [DONE]",
            }
        }
    return {
        "post": {
            "summary": summary,
            "requestBody": {"required": True, **_json(_ref(body))},
            "responses": _responses(ok, codes),
        }
    }


def _get(summary: str, response: type | None, codes: tuple[int, ...] = ()) -> dict[str, Any]:
    ok = (
        _json(_ref(response))
        if response is not None
        else {"content": {"text/plain": {"schema": {"type": "string"}}}}
    )
    return {"get": {"summary": summary, "responses": _responses(ok, codes)}}


def _lora_paths() -> dict[str, Any]:
    """server/lora_api.py's routes (served with --enable-lora)."""
    ok = {"content": {"text/plain": {"schema": {"type": "string"}}}}
    load = _post(
        "Adds a LoRA adapter (PEFT directory on the server) that requests then select by "
        "`model`. 400 names lora_name (taken) or lora_path (what is wrong with the adapter).",
        lora_api.LoadLoRABody,
        Error,
        (400, 401, 413, 503),
    )
    unload = _post(
        "Removes a LoRA adapter (by lora_name or lora_int_id): new requests selecting it get "
        "404 at once; it returns once the adapter's running requests have finished.",
        lora_api.UnloadLoRABody,
        Error,
        (400, 401, 404, 413, 503),
    )
    for path in (load, unload):
        path["post"]["responses"]["200"] = {"description": "OK", **ok}
    unload["post"]["responses"]["404"]["description"] = "no such LoRA adapter"
    return {"/v1/load_lora_adapter": load, "/v1/unload_lora_adapter": unload}


@functools.lru_cache(maxsize=4)
def spec(model_name: str, *, lora_routes: bool = False) -> dict[str, Any]:
    """The document (built once per served name; callers must not mutate it);
    `lora_routes`: the server serves server/lora_api.py's routes."""
    bodies = (*protocol.BODIES, *(lora_api.BODIES if lora_routes else ()))
    _, schemas = msgspec.json.schema_components((*bodies, *_RESPONSES), ref_template=_REF)
    model_path = _get("One model card.", ModelCard, (401, 404))
    model_path["get"]["parameters"] = [
        {"name": "model", "in": "path", "required": True, "schema": {"type": "string"}}
    ]
    probe = "Liveness: 503 if the engine is dead or has pending work and no heartbeat for 5 s."
    paths = {
        "/v1/completions": _post(
            "Text completions. Unknown fields are rejected (400). Multiple prompts and n > 1 "
            "give choices indexed prompt_idx * n + i. At most one output constraint "
            "(response_format, structured_outputs, guided_*) per request; echo with logprobs "
            "returns the prompt's tokens first (the first one's logprob is null).",
            protocol.CompletionBody,
            CompletionResponse,
            _GEN_CODES,
            sse=True,
        ),
        "/v1/chat/completions": _post(
            "Chat completions: messages are rendered with the model's chat template (or "
            "--chat-template). Tools the template ignores go into the system turn; tool calls "
            "are parsed (tool_choice auto) or grammar-forced (required, a named function).",
            protocol.ChatBody,
            ChatResponse,
            _GEN_CODES,
            sse=True,
        ),
        "/v1/embeddings": _post(
            "Embeddings: the mean of the final hidden states over the prompt's tokens, "
            "L2-normalized. base64 packs little-endian float32.",
            protocol.EmbeddingBody,
            EmbeddingResponse,
            _GEN_CODES,
        ),
        "/v1/models": _get("The served model, then its LoRA adapters.", ModelList, (401,)),
        "/v1/models/{model}": model_path,
        "/tokenize": _post(
            "Token ids of a prompt, or of messages rendered with the chat template.",
            protocol.TokenizeBody,
            TokenizeResponse,
            (400, 401, 404, 413),
        ),
        "/detokenize": _post(
            "Text of token ids.",
            protocol.DetokenizeBody,
            DetokenizeResponse,
            (400, 401, 404, 413),
        ),
        "/version": _get("The jaxserve version.", Version),
        "/livez": _get(probe, Status, (503,)),
        "/readyz": _get(
            "Readiness: 200 only when loaded, warmed up, not draining and the engine alive.",
            Status,
            (503,),
        ),
        "/health": _get(
            "A real one-token generation through the engine, cached for 5 s.", Status, (503,)
        ),
        "/metrics": _get("Prometheus metrics.", None),
        "/openapi.json": _get("This document.", None),
        **(_lora_paths() if lora_routes else {}),
    }
    paths["/openapi.json"]["get"]["responses"]["200"] = {
        "description": "OK",
        **_json({"type": "object"}),
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "jaxserve OpenAI-compatible API",
            "version": jaxserve.__version__,
            "description": f"Serving {model_name}.",
        },
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }
