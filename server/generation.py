"""POST /v1/completions and /v1/chat/completions: prompts in, streamed or whole choices out.

Both endpoints share one path: tokenize (the chat template for chat), fan out one engine
request per prompt, then fold the delta outputs into choices (index = prompt_idx * n +
completion index), emitting each delta as an SSE chunk or collecting them into one body.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from aiohttp import web

from jaxserve.engine.client import EngineDeadError, EngineOverloadedError
from jaxserve.metrics import RequestMetrics
from jaxserve.outputs import CompletionOutput, RequestOutput
from jaxserve.tokenizer import apply_chat_template
from server import protocol, responses, sse, validate
from server.errors import APIError, bad_request, error_body, param_from_message
from server.fanout import EnginePrompt, Fanout
from server.state import STATE_KEY, ServerState

logger = logging.getLogger(__name__)
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


def check_model(state: ServerState, model: str | None) -> None:
    if model is not None and model != state.model_name:
        raise APIError(
            404,
            f"the model {model!r} does not exist; this server serves {state.model_name!r}",
            param="model",
            code="model_not_found",
        )


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
    max_len = state.engine.max_model_len
    if len(ids) >= max_len:
        raise bad_request(
            f"{param} has {len(ids)} tokens; with max_model_len={max_len} at most "
            f"{max_len - 1} prompt tokens leave room to generate",
            param,
        )


@dataclass
class _Choice:
    index: int
    # echoed prompt text, sent before the first generated text
    prefix: str = ""
    texts: list[str] = field(default_factory=list)
    num_tokens: int = 0
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    # completions: parallel lists; chat: the "content" list
    logprobs: dict[str, list] | None = None
    text_offset: int = 0


@dataclass
class _PromptState:
    num_prompt_tokens: int
    metrics: RequestMetrics
    num_cached_tokens: int = 0
    is_admitted: bool = False


class _Generation:
    """One client request: its choices, usage and wire format (completion or chat)."""

    def __init__(
        self,
        state: ServerState,
        *,
        is_chat: bool,
        prompts: list[EnginePrompt],
        n: int,
        top_logprobs: int | None,
        echo_texts: list[str] | None,
    ) -> None:
        self.state = state
        self.is_chat = is_chat
        self.n = n
        self.top_logprobs = top_logprobs
        self.id = ("chatcmpl-" if is_chat else "cmpl-") + uuid.uuid4().hex
        self.created = responses.now()
        self.chunk_object = "chat.completion.chunk" if is_chat else "text_completion"
        self.prompts = [_PromptState(len(p.token_ids), state.metrics.request()) for p in prompts]
        self.choices = [
            _Choice(i, prefix=echo_texts[i // n] if echo_texts else "")
            for i in range(len(prompts) * n)
        ]

    # -- folding deltas ---------------------------------------------------------------

    def apply(self, prompt_idx: int, out: RequestOutput) -> list[tuple[_Choice, dict]]:
        """Folds one delta in; returns the (choice, wire delta) pairs worth sending."""
        p = self.prompts[prompt_idx]
        if not p.is_admitted:
            p.is_admitted = True
            p.metrics.on_admitted(len(out.prompt_token_ids))
        p.num_prompt_tokens = len(out.prompt_token_ids)
        p.num_cached_tokens = out.num_cached_tokens
        sent = []
        for co in out.outputs:
            choice = self.choices[prompt_idx * self.n + co.index]
            delta = self._fold(choice, co, p.metrics)
            if delta is not None:
                sent.append((choice, delta))
        if out.finished:
            p.metrics.on_done()
        return sent

    def _fold(self, choice: _Choice, co: CompletionOutput, m: RequestMetrics) -> dict | None:
        m.on_tokens(co.index, len(co.token_ids))
        choice.num_tokens += len(co.token_ids)
        text = co.text
        if choice.prefix:
            text, choice.prefix = choice.prefix + text, ""
        choice.texts.append(text)
        logprobs = None
        if self.top_logprobs is not None and co.logprobs:
            logprobs = self._logprobs(choice, co)
        if co.finish_reason is not None and choice.finish_reason is None:
            choice.finish_reason, choice.stop_reason = co.finish_reason, co.stop_reason
            m.on_finished(co.finish_reason)
        if not text and logprobs is None and co.finish_reason is None:
            return None
        return {"text": text, "logprobs": logprobs, "finish_reason": co.finish_reason}

    def _logprobs(self, choice: _Choice, co: CompletionOutput) -> dict:
        tokenizer = self.state.engine.tokenizer
        assert co.logprobs is not None and self.top_logprobs is not None
        if self.is_chat:
            new = responses.chat_logprobs(tokenizer, co.token_ids, co.logprobs, self.top_logprobs)
            choice.logprobs = choice.logprobs or {"content": []}
            choice.logprobs["content"].extend(new["content"])
            return new
        new, choice.text_offset = responses.completion_logprobs(
            tokenizer, co.token_ids, co.logprobs, choice.text_offset
        )
        if choice.logprobs is None:
            choice.logprobs = {k: [] for k in new}
        for k, v in new.items():
            choice.logprobs[k].extend(v)
        return new

    def abandon(self) -> None:
        """The client left or the request failed: count unfinished completions as aborted."""
        for choice in self.choices:
            if choice.finish_reason is None:
                choice.finish_reason = "abort"
                self.prompts[choice.index // self.n].metrics.on_finished("abort")

    # -- wire format --------------------------------------------------------------------

    def usage(self) -> dict[str, Any]:
        return responses.usage(
            sum(p.num_prompt_tokens for p in self.prompts),
            sum(c.num_tokens for c in self.choices),
            sum(p.num_cached_tokens for p in self.prompts),
        )

    def _envelope(self, kind: str) -> dict[str, Any]:
        return responses.envelope(kind, self.id, self.created, self.state.model_name)

    def chunk(self, choice: _Choice, delta: dict) -> dict[str, Any]:
        body = self._envelope(self.chunk_object)
        wire: dict[str, Any] = {"index": choice.index}
        if self.is_chat:
            wire["delta"] = {"content": delta["text"]} if delta["text"] else {}
        else:
            wire["text"] = delta["text"]
        wire["logprobs"] = delta["logprobs"]
        wire["finish_reason"] = delta["finish_reason"]
        if delta["finish_reason"] is not None:
            wire["stop_reason"] = choice.stop_reason
        body["choices"] = [wire]
        return body

    def role_chunks(self) -> list[dict[str, Any]]:
        """Chat streams open every choice with its role, as OpenAI's do."""
        if not self.is_chat:
            return []
        chunks = []
        for choice in self.choices:
            body = self._envelope(self.chunk_object)
            body["choices"] = [
                {
                    "index": choice.index,
                    "delta": {"role": "assistant", "content": ""},
                    "logprobs": None,
                    "finish_reason": None,
                }
            ]
            chunks.append(body)
        return chunks

    def usage_chunk(self) -> dict[str, Any]:
        body = self._envelope(self.chunk_object)
        body["choices"] = []
        body["usage"] = self.usage()
        return body

    def full_response(self) -> dict[str, Any]:
        body = self._envelope("chat.completion" if self.is_chat else "text_completion")
        choices = []
        for c in self.choices:
            text = "".join(c.texts)
            wire: dict[str, Any] = {"index": c.index}
            if self.is_chat:
                wire["message"] = {"role": "assistant", "content": text}
            else:
                wire["text"] = text
            wire["logprobs"] = c.logprobs
            wire["finish_reason"] = c.finish_reason
            wire["stop_reason"] = c.stop_reason
            choices.append(wire)
        body["choices"] = choices
        body["usage"] = self.usage()
        return body


