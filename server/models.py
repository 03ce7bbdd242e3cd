"""GET /v1/models and /v1/models/{model}: the served model's card, then one per LoRA adapter
(vLLM's shape: an adapter's `root` is its path, its `parent` the served model's id)."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from jaxserve.lora.request import LoRARequest
from server.request_io import check_model
from server.state import STATE_KEY, ServerState


async def list_models(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    cards = [base_card(state)] + [adapter_card(state, lora) for lora in state.loras.adapters]
    return web.json_response({"object": "list", "data": cards})


async def get_model(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    lora = check_model(state, request.match_info["model"])
    return web.json_response(base_card(state) if lora is None else adapter_card(state, lora))


def base_card(state: ServerState) -> dict[str, Any]:
    return {
        "id": state.model_name,
        "object": "model",
        "created": state.created,
        "owned_by": "jaxserve",
        "root": state.engine.model_name,
        "parent": None,
        "max_model_len": state.engine.max_model_len,
    }


def adapter_card(state: ServerState, lora: LoRARequest) -> dict[str, Any]:
    return {
        "id": lora.lora_name,
        "object": "model",
        "created": state.created,
        "owned_by": "jaxserve",
        "root": lora.lora_path,
        "parent": state.model_name,
        # an adapter changes weights, not the context: the base model's limit holds
        "max_model_len": state.engine.max_model_len,
    }
