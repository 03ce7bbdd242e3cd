"""GET /openapi.json: a hand-written OpenAPI 3.1 description of every route.

Hand-written because the request schemas are strict (unknown fields are 400s) and small;
tests/server/test_openapi.py fails if a route in app.ROUTES is missing here.
"""

from __future__ import annotations

from typing import Any

import jaxserve

_ERROR = {"$ref": "#/components/schemas/Error"}


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {"content": {"application/json": {"schema": schema}}}


def _obj(props: dict[str, Any], required: tuple[str, ...] = ()) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": props,
        "required": list(required),
        "additionalProperties": False,
    }


def _errors(*codes: int) -> dict[str, Any]:
    why = {
        400: "invalid request; error.param names the field",
        401: "missing or wrong API key",
        404: "unknown model",
        413: "request body too large",
        429: "engine queue full (see Retry-After)",
        503: "engine dead or server draining",
    }
    return {str(c): {"description": why[c], **_json(_ERROR)} for c in codes}


_INT = {"type": "integer"}
_NUM = {"type": "number"}
_BOOL = {"type": "boolean"}
_STR = {"type": "string"}
_IDS = {"type": "array", "items": {"type": "integer", "minimum": 0}}
_PROMPT = {
    "oneOf": [_STR, {"type": "array", "items": _STR}, _IDS, {"type": "array", "items": _IDS}],
    "description": "text, texts, token ids, or lists of token ids (one engine request each)",
}
_SAMPLING = {
    "model": {**_STR, "description": "must be the served model name (404 otherwise)"},
    "max_tokens": {**_INT, "minimum": 1},
    "temperature": {**_NUM, "minimum": 0, "description": "0 is greedy"},
    "top_p": {**_NUM, "exclusiveMinimum": 0, "maximum": 1},
    "top_k": {**_INT, "minimum": -1, "description": "0 or -1 disables"},
    "min_p": {**_NUM, "minimum": 0, "maximum": 1},
    "presence_penalty": {**_NUM, "minimum": -2, "maximum": 2},
    "frequency_penalty": {**_NUM, "minimum": -2, "maximum": 2},
    "repetition_penalty": {**_NUM, "exclusiveMinimum": 0},
    "n": {**_INT, "minimum": 1, "description": "completions per prompt (server limit --max-n)"},
    "seed": {**_INT, "minimum": 0},
    "stop": {"oneOf": [_STR, {"type": "array", "items": _STR}]},
    "stop_token_ids": _IDS,
    "ignore_eos": _BOOL,
    "min_tokens": {**_INT, "minimum": 0},
    "skip_special_tokens": _BOOL,
    "include_stop_str_in_output": _BOOL,
    "stream": _BOOL,
    "stream_options": _obj({"include_usage": _BOOL}),
    "priority": {**_INT, "description": "lower runs first under priority scheduling"},
    "cache_salt": {**_STR, "description": "separates this request's prefix-cache entries"},
    "user": {**_STR, "description": "accepted and ignored"},
}
_USAGE = _obj(
    {
        "prompt_tokens": _INT,
        "completion_tokens": _INT,
        "total_tokens": _INT,
        "prompt_tokens_details": _obj({"cached_tokens": _INT}),
    }
)
_MESSAGES = {
    "type": "array",
    "minItems": 1,
    "items": _obj(
        {
            "role": _STR,
            "content": {
                "oneOf": [
                    _STR,
                    {"type": "array", "items": _obj({"type": {"const": "text"}, "text": _STR})},
                ]
            },
            "name": _STR,
        },
        ("role", "content"),
    ),
}

_COMPLETION_REQUEST = _obj(
    {
        **_SAMPLING,
        "prompt": _PROMPT,
        "logprobs": {**_INT, "minimum": 0, "maximum": 20, "description": "top-N per token"},
        "echo": {**_BOOL, "description": "prepend the prompt text (not with logprobs)"},
    },
    ("prompt",),
)
_CHAT_REQUEST = _obj(
    {
        **_SAMPLING,
        "messages": _MESSAGES,
        "max_completion_tokens": {**_INT, "minimum": 1},
        "logprobs": _BOOL,
        "top_logprobs": {**_INT, "minimum": 0, "maximum": 20},
        "add_generation_prompt": _BOOL,
    },
    ("messages",),
)
_EMBEDDING_REQUEST = _obj(
    {
        "model": _STR,
        "input": _PROMPT,
        "encoding_format": {"enum": ["float", "base64"]},
        "user": _STR,
    },
    ("input",),
)


