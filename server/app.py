"""The app factory: make_app(engine) -> an aiohttp Application serving the OpenAI API.

Routes are listed in ROUTES (and described in openapi.py, which a test keeps complete).
Generation lives in generation.py (its choices in choices.py, the request plumbing both use in
request_io.py); this module holds the small endpoints and the wiring.
"""

from __future__ import annotations

import base64
import hmac
import logging
import struct
from collections.abc import Awaitable, Callable, Sequence

from aiohttp import web

import jaxserve
from jaxserve.core.admission import check_embed_len
from jaxserve.engine.client import EngineClient
from jaxserve.metrics import CONTENT_TYPE, ServerMetrics
from server import (
    generation,
    health,
    lora_api,
    models,
    openapi,
    protocol,
    request_io,
    responses,
    validate,
)
from server.chat_config import make_chat_config
from server.connections import connection_middleware, set_server_header
from server.errors import APIError, bad_request, error_middleware
from server.lora import LoRAModule, check_lora_modules
from server.request_io import check_model, read_body
from server.security import POLICY_KEY, BrowserPolicy, add_cors_headers, security_middleware
from server.state import STATE_KEY, ServerState

logger = logging.getLogger(__name__)


async def embeddings(request: web.Request) -> web.Response:
    """One embedding per input: the mean of the final hidden states over the prompt's tokens,
    L2-normalized (computed by the engine). `encoding_format: base64` packs little-endian
    float32s, which is what the openai client asks for by default."""
    state = request.app[STATE_KEY]
    req = validate.parse_embedding(await read_body(request), state.limits)
    if check_model(state, req.model) is not None:
        # EngineClient.embed takes no adapter: answering with the base model's embedding
        # would ignore the field
        raise bad_request(
            f"model: {req.model!r} is a LoRA adapter; embeddings come from the served model "
            f"{state.model_name!r} only",
            "model",
        )
    if req.user is not None:
        logger.info("embeddings from user %r", req.user)
    all_ids = await request_io.tokenize_all(state, req.inputs)
    for i, ids in enumerate(all_ids):
        param = "input" if len(req.inputs) == 1 else f"input[{i}]"
        try:
            check_embed_len(len(ids), state.engine.max_model_len, param)
        except ValueError as e:
            raise bad_request(str(e), param) from None
    data = []
    with state.admit():
        for i, ids in enumerate(all_ids):
            try:
                vector = await state.engine.embed(ids)
            except Exception as e:
                raise request_io.engine_error(e, frozenset({"input"})) from None
            if req.encoding_format == "base64":
                packed = struct.pack(f"<{len(vector)}f", *vector)
                embedding: list[float] | str = base64.b64encode(packed).decode()
            else:
                embedding = list(vector)
            data.append({"object": "embedding", "index": i, "embedding": embedding})
    num_tokens = sum(len(ids) for ids in all_ids)
    return web.json_response(
        {
            "object": "list",
            "data": data,
            "model": state.model_name,
            "usage": {"prompt_tokens": num_tokens, "total_tokens": num_tokens},
        }
    )


async def tokenize(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    req = validate.parse_tokenize(await read_body(request))
    check_model(state, req.model)
    if req.prompt is not None:
        tokens = await request_io.tokenize_text(state, req.prompt, req.add_special_tokens)
    else:
        tokens = await request_io.render_chat_request(state, req)
    return web.json_response(
        {"tokens": tokens, "count": len(tokens), "max_model_len": state.engine.max_model_len}
    )


async def detokenize(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    req = validate.parse_detokenize(await read_body(request))
    check_model(state, req.model)
    tokenizer = state.engine.tokenizer
    vocab_size = len(tokenizer)
    # max() first: a C loop over the ids; the Python search runs only for a bad id
    if req.tokens and max(req.tokens) >= vocab_size:
        bad = next(i for i, t in enumerate(req.tokens) if t >= vocab_size)
        raise bad_request(
            f"tokens[{bad}] = {req.tokens[bad]} is outside the vocabulary [0, {vocab_size})",
            f"tokens[{bad}]",
        )
    # ~4 characters a token: long id lists decode off the event loop, as long texts encode
    text = await request_io.off_loop(4 * len(req.tokens), lambda: tokenizer.decode(req.tokens))
    return web.json_response({"prompt": text})


async def version(request: web.Request) -> web.Response:
    return web.json_response({"version": jaxserve.__version__})


async def metrics(request: web.Request) -> web.Response:
    body = request.app[STATE_KEY].metrics.render()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})