async def _run(
    request: web.Request,
    state: ServerState,
    gen: _Generation,
    prompts: list[EnginePrompt],
    *,
    params: Any,
    stream: bool,
    include_usage: bool,
    priority: int,
    cache_salt: str | None,
    fields: frozenset[str],
) -> web.StreamResponse:
    fanout = Fanout(state.engine, prompts, params, gen.id, priority=priority, cache_salt=cache_salt)
    is_complete = False
    try:
        async with fanout:
            outputs = fanout.outputs()
            if not stream:
                try:
                    async for prompt_idx, out in outputs:
                        gen.apply(prompt_idx, out)
                except Exception as e:
                    raise engine_error(e, fields) from None
                is_complete = True
                return web.json_response(gen.full_response())
            # Wait for the first delta before sending headers, so that an error the engine
            # raises on admission (bad prompt, overload, dead) still gets its HTTP status.
            try:
                first = await anext(outputs, None)
            except Exception as e:
                raise engine_error(e, fields) from None
            response = await sse.open_stream(request)
            for chunk in gen.role_chunks():
                await sse.send_event(response, chunk)
            try:
                if first is not None:
                    for choice, delta in gen.apply(*first):
                        await sse.send_event(response, gen.chunk(choice, delta))
                    async for prompt_idx, out in outputs:
                        for choice, delta in gen.apply(prompt_idx, out):
                            await sse.send_event(response, gen.chunk(choice, delta))
            except ConnectionResetError:
                raise
            except Exception as e:
                # headers are out: the error travels as an event, and the stream still ends
                if isinstance(e, (EngineDeadError, EngineOverloadedError, ValueError)):
                    body = engine_error(e, fields).body()
                else:
                    logger.exception("error while streaming %s", gen.id)
                    body = error_body(500, "internal server error (logged on the server)")
                await sse.send_event(response, body)
            if include_usage:
                await sse.send_event(response, gen.usage_chunk())
            await sse.send_done(response)
            is_complete = True
            return response
    finally:
        if not is_complete:
            gen.abandon()


