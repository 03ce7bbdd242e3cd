"""POST /v1/load_lora_adapter and /v1/unload_lora_adapter (vLLM's runtime LoRA API), and the
loading of --lora-modules at startup.

The routes exist only when the engine serves LoRA (--enable-lora) and runtime updates are on
(the default; --no-runtime-lora-updating turns them off): elsewhere they are 404 like any
unknown path. They live under /v1/, so --api-key guards them (app.PROTECTED_PREFIXES).
Success is vLLM's plain-text sentence, which clients written for vLLM print or ignore.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Annotated

import msgspec
from aiohttp import web
from msgspec import Meta

from jaxserve.sampling_params import check_text
from server import request_io, validate
from server.errors import APIError, bad_request
from server.lora import LoRAModule
from server.protocol import MAX_NAME_CHARS, _Body
from server.request_io import read_body
from server.state import STATE_KEY

logger = logging.getLogger(__name__)

# Characters in an adapter path: a path, not a payload (Linux's PATH_MAX).
MAX_PATH_CHARS = 4096
LoRAName = Annotated[str, Meta(min_length=1, max_length=MAX_NAME_CHARS)]
LoRAPath = Annotated[str, Meta(min_length=1, max_length=MAX_PATH_CHARS)]
LoRAIntId = Annotated[int, Meta(ge=1, le=2**31 - 1)]


class LoadLoRABody(_Body, kw_only=True):
    """POST /v1/load_lora_adapter."""

    # the name requests select it by (`model`); not the served model's, nor a loaded one's
    lora_name: LoRAName
    # the adapter's directory on the server (PEFT: adapter_config.json + safetensors)
    lora_path: LoRAPath


class UnloadLoRABody(_Body, kw_only=True):
    """POST /v1/unload_lora_adapter: by name, or by the id the server gave it (vLLM's
    lora_int_id); both given must name the same adapter."""

    lora_name: LoRAName | None = None
    lora_int_id: LoRAIntId | None = None


# the request bodies, in the order /openapi.json lists them
BODIES: tuple[type[msgspec.Struct], ...] = (LoadLoRABody, UnloadLoRABody)


def _checked(value: str | None, field: str) -> None:
    """NUL in a path is refused here: the OS cannot open it, and the engine's error would
    not name the field."""
    if value is None:
        return
    try:
        check_text(value, field)
    except ValueError as e:
        raise bad_request(str(e), field) from None
    if "\x00" in value:
        raise bad_request(f"{field} must not contain NUL characters", field)


async def load_lora_adapter(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    body = validate.decode(await read_body(request), LoadLoRABody)
    _checked(body.lora_name, "lora_name")
    _checked(body.lora_path, "lora_path")
    try:
        await state.loras.load(state.engine, body.lora_name, body.lora_path)
    except APIError:
        raise
    except Exception as e:  # a dead engine -> 503, as for generation
        raise request_io.engine_error(e, frozenset({"lora_path"})) from None
    return web.Response(text=f"Success: LoRA adapter '{body.lora_name}' added successfully.")


async def unload_lora_adapter(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    body = validate.decode(await read_body(request), UnloadLoRABody)
    _checked(body.lora_name, "lora_name")
    lora = state.loras.find(body.lora_name, body.lora_int_id)
    try:
        await state.loras.unload(state.engine, lora)
    except Exception as e:
        raise request_io.engine_error(e, frozenset()) from None
    return web.Response(text=f"Success: LoRA adapter '{lora.lora_name}' removed successfully.")


ROUTES = [
    ("POST", "/v1/load_lora_adapter", load_lora_adapter),
    ("POST", "/v1/unload_lora_adapter", unload_lora_adapter),
]

# the --lora-modules of an app, loaded by its on_startup hook
MODULES_KEY = web.AppKey("lora_modules", tuple)


async def load_lora_modules(app: web.Application) -> None:
    """on_startup: adds every --lora-modules adapter before the first request; a bad one
    stops the startup with a ValueError naming the module and the reason."""
    state = app[STATE_KEY]
    modules: Sequence[LoRAModule] = app[MODULES_KEY]
    for m in modules:
        try:
            await state.loras.load(state.engine, m.name, m.path)
        except APIError as e:
            raise ValueError(f"--lora-modules {m.name}={m.path}: {e.message}") from None
    if modules:
        logger.info(
            "serving %d LoRA adapters: %s", len(modules), ", ".join(m.name for m in modules)
        )
