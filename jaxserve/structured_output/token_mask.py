"""TokenMasks: every host-side rule on a request's next token, as rows of the step's bitmask.

Three request options restrict which token may come next, and all three become one
`u32[R, ceil(V/32)]` bitmask input of the jitted step (runner/token_bitmask.py applies it):
- `structured_outputs`: llguidance's mask for the request's grammar (manager.py);
- `allowed_token_ids`: a fixed row, built once per request;
- `bad_words`: a word's last token is cleared wherever the output ends with the rest of it
  (vLLM's rule; a one-token word is always cleared).
A grammar with `after_token_id` (a reasoning model's </think>) starts after that output
token: the reasoning before it is free, the answer after it is constrained.
A row is the AND of the rules its request has; a request with none has no row (has_mask False),
and a step where no scheduled request has one passes no mask at all (the sampler's lax.cond then
skips the masking). One per engine core; plain numpy, no jax.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from jaxserve.request import Request
from jaxserve.structured_output.manager import StructuredOutputManager, bitmask_width


@dataclass
class _RowRules:
    """The fixed parts of one request's row (the grammar part lives in the manager)."""

    # allowed_token_ids as a bitmask row; None: every token
    allowed: np.ndarray | None
    # bad_words as token id sequences
    bad_words: tuple[tuple[int, ...], ...]
    # the request has a structured-output matcher in the manager
    structured: bool
    # the grammar waits for this output token (structured_outputs.after_token_id); None once
    # it has come (or when the grammar starts at the first token)
    waiting_for: int | None = None


class TokenMasks:
    def __init__(self, tokenizer: Any, vocab_size: int, eos_token_id: int | None) -> None:
        """tokenizer: the model's (HF); llguidance's view of it is built on first use."""
        self._tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.eos_token_id = eos_token_id
        # u32 words per row
        self.width = bitmask_width(vocab_size)
        self._manager: StructuredOutputManager | None = None
        self._rules: dict[str, _RowRules] = {}

    @property
    def manager(self) -> StructuredOutputManager:
        """The llguidance side (built once, about 0.5 s, when the first grammar arrives)."""
        if self._manager is None:
            if self._tokenizer is None:
                raise ValueError("structured_outputs needs the model's tokenizer")
            self._manager = StructuredOutputManager(
                self._tokenizer, self.vocab_size, eos_token_id=self.eos_token_id
            )
        return self._manager

    @property
    def num_requests(self) -> int:
        """Requests with a row (while none has, steps carry no mask)."""
        return len(self._rules)

    def add(self, request: Request) -> None:
        """Registers the request's rules; ValueError (naming the field) if its grammar cannot
        be compiled. Call before it is queued; remove() it when it ends."""
        p = request.sampling_params
        if (
            p.structured_outputs is None
            and p.allowed_token_ids is None
            and not (p.bad_words_token_ids)
        ):
            return
        allowed = None
        if p.allowed_token_ids is not None:
            allowed = _row_of(p.allowed_token_ids, self.width)
        so = p.structured_outputs
        if so is not None:
            self.manager.add_request(request.request_id, so)
        waiting_for = so.after_token_id if so is not None else None
        self._rules[request.request_id] = _RowRules(
            allowed, p.bad_words_token_ids, so is not None, waiting_for
        )

    def has_rules(self, request_id: str) -> bool:
        """Whether the request's steps carry a mask row (its rules were added)."""
        return request_id in self._rules

    def remove(self, request_id: str) -> None:
        rules = self._rules.pop(request_id, None)
        if rules is not None and rules.structured:
            self.manager.remove(request_id)

    def accept(self, request_id: str, token_ids: Sequence[int]) -> bool:
        """Advances the request's grammar by its new tokens (True for requests without one);
        False when a token broke it (its row then allows only eos, so it ends)."""
        rules = self._rules.get(request_id)
        if rules is None or not rules.structured or not token_ids:
            return True
        if rules.waiting_for is not None:
            if rules.waiting_for not in token_ids:
                return True  # still before the constrained part
            token_ids = token_ids[list(token_ids).index(rules.waiting_for) + 1 :]
            rules.waiting_for = None
        return self.manager.accept_tokens(request_id, token_ids)

    def fill(
        self, rows: Sequence[Request | None], num_rows: int
    ) -> tuple[np.ndarray, np.ndarray] | None:
        """(u32[num_rows, width] bitmask, bool[num_rows] has_mask) for a step whose sampling
        rows are `rows` (None: a row that does not sample); None when no row has a rule."""
        ids = [
            r.request_id if r is not None and r.request_id in self._rules else None for r in rows
        ]
        if not any(ids):
            return None
        bitmask = np.empty((num_rows, self.width), np.uint32)
        structured_ids = [
            rid
            if rid and self._rules[rid].structured and self._rules[rid].waiting_for is None
            else None
            for rid in ids
        ]
        if any(structured_ids):
            has_mask = self.manager.fill_bitmask(structured_ids, bitmask)
        else:
            bitmask.fill(0xFFFFFFFF)
            has_mask = np.zeros(num_rows, bool)
        for i, rid in enumerate(ids):
            if rid is None:
                continue
            rules = self._rules[rid]
            if rules.allowed is None and not rules.bad_words and structured_ids[i] is None:
                continue  # only a grammar that has not started yet: no row this step
            has_mask[i] = True
            if rules.allowed is not None:
                bitmask[i] &= rules.allowed
            request = rows[i]
            assert request is not None
            for token in _banned_by_bad_words(rules.bad_words, request.output_token_ids):
                if token < self.vocab_size:
                    bitmask[i, token // 32] &= ~np.uint32(1 << (token % 32))
        return bitmask, has_mask


def _row_of(token_ids: Sequence[int], width: int) -> np.ndarray:
    """A bitmask row allowing exactly token_ids (ids past the row are dropped)."""
    ids = np.asarray([t for t in token_ids if t < width * 32], np.int64)
    row = np.zeros(width, np.uint32)
    np.bitwise_or.at(row, ids // 32, (np.uint32(1) << (ids % 32).astype(np.uint32)))
    return row


def _banned_by_bad_words(
    bad_words: tuple[tuple[int, ...], ...], output_token_ids: Sequence[int]
) -> list[int]:
    """The last token of every bad word whose other tokens end the output so far."""
    banned = []
    n = len(output_token_ids)
    for word in bad_words:
        prefix = word[:-1]
        k = len(prefix)
        if k == 0 or (k <= n and tuple(output_token_ids[n - k :]) == prefix):
            banned.append(word[-1])
    return banned
