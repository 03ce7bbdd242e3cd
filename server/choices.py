"""The choices of one generation request, folded from the engine's delta outputs.

`Generation` holds a request's choices (index = prompt_idx * n + completion index), its usage
and its wire format (a completion or a chat): generation.py feeds it each RequestOutput and
sends what it returns, as SSE chunks or one body at the end.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any

from jaxserve.metrics import RequestMetrics
from jaxserve.outputs import CompletionOutput, PromptLogprobs, RequestOutput
from server import responses
from server.fanout import EnginePrompt
from server.state import ServerState
from server.tools.calls import tool_call_id_prefix
from server.tools.chat_output import ChatOutputParsers, ChatOutputStream, parse_chat_output


@dataclass
class Choice:
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
    # chat with tools or reasoning, streamed: the output parsed delta by delta
    stream: ChatOutputStream | None = None
    # echo with logprobs: the prompt's logprobs still to send before the first token's
    is_echo_logprobs_pending: bool = False


@dataclass
class PromptState:
    num_prompt_tokens: int
    metrics: RequestMetrics
    num_cached_tokens: int = 0
    is_admitted: bool = False
    # the engine's prompt logprobs (they come with the prompt's first output)
    prompt_logprobs: PromptLogprobs | None = None
    token_ids: list[int] = field(default_factory=list)


class Generation:
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
        prompt_logprobs: int | None = None,
        continuous_usage: bool = False,
        parsers: ChatOutputParsers | None = None,
        stream: bool = False,
        max_tool_calls: int | None = None,
        model_name: str | None = None,
    ) -> None:
        """echo_texts with top_logprobs: the prompt's tokens and logprobs come first (the
        engine was asked for prompt_logprobs >= top_logprobs); prompt_logprobs: the vLLM
        field's N (its own output field); parsers: chat output through the tool and
        reasoning parsers (streamed ones parse delta by delta); max_tool_calls: 1 under
        parallel_tool_calls=false (later calls are dropped; a forced grammar never makes
        them), None: no limit; model_name: the `model` of the response (the LoRA adapter's
        name when one was selected), None: the served model's."""
        self.state = state
        self.model_name = state.model_name if model_name is None else model_name
        self.is_chat = is_chat
        self.n = n
        self.top_logprobs = top_logprobs
        self.prompt_logprobs = prompt_logprobs
        self.continuous_usage = continuous_usage
        self.parsers = parsers
        self.max_tool_calls = max_tool_calls
        self.id = ("chatcmpl-" if is_chat else "cmpl-") + uuid.uuid4().hex
        self.created = responses.now()
        self.chunk_object = "chat.completion.chunk" if is_chat else "text_completion"
        self.prompts = [
            PromptState(len(p.token_ids), state.metrics.request(), token_ids=p.token_ids)
            for p in prompts
        ]
        is_echo_logprobs = bool(echo_texts) and top_logprobs is not None
        self.choices = [
            Choice(
                i,
                prefix=echo_texts[i // n] if echo_texts else "",
                is_echo_logprobs_pending=is_echo_logprobs,
            )
            for i in range(len(prompts) * n)
        ]
        if parsers is not None and stream:
            for c in self.choices:
                c.stream = ChatOutputStream(parsers, tool_call_id_prefix(self.id, c.index))

    # -- folding deltas ---------------------------------------------------------------

    def apply(self, prompt_idx: int, out: RequestOutput) -> list[tuple[Choice, dict]]:
        """Folds one delta in; returns the (choice, wire delta) pairs worth sending."""
        p = self.prompts[prompt_idx]
        if not p.is_admitted:
            p.is_admitted = True
            p.metrics.on_admitted(len(out.prompt_token_ids))
        p.num_prompt_tokens = len(out.prompt_token_ids)
        p.num_cached_tokens = out.num_cached_tokens
        if out.prompt_logprobs is not None and p.prompt_logprobs is None:
            p.prompt_logprobs = out.prompt_logprobs
            p.token_ids = list(out.prompt_token_ids)
        sent = []
        for co in out.outputs:
            choice = self.choices[prompt_idx * self.n + co.index]
            delta = self._fold(choice, co, p)
            if delta is not None:
                sent.append((choice, delta))
        if out.finished:
            p.metrics.on_done()
        return sent

    def _fold(self, choice: Choice, co: CompletionOutput, p: PromptState) -> dict | None:
        m: RequestMetrics = p.metrics
        m.on_tokens(co.index, len(co.token_ids))
        choice.num_tokens += len(co.token_ids)
        text = co.text
        echo_logprobs = None
        if choice.is_echo_logprobs_pending:
            choice.is_echo_logprobs_pending = False
            echo_logprobs = self._echo_logprobs(choice, p)
        if choice.prefix:
            text, choice.prefix = choice.prefix + text, ""
        choice.texts.append(text)
        logprobs = echo_logprobs
        if self.top_logprobs is not None and co.logprobs:
            logprobs = self._logprobs(choice, co)
            if echo_logprobs is not None:
                logprobs = {k: v + logprobs[k] for k, v in echo_logprobs.items()}
        finish_reason = None
        if co.finish_reason is not None and choice.finish_reason is None:
            choice.finish_reason, choice.stop_reason = co.finish_reason, co.stop_reason
            m.on_finished(co.finish_reason)
            finish_reason = co.finish_reason
        fields: dict[str, Any] | None = None
        if choice.stream is not None:
            fields = choice.stream.feed(text) if text else {}
            if finish_reason is not None:
                _merge_delta(fields, choice.stream.finish())
                finish_reason = choice.stream.finish_reason(finish_reason)
            if self.max_tool_calls is not None and "tool_calls" in fields:
                calls = [d for d in fields["tool_calls"] if d["index"] < self.max_tool_calls]
                if calls:
                    fields["tool_calls"] = calls
                else:
                    del fields["tool_calls"]
            if not fields and logprobs is None and finish_reason is None:
                return None
        elif not text and logprobs is None and co.finish_reason is None:
            return None
        return {
            "text": text,
            "fields": fields,
            "logprobs": logprobs,
            # the wire's ("tool_calls" after calls), once: when the choice finishes
            "finish_reason": finish_reason,
        }

    def _echo_logprobs(self, choice: Choice, p: PromptState) -> dict[str, list]:
        """The prompt's tokens in the completions logprobs shape (the first has none), and
        the generated tokens' offsets then start after the echoed text."""
        assert self.top_logprobs is not None
        entries = p.prompt_logprobs
        if entries is None:
            # the engine's fault, not the request's: a 500, never a silently shorter answer
            raise RuntimeError("the engine returned no prompt logprobs for echo with logprobs")
        out = responses.prompt_completion_logprobs(
            self.state.engine.tokenizer, p.token_ids, entries, self.top_logprobs
        )
        choice.logprobs = {k: list(v) for k, v in out.items()}
        choice.text_offset = len(choice.prefix)
        return out

    def _logprobs(self, choice: Choice, co: CompletionOutput) -> dict:
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
        return responses.envelope(kind, self.id, self.created, self.model_name)

    def chunk(self, choice: Choice, delta: dict) -> dict[str, Any]:
        body = self._envelope(self.chunk_object)
        wire: dict[str, Any] = {"index": choice.index}
        if self.is_chat:
            if delta["fields"] is not None:
                wire["delta"] = delta["fields"]
            else:
                wire["delta"] = {"content": delta["text"]} if delta["text"] else {}
        else:
            wire["text"] = delta["text"]
        wire["logprobs"] = delta["logprobs"]
        wire["finish_reason"] = delta["finish_reason"]
        if delta["finish_reason"] is not None:
            wire["stop_reason"] = choice.stop_reason
        body["choices"] = [wire]
        if self.continuous_usage:
            body["usage"] = self.usage()
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
            if self.continuous_usage:
                body["usage"] = self.usage()
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
            finish_reason = c.finish_reason
            if self.is_chat and self.parsers is not None:
                message = parse_chat_output(
                    self.parsers, text, tool_call_id_prefix(self.id, c.index)
                )
                if self.max_tool_calls is not None:
                    del message.tool_calls[self.max_tool_calls :]
                wire["message"] = message.to_openai(self.parsers)
                finish_reason = message.finish_reason(finish_reason)
            elif self.is_chat:
                wire["message"] = {"role": "assistant", "content": text}
            else:
                wire["text"] = text
            wire["logprobs"] = c.logprobs
            wire["finish_reason"] = finish_reason
            wire["stop_reason"] = c.stop_reason
            if not self.is_chat and self.prompt_logprobs is not None:
                wire["prompt_logprobs"] = self._prompt_logprobs(self.prompts[c.index // self.n])
            choices.append(wire)
        body["choices"] = choices
        if self.is_chat and self.prompt_logprobs is not None:
            # vLLM's place for them in a chat response: beside the choices
            body["prompt_logprobs"] = self._prompt_logprobs(self.prompts[0])
        body["usage"] = self.usage()
        return body

    def _prompt_logprobs(self, p: PromptState) -> list[dict[str, Any] | None]:
        assert self.prompt_logprobs is not None
        if p.prompt_logprobs is None:
            raise RuntimeError("the engine returned no prompt logprobs for prompt_logprobs")
        return responses.vllm_prompt_logprobs(
            self.state.engine.tokenizer, p.token_ids, p.prompt_logprobs, self.prompt_logprobs
        )


def _merge_delta(into: dict[str, Any], more: dict[str, Any]) -> None:
    """Adds a chat output stream's later delta fields to `into` (text joins, calls extend)."""
    for key, value in more.items():
        if key == "tool_calls":
            into.setdefault(key, []).extend(value)
        else:
            into[key] = into.get(key, "") + value