async def completions(request: web.Request) -> web.StreamResponse:
    """OpenAI completions (legacy text API): see the openapi description for every field."""
    state = request.app[STATE_KEY]
    req = validate.parse_completion(
        await read_body(request), state.limits, state.engine.max_model_len
    )
    check_model(state, req.model)
    prompts = []
    all_ids = await tokenize_all(state, req.prompts)
    for i, (raw, ids) in enumerate(zip(req.prompts, all_ids, strict=True)):
        param = "prompt" if len(req.prompts) == 1 else f"prompt[{i}]"
        prompt = EnginePrompt(raw if isinstance(raw, str) else None, ids)
        check_prompt_len(state, prompt.token_ids, param)
        prompts.append(prompt)
    echo_texts = None
    if req.echo:
        tokenizer = state.engine.tokenizer
        echo_texts = [p.text if p.text is not None else _decode(tokenizer, p) for p in prompts]
    return await _admit_and_run(
        request,
        state,
        req,
        prompts,
        is_chat=False,
        top_logprobs=req.logprobs,
        echo_texts=echo_texts,
        fields=protocol.COMPLETION_FIELDS,
    )


async def _admit_and_run(
    request: web.Request,
    state: ServerState,
    req: Any,
    prompts: list[EnginePrompt],
    *,
    is_chat: bool,
    top_logprobs: int | None,
    echo_texts: list[str] | None,
    fields: frozenset[str],
) -> web.StreamResponse:
    """The shared tail of both generation endpoints: admit, fan out, stream or collect."""
    with state.admit():
        gen = _Generation(
            state,
            is_chat=is_chat,
            prompts=prompts,
            n=req.params.n,
            top_logprobs=top_logprobs,
            echo_texts=echo_texts,
        )
        if req.user is not None:
            # OpenAI's end-user label: kept for abuse tracing, never used for anything else
            logger.debug("%s from user %r", gen.id, req.user)
        return await _run(
            request,
            state,
            gen,
            prompts,
            params=req.params,
            stream=req.stream,
            include_usage=req.include_usage,
            priority=req.priority,
            cache_salt=req.cache_salt,
            fields=fields,
        )


def _decode(tokenizer: Any, prompt: EnginePrompt) -> str:
    try:
        return tokenizer.decode(prompt.token_ids, skip_special_tokens=False)
    except Exception:  # ids outside the tokenizer's vocab: the engine rejects them next
        raise bad_request("prompt holds token ids outside the vocabulary", "prompt") from None


async def render_chat(
    state: ServerState, messages: list[dict], add_generation_prompt: bool
) -> list[int]:
    """The chat template's prompt ids (off the event loop for long conversations)."""
    tokenizer = state.engine.tokenizer
    try:
        return await off_loop(
            validate.message_chars(messages),
            lambda: apply_chat_template(
                tokenizer,
                messages,
                add_generation_prompt=add_generation_prompt,
                allow_special_tokens_in_content=state.allow_special_tokens_in_content,
            ),
        )
    except ValueError as e:
        raise bad_request(str(e), param_from_message(str(e), {"messages"}) or "messages") from None
    except Exception as e:  # a template error (jinja raise_exception) on these messages
        raise bad_request(f"the chat template rejected the messages: {e}", "messages") from None


async def chat_completions(request: web.Request) -> web.StreamResponse:
    """OpenAI chat completions: messages -> the model's chat template -> one prompt."""
    state = request.app[STATE_KEY]
    req = validate.parse_chat(await read_body(request), state.limits, state.engine.max_model_len)
    check_model(state, req.model)
    ids = await render_chat(state, req.messages, req.add_generation_prompt)
    check_prompt_len(state, ids, "messages")
    prompts = [EnginePrompt(None, ids)]
    return await _admit_and_run(
        request,
        state,
        req,
        prompts,
        is_chat=True,
        top_logprobs=req.top_logprobs,
        echo_texts=None,
        fields=protocol.CHAT_FIELDS,
    )