async def openapi_json(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    return web.json_response(
        openapi.spec(state.model_name, lora_routes=request.app[LORA_ROUTES_KEY])
    )


# (method, path, handler); paths under PROTECTED_PREFIXES need the API key when one is set
ROUTES: list[tuple[str, str, Callable[[web.Request], Awaitable[web.StreamResponse]]]] = [
    ("POST", "/v1/completions", generation.completions),
    ("POST", "/v1/chat/completions", generation.chat_completions),
    ("POST", "/v1/embeddings", embeddings),
    ("GET", "/v1/models", models.list_models),
    ("GET", "/v1/models/{model}", models.get_model),
    ("POST", "/tokenize", tokenize),
    ("POST", "/detokenize", detokenize),
    ("GET", "/version", version),
    ("GET", "/livez", health.livez),
    ("GET", "/readyz", health.readyz),
    ("GET", "/health", health.health),
    ("GET", "/metrics", metrics),
    ("GET", "/openapi.json", openapi_json),
]
PROTECTED_PREFIXES = ("/v1/", "/tokenize", "/detokenize")
# whether the app serves lora_api.ROUTES (load/unload adapters at runtime)
LORA_ROUTES_KEY = web.AppKey("lora_routes", bool)


@web.middleware
async def auth_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    key = request.app[STATE_KEY].api_key
    if key is None or not request.path.startswith(PROTECTED_PREFIXES):
        return await handler(request)
    given = request.headers.get("Authorization", "")
    # compare_digest: the comparison takes as long whatever prefix of the key matches.
    # surrogateescape: aiohttp decodes header bytes that are not UTF-8 that way; encoding them
    # back gives the bytes on the wire (a plain encode() raised, and answered 500).
    expected = f"Bearer {key}".encode()
    if not hmac.compare_digest(given.encode("utf-8", "surrogateescape"), expected):
        raise APIError(
            401,
            "missing or invalid API key (send Authorization: Bearer <key>)",
            code="invalid_api_key",
            headers={"WWW-Authenticate": "Bearer"},
        )
    return await handler(request)


def make_app(
    engine: EngineClient,
    *,
    api_key: str | None = None,
    served_model_name: str | None = None,
    max_n: int = protocol.Limits.max_n,
    max_prompts: int = protocol.Limits.max_prompts,
    max_tokens_limit: int | None = None,
    max_stop: int = protocol.Limits.max_stop,
    max_logprobs: int = protocol.Limits.max_logprobs,
    max_body_bytes: int = protocol.Limits.max_body_bytes,
    bind_host: str | None = None,
    allowed_hosts: Sequence[str] = (),
    allowed_origins: Sequence[str] = (),
    allow_special_tokens_in_content: bool = False,
    chat_template: str | None = None,
    tool_call_parser: str = "auto",
    reasoning_parser: str | None = None,
    lora_modules: Sequence[LoRAModule] = (),
    runtime_lora_updating: bool = True,
) -> web.Application:
    """The OpenAI-compatible app around `engine`; the caller owns the engine's lifecycle.

    `bind_host`: the address the server listens on; a loopback one turns on the Host check
    (server/security.py). None (unknown, as in tests) leaves it off.
    `chat_template`: the template text replacing the model's (--chat-template);
    `tool_call_parser` / `reasoning_parser`: the flags' values (server/chat_config.py).
    `lora_modules`: adapters added when the app starts (a bad one fails the startup);
    `runtime_lora_updating`: serve /v1/load_lora_adapter and /v1/unload_lora_adapter (only
    ever with an engine that serves LoRA).
    """
    chat = make_chat_config(
        engine.tokenizer,
        chat_template=chat_template,
        tool_call_parser=tool_call_parser,
        reasoning_parser=reasoning_parser,
    )
    limits = protocol.Limits(
        max_n=max_n,
        max_prompts=max_prompts,
        max_tokens=max_tokens_limit,
        max_stop=max_stop,
        max_logprobs=max_logprobs,
        max_body_bytes=max_body_bytes,
    )
    model_name = served_model_name or engine.model_name
    check_lora_modules(lora_modules, enable_lora=engine.lora_enabled, base_name=model_name)
    # connection_middleware is outermost: it only tracks the connection and never raises;
    # then error_middleware, so that refusals (security, auth) and bugs get the OpenAI shape;
    # security before auth: a preflight carries no credentials, a rebinding page gets nothing
    app = web.Application(
        middlewares=[connection_middleware, error_middleware, security_middleware, auth_middleware],
        client_max_size=max_body_bytes,
    )
    app[POLICY_KEY] = BrowserPolicy.make(bind_host, allowed_hosts, allowed_origins)
    app.on_response_prepare.append(set_server_header)
    app.on_response_prepare.append(add_cors_headers)
    app[STATE_KEY] = ServerState(
        engine=engine,
        model_name=model_name,
        limits=limits,
        metrics=ServerMetrics(model_name, lambda: engine.stats),
        api_key=api_key,
        allow_special_tokens_in_content=allow_special_tokens_in_content,
        created=responses.now(),
        chat=chat,
    )
    app[health.HEALTH_KEY] = health.HealthProbe(engine)
    app[lora_api.MODULES_KEY] = tuple(lora_modules)
    app.on_startup.append(lora_api.load_lora_modules)
    app[LORA_ROUTES_KEY] = engine.lora_enabled and runtime_lora_updating
    routes = ROUTES + lora_api.ROUTES if app[LORA_ROUTES_KEY] else ROUTES
    for method, path, handler in routes:
        app.router.add_route(method, path, handler)
    return app
