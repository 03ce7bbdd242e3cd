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
from jaxserve.outputs import CompletionOutput, RequestOutput
from server import responses
from server.fanout import EnginePrompt
from server.state import ServerState


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


@dataclass
class PromptState:
    num_prompt_tokens: int
    metrics: RequestMetrics
    num_cached_tokens: int = 0
    is_admitted: bool = False


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
    ) -> None:
        self.state = state
        self.is_chat = is_chat
        self.n = n
        self.top_logprobs = top_logprobs
        self.id = ("chatcmpl-" if is_chat else "cmpl-") + uuid.uuid4().hex
        self.created = responses.now()
        self.chunk_object = "chat.completion.chunk" if is_chat else "text_completion"
        self.prompts = [PromptState(len(p.token_ids), state.metrics.request()) for p in prompts]
        self.choices = [
            Choice(i, prefix=echo_texts[i // n] if echo_texts else "")
            for i in range(len(prompts) * n)
        ]

    # -- folding deltas ---------------------------------------------------------------

    def apply(self, prompt_idx: int, out: RequestOutput) -> list[tuple[Choice, dict]]:
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

    def _fold(self, choice: Choice, co: CompletionOutput, m: RequestMetrics) -> dict | None:
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
        return responses.envelope(kind, self.id, self.created, self.state.model_name)

    def chunk(self, choice: Choice, delta: dict) -> dict[str, Any]:
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
