"""POST /v1/completions and /v1/chat/completions: prompts in, streamed or whole choices out.

Both endpoints share one path: tokenize (the chat template for chat), fan out one engine
request per prompt, then fold the delta outputs into choices (index = prompt_idx * n +
completion index), emitting each delta as an SSE chunk or collecting them into one body.
Chat output with tools or --reasoning-parser goes through server/tools/chat_output.py (per
delta when streamed, on the whole text otherwise); the request's output constraint
(server/constraints.py) travels as SamplingParams.structured_outputs.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, TypeVar

from aiohttp import web

from jaxserve.engine.client import EngineDeadError, EngineOverloadedError
from jaxserve.lora.request import LoRARequest
from server import protocol, request_io, sse, validate
from server.choices import Generation
from server.constraints import Constraint
from server.errors import APIError, bad_request, error_body
from server.fanout import EnginePrompt, Fanout
from server.request_io import (
    check_model,
    check_prompt_len,
    decode_prompt,
    read_body,
    render_chat_request,
    tokenize_all,
)
from server.state import STATE_KEY, ServerState
from server.tools.chat_output import ChatOutputParsers
from server.tools.reasoning import prompt_opens_reasoning

logger = logging.getLogger(__name__)
T = TypeVar("T")


async def _run(
    request: web.Request,
    state: ServerState,
    gen: Generation,
    prompts: list[EnginePrompt],
    *,
    params: Any,
    stream: bool,
    include_usage: bool,
    priority: int,
    cache_salt: str | None,
    fields: frozenset[str],
    constraint: Constraint,
    lora: LoRARequest | None,
) -> web.StreamResponse:
    def engine_error(e: Exception, fields: frozenset[str]) -> APIError:
        if isinstance(e, ValueError):
            if lora is not None and lora not in state.loras.adapters:
                # unloaded between the lookup and the engine: as if it had never been there
                return state.loras.model_not_found(lora.lora_name)
            # the engine names a constraint's fields as StructuredOutputsParams does
            e = ValueError(constraint.rename_message(str(e)))
        return request_io.engine_error(e, fields)

    fanout = Fanout(
        state.engine,
        prompts,
        params,
        gen.id,
        priority=priority,
        cache_salt=cache_salt,
        lora_request=lora,
    )
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
        await read_body(request),
        state.limits,
        state.engine.max_model_len,
        vocab_size=len(state.engine.tokenizer),
    )
    lora = check_model(state, req.model)
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
        echo_texts = [
            p.text if p.text is not None else decode_prompt(tokenizer, p) for p in prompts
        ]
    return await _admit_and_run(
        request,
        state,
        req,
        prompts,
        is_chat=False,
        top_logprobs=req.logprobs,
        echo_texts=echo_texts,
        fields=protocol.COMPLETION_FIELDS,
        lora=lora,
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
    parsers: ChatOutputParsers | None = None,
    lora: LoRARequest | None = None,
) -> web.StreamResponse:
    """The shared tail of both generation endpoints: admit, fan out, stream or collect;
    `lora`: the adapter `model` selected (None: the base model)."""
    with state.admit():
        gen = Generation(
            state,
            is_chat=is_chat,
            prompts=prompts,
            n=req.params.n,
            top_logprobs=top_logprobs,
            echo_texts=echo_texts,
            prompt_logprobs=req.prompt_logprobs,
            continuous_usage=req.continuous_usage,
            parsers=parsers,
            stream=req.stream,
            max_tool_calls=1 if is_chat and req.tools and not req.tools.is_parallel else None,
            model_name=None if lora is None else lora.lora_name,
        )
        if req.user is not None:
            # OpenAI's end-user label, recorded for abuse tracing (one INFO line per request
            # that sends it); never used for anything else
            logger.info("%s from user %r", gen.id, req.user)
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
            constraint=req.constraint,
            lora=lora,
        )


async def chat_completions(request: web.Request) -> web.StreamResponse:
    """OpenAI chat completions: messages -> the model's chat template -> one prompt."""
    state = request.app[STATE_KEY]
    req = validate.parse_chat(
        await read_body(request),
        state.limits,
        state.engine.max_model_len,
        vocab_size=len(state.engine.tokenizer),
        chat=state.chat,
    )
    lora = check_model(state, req.model)
    ids = await render_chat_request(state, req)
    check_prompt_len(state, ids, "messages")
    parsers = _chat_parsers(state, req, ids)
    req = constrain_the_answer_only(req, parsers)
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
        parsers=parsers,
        lora=lora,
    )


def constrain_the_answer_only(
    req: validate.ChatRequest, parsers: ChatOutputParsers | None
) -> validate.ChatRequest:
    """When the prompt opens a reasoning block, the request's constraint starts after its end
    tag (structured_outputs.after_token_id): the reasoning is free, the answer constrained."""
    so = req.params.structured_outputs
    if parsers is None or not parsers.starts_in_reasoning or so is None:
        return req
    reasoning = parsers.reasoning_parser
    end = reasoning.tags.end_token_id if reasoning is not None else None
    if end is None:  # a tag of several tokens cannot be found by token id
        field = req.constraint.param("structured_outputs")
        raise bad_request(
            f"{field}: this prompt opens a reasoning block whose end tag is not one token, so "
            "a constraint cannot start after it; turn reasoning off (e.g. chat_template_kwargs "
            '{"enable_thinking": false}) to constrain the answer',
            field,
        )
    so = dataclasses.replace(so, after_token_id=end)
    return dataclasses.replace(req, params=req.params.with_updates(structured_outputs=so))


def _chat_parsers(
    state: ServerState, req: validate.ChatRequest, ids: list[int]
) -> ChatOutputParsers | None:
    """The request's output parsers (None: its text is the content, as it comes)."""
    reasoning = state.chat.reasoning_parser
    if req.tool_parser is None and reasoning is None:
        return None
    starts_in_reasoning = False
    if reasoning is not None:
        tags = reasoning.tags
        text = None
        if tags.start_token_id is None or tags.end_token_id is None:
            text = state.engine.tokenizer.decode(ids, skip_special_tokens=False)
        starts_in_reasoning = prompt_opens_reasoning(tags, prompt_token_ids=ids, prompt_text=text)
    return ChatOutputParsers(req.tool_parser, reasoning, starts_in_reasoning)
