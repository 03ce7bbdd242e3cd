"""What every handler does with a request around the engine: read the body, check the model,
tokenize or render the prompt (off the event loop when long), and map engine errors to HTTP.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, TypeVar

from aiohttp import web

from jaxserve.core import admission
from jaxserve.engine.client import EngineDeadError, EngineOverloadedError
from jaxserve.lora.request import LoRARequest
from jaxserve.tokenizer import apply_chat_template
from server import chat_args, validate
from server.errors import APIError, bad_request, param_from_message
from server.fanout import EnginePrompt
from server.state import STATE_KEY, ServerState
from server.tools.definitions import ToolChoice, ToolRequest
from server.tools.prompting import prepare_messages

# A chat without tools (its assistant tool_calls and tool messages are still rendered)
NO_TOOLS = ToolRequest([], ToolChoice("none"), is_parallel=True)

T = TypeVar("T")

# Seconds a client should wait after a 429: the queue drains as running requests finish.
RETRY_AFTER_S = 1
# Text longer than this many characters (a prompt, or a chat's messages in all) is tokenized
# and rendered off the event loop: a 2 KB prompt encodes in well under a millisecond, a 7 MB
# chat body takes seconds, and /livez must answer meanwhile.
OFFLOAD_CHARS = 2048


def engine_error(e: Exception, fields: frozenset[str]) -> APIError:
    """What the engine raised -> the HTTP error the client gets (unknown types re-raise)."""
    if isinstance(e, APIError):
        return e
    if isinstance(e, EngineOverloadedError):
        return APIError(
            429,
            f"the server is overloaded ({e}); retry later",
            code="overloaded",
            headers={"Retry-After": str(RETRY_AFTER_S)},
        )
    if isinstance(e, EngineDeadError):
        return APIError(
            503,
            f"the engine is unavailable: {e}; retry later",
            code="engine_unavailable",
            headers={"Retry-After": str(RETRY_AFTER_S)},
        )
    if isinstance(e, ValueError):
        return bad_request(str(e), param_from_message(str(e), fields))
    raise e


async def read_body(request: web.Request) -> bytes:
    # request.read() enforces client_max_size (413) before the body is held in memory, but
    # only as bytes arrive: a Content-Length over it is refused now, not after a wait for
    # bytes that may never come
    max_size = request.app[STATE_KEY].limits.max_body_bytes
    if request.content_length is not None and request.content_length > max_size:
        raise web.HTTPRequestEntityTooLarge(max_size=max_size, actual_size=request.content_length)
    return await request.read()


async def off_loop(num_chars: int, fn: Callable[[], T]) -> T:
    """fn() here when the text is small; in the default executor when it is not."""
    if num_chars <= OFFLOAD_CHARS:
        return fn()
    return await asyncio.get_running_loop().run_in_executor(None, fn)


def check_model(state: ServerState, model: str | None) -> LoRARequest | None:
    """What `model` selects: None for the served model (or no `model`), a LoRA adapter by
    its name; 404 naming `model` for anything else (server/lora.py)."""
    return state.loras.resolve(model)


async def tokenize_text(
    state: ServerState, text: str, add_special_tokens: bool = True
) -> list[int]:
    tokenizer = state.engine.tokenizer
    return await off_loop(
        len(text), lambda: list(tokenizer.encode(text, add_special_tokens=add_special_tokens))
    )


async def tokenize_all(state: ServerState, prompts: list[validate.RawPrompt]) -> list[list[int]]:
    """Token ids of every prompt (ids pass through), in one trip off the loop if long."""
    tokenizer = state.engine.tokenizer

    def encode() -> list[list[int]]:
        return [list(tokenizer.encode(p)) if isinstance(p, str) else p for p in prompts]

    return await off_loop(sum(len(p) for p in prompts if isinstance(p, str)), encode)


def check_prompt_len(state: ServerState, ids: list[int], param: str) -> None:
    """The engine's rule (core/admission.py), here so the 400 names the field as sent."""
    try:
        admission.check_prompt_len(len(ids), state.engine.max_model_len, param)
    except ValueError as e:
        raise bad_request(str(e), param) from None


def decode_prompt(tokenizer: Any, prompt: EnginePrompt) -> str:
    try:
        return tokenizer.decode(prompt.token_ids, skip_special_tokens=False)
    except Exception:  # ids outside the tokenizer's vocab: the engine rejects them next
        raise bad_request("prompt holds token ids outside the vocabulary", "prompt") from None


async def render_chat_request(
    state: ServerState, req: validate.ChatRequest | validate.TokenizeRequest
) -> list[int]:
    """render_chat with a chat (or /tokenize) request's rendering fields."""
    assert req.messages is not None
    return await render_chat(
        state,
        req.messages,
        req.add_generation_prompt,
        tools=req.tools if req.tools is not None else NO_TOOLS,
        continue_final_message=req.continue_final_message,
        template_kwargs=req.chat_template_kwargs,
    )


async def render_chat(
    state: ServerState,
    messages: list[dict],
    add_generation_prompt: bool,
    *,
    tools: ToolRequest = NO_TOOLS,
    continue_final_message: bool = False,
    template_kwargs: dict[str, Any] | None = None,
) -> list[int]:
    """The chat template's prompt ids (off the event loop for long conversations).

    Tools reach the template when it renders them, else the system turn (server/tools/
    prompting.py); past calls and tool results are rendered the same way."""
    tokenizer = state.engine.tokenizer
    chat = state.chat
    extra = sum(len(str(t.parameters)) + len(t.description or "") for t in tools.tools)

    def render() -> list[int]:
        prepared, tools_arg = prepare_messages(messages, tools, chat.tool_support)
        return apply_chat_template(
            tokenizer,
            prepared,
            add_generation_prompt=add_generation_prompt,
            chat_template=chat.template,
            allow_special_tokens_in_content=state.allow_special_tokens_in_content,
            tools=tools_arg,
            continue_final_message=continue_final_message,
            template_kwargs=template_kwargs,
        )

    try:
        return await off_loop(chat_args.message_chars(messages) + extra, render)
    except ValueError as e:
        raise bad_request(str(e), param_from_message(str(e), {"messages"}) or "messages") from None
    except Exception as e:  # a template error (jinja raise_exception) on these messages
        raise bad_request(f"the chat template rejected the messages: {e}", "messages") from None
