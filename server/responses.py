"""OpenAI response bodies: usage, logprobs in the completions and chat shapes, choices."""

from __future__ import annotations

import time
from typing import Any

from jaxserve.outputs import Logprob, SampleLogprobs


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
