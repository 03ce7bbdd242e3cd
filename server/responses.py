"""OpenAI response bodies: usage, logprobs in the completions and chat shapes, choices."""

from __future__ import annotations

import time
from typing import Any

from jaxserve.outputs import Logprob, PromptLogprobs, SampleLogprobs


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        # always present, so clients can count prefix-cache savings on every response
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


def envelope(kind: str, request_id: str, created: int, model: str) -> dict[str, Any]:
    return {"id": request_id, "object": kind, "created": created, "model": model}


def now() -> int:
    return int(time.time())


def _token_text(tokenizer: Any, token_id: int, lp: Logprob | None) -> str:
    if lp is not None and lp.decoded_token is not None:
        return lp.decoded_token
    return tokenizer.decode([token_id], skip_special_tokens=False)


def _ranked(position: dict[int, Logprob]) -> list[tuple[int, Logprob]]:
    # rank 1 first; an entry without a rank (the sampled token outside the top-N) last
    return sorted(position.items(), key=lambda kv: (kv[1].rank is None, kv[1].rank or 0))


def completion_logprobs(
    tokenizer: Any, token_ids: list[int], logprobs: SampleLogprobs, text_offset: int
) -> tuple[dict[str, Any], int]:
    """The legacy completions shape (parallel lists); returns it and the next text offset.

    top_logprobs holds the top-N and the sampled token, as vLLM's does.
    """
    out: dict[str, list] = {
        "tokens": [],
        "token_logprobs": [],
        "top_logprobs": [],
        "text_offset": [],
    }
    for token_id, position in zip(token_ids, logprobs, strict=False):
        sampled = position.get(token_id)
        text = _token_text(tokenizer, token_id, sampled)
        out["tokens"].append(text)
        out["token_logprobs"].append(sampled.logprob if sampled else None)
        out["top_logprobs"].append(
            {_token_text(tokenizer, t, lp): lp.logprob for t, lp in _ranked(position)}
        )
        out["text_offset"].append(text_offset)
        text_offset += len(text)
    return out, text_offset


def chat_logprobs(
    tokenizer: Any, token_ids: list[int], logprobs: SampleLogprobs, top_n: int
) -> dict[str, Any]:
    """The chat shape: one entry per token with its bytes and exactly top_n alternatives."""
    content = []
    for token_id, position in zip(token_ids, logprobs, strict=False):
        sampled = position.get(token_id)
        text = _token_text(tokenizer, token_id, sampled)
        top = [
            {
                "token": (t_text := _token_text(tokenizer, t, lp)),
                "logprob": lp.logprob,
                "bytes": list(t_text.encode()),
            }
            for t, lp in _ranked(position)
            if lp.rank is not None
        ][:top_n]
        content.append(
            {
                "token": text,
                "logprob": sampled.logprob if sampled else None,
                "bytes": list(text.encode()),
                "top_logprobs": top,
            }
        )
    return {"content": content}


def _top(position: dict[int, Logprob], token_id: int, top_n: int) -> list[tuple[int, Logprob]]:
    """The top_n ranked entries plus the token itself (the engine may have computed more)."""
    return [
        (t, lp)
        for t, lp in _ranked(position)
        if t == token_id or (lp.rank is not None and lp.rank <= top_n)
    ]


def prompt_completion_logprobs(
    tokenizer: Any, token_ids: list[int], entries: PromptLogprobs, top_n: int
) -> dict[str, Any]:
    """The prompt's tokens in the completions shape (echo with logprobs): token_logprobs and
    top_logprobs are null for the first token (nothing predicts it), as OpenAI and vLLM send."""
    out: dict[str, list] = {
        "tokens": [],
        "token_logprobs": [],
        "top_logprobs": [],
        "text_offset": [],
    }
    offset = 0
    for token_id, position in zip(token_ids, entries, strict=False):
        own = position.get(token_id) if position is not None else None
        text = _token_text(tokenizer, token_id, own)
        out["tokens"].append(text)
        out["token_logprobs"].append(own.logprob if own is not None else None)
        out["top_logprobs"].append(
            None
            if position is None
            else {
                _token_text(tokenizer, t, lp): lp.logprob
                for t, lp in _top(position, token_id, top_n)
            }
        )
        out["text_offset"].append(offset)
        offset += len(text)
    return out


def vllm_prompt_logprobs(
    tokenizer: Any, token_ids: list[int], entries: PromptLogprobs, top_n: int
) -> list[dict[str, Any] | None]:
    """vLLM's `prompt_logprobs` output: per prompt token None (the first) or
    {"<token id>": {"logprob", "rank", "decoded_token"}} for its top_n and itself."""
    out: list[dict[str, Any] | None] = []
    for token_id, position in zip(token_ids, entries, strict=False):
        if position is None:
            out.append(None)
            continue
        out.append(
            {
                str(t): {
                    "logprob": lp.logprob,
                    "rank": lp.rank,
                    "decoded_token": _token_text(tokenizer, t, lp),
                }
                for t, lp in _top(position, token_id, top_n)
            }
        )
    return out