def _post(summary: str, request: dict, response: dict, *codes: int, sse: bool = False) -> dict:
    ok = _json(response)
    if sse:
        ok["content"]["text/event-stream"] = {
            "schema": {
                "type": "string",
                "description": "data: {chunk}\\n\\n ... data: [DONE]\\n\\n",
            }
        }
    return {
        "post": {
            "summary": summary,
            "requestBody": {"required": True, **_json(request)},
            "responses": {"200": {"description": "OK", **ok}, **_errors(*codes)},
        }
    }


def _get(summary: str, response: dict, *codes: int, content_type: str = "application/json") -> dict:
    ok = {"content": {content_type: {"schema": response}}}
    return {
        "get": {
            "summary": summary,
            "responses": {"200": {"description": "OK", **ok}, **_errors(*codes)},
        }
    }


_STATUS = _obj({"status": _STR, "reason": _STR})


def spec(model_name: str) -> dict[str, Any]:
    gen_codes = (400, 401, 404, 413, 429, 503)
    model_card = _obj(
        {
            "id": _STR,
            "object": _STR,
            "created": _INT,
            "owned_by": _STR,
            "root": _STR,
            "max_model_len": _INT,
        }
    )
    paths = {
        "/v1/completions": _post(
            "Text completions. Unknown fields are rejected (400). Multiple prompts and n > 1 "
            "give choices indexed prompt_idx * n + i.",
            _COMPLETION_REQUEST,
            {"type": "object", "description": "text_completion with choices and usage"},
            *gen_codes,
            sse=True,
        ),
        "/v1/chat/completions": _post(
            "Chat completions: messages are rendered with the model's chat template.",
            _CHAT_REQUEST,
            {"type": "object", "description": "chat.completion (chat.completion.chunk streamed)"},
            *gen_codes,
            sse=True,
        ),
        "/v1/embeddings": _post(
            "Embeddings: the mean of the final hidden states over the prompt's tokens, "
            "L2-normalized. base64 packs little-endian float32.",
            _EMBEDDING_REQUEST,
            {"type": "object", "description": "list of {object: embedding, index, embedding}"},
            *gen_codes,
        ),
        "/v1/models": _get(
            "The served model.",
            _obj({"object": _STR, "data": {"type": "array", "items": model_card}}),
            401,
        ),
        "/v1/models/{model}": {
            "get": {
                **_get("One model card.", model_card, 401, 404)["get"],
                "parameters": [{"name": "model", "in": "path", "required": True, "schema": _STR}],
            }
        },
        "/tokenize": _post(
            "Token ids of a prompt, or of messages rendered with the chat template.",
            _obj(
                {
                    "model": _STR,
                    "prompt": _STR,
                    "messages": _MESSAGES,
                    "add_special_tokens": _BOOL,
                    "add_generation_prompt": _BOOL,
                }
            ),
            _obj({"tokens": _IDS, "count": _INT, "max_model_len": _INT}),
            400,
            401,
            404,
            413,
        ),
        "/detokenize": _post(
            "Text of token ids.",
            _obj({"model": _STR, "tokens": _IDS}, ("tokens",)),
            _obj({"prompt": _STR}),
            400,
            401,
            404,
            413,
        ),
        "/version": _get("The jaxserve version.", _obj({"version": _STR})),
        "/livez": _get(
            "Liveness: 503 if the engine is dead or has pending work and no heartbeat for 5 s.",
            _STATUS,
            503,
        ),
        "/readyz": _get(
            "Readiness: 200 only when loaded, warmed up, not draining and the engine alive.",
            _STATUS,
            503,
        ),
        "/health": _get(
            "A real one-token generation through the engine, cached for 5 s.", _STATUS, 503
        ),
        "/metrics": _get("Prometheus metrics.", {"type": "string"}, content_type="text/plain"),
        "/openapi.json": _get("This document.", {"type": "object"}),
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
            "schemas": {
                "Error": _obj(
                    {
                        "error": _obj(
                            {
                                "message": _STR,
                                "type": _STR,
                                "param": {"type": ["string", "null"]},
                                "code": {"type": ["string", "null"]},
                            }
                        )
                    }
                ),
                "Usage": _USAGE,
            },
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }
