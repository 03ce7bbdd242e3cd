"""StructuredOutputManager: one llguidance matcher per constrained request, and the step bitmask.

One per engine core. It builds the llguidance tokenizer once, compiles each distinct grammar
once (a small LRU of pristine matchers; a request gets a deep copy, ~15 us), advances a
request's matcher with the tokens it samples, rebuilds it by replaying output tokens after a
preemption, and fills the token bitmask `u32[R, ceil(V/32)]` of a whole step at once with
llguidance's parallel fill. Plain numpy and Python: no jax (runner/token_bitmask.py applies
the mask on device).

NOTE on eos: llguidance allows its tokenizer's eos id exactly when the grammar accepts, and
only it once the grammar is complete (or the matcher is in error), so a finished grammar forces
eos. The manager builds that tokenizer with `eos_token_id` = the id the scheduler ends a request
on (the model's eos, Request.eos_token_id), so the forced token is the one that stops it. Ids
past the tokenizer's vocab (embedding padding up to the model's vocab_size) are never allowed.

NOTE on threads: every public method may be called from any thread. One lock guards the
request table and every matcher's state: fill_bitmask holds it while llguidance fills (the GIL
is released and the fill runs on llguidance's own thread pool), so an accept_tokens / add /
remove / reset issued meanwhile waits for the fill to end. Compiling a new grammar (the slow
part of add_request) runs outside that lock and never delays a fill.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any

import llguidance
import llguidance.numpy
import numpy as np

from jaxserve.structured_output.grammar import build_ll_tokenizer, compile_grammar, new_matcher
from jaxserve.structured_output.params import StructuredOutputsParams

# Distinct grammars kept compiled. A miss costs ~1-3 ms for a mid-size schema (more for a big
# Lark grammar); an entry costs a few hundred KB at most.
DEFAULT_CACHE_SIZE = 128
# An unconstrained row: every token allowed.
ALL_ALLOWED = np.uint32(0xFFFFFFFF)


def bitmask_width(vocab_size: int) -> int:
    """Words per row of the step bitmask: bit j of word w is token 32 * w + j."""
    return (vocab_size + 31) // 32


@dataclass
class _Constrained:
    """One request's constraint state (the manager's lock guards it)."""

    # the compiled grammar at its start state, shared through the cache; never advanced
    pristine: llguidance.LLMatcher
    # this request's matcher: the pristine one advanced by its accepted tokens
    matcher: llguidance.LLMatcher
    # which StructuredOutputsParams field the constraint came from (for messages)
    kind: str
    # why the matcher went into its error state (an illegal token), None while it is fine
    error: str | None = None


@dataclass
class FillStats:
    """Host cost of the bitmask fills, for the benchmark and metrics."""

    # fill_bitmask calls that had at least one constrained row
    num_fills: int = 0
    # constrained rows filled, over all calls
    num_rows: int = 0
    # wall seconds spent in those calls (all-ones rows and llguidance's parallel fill)
    total_s: float = 0.0


class StructuredOutputManager:
    """Constrained decoding state for one engine core (see the module docstring for threads)."""

    def __init__(
        self,
        tokenizer: Any,
        vocab_size: int,
        *,
        eos_token_id: int | None = None,
        cache_size: int = DEFAULT_CACHE_SIZE,
        num_threads: int | None = None,
    ) -> None:
        """tokenizer: an HF fast tokenizer (or an llguidance LLTokenizer built for vocab_size).

        vocab_size: the model's logits width (>= the tokenizer's vocab). eos_token_id: the id
        that ends a request (the model's eos); None keeps the tokenizer's. num_threads: the
        parallel fill's threads (None: llguidance's default, 80% of the cores up to 32).
        """
        if vocab_size < 1:
            raise ValueError(f"vocab_size must be positive, got {vocab_size}")
        self.ll_tokenizer = build_ll_tokenizer(tokenizer, vocab_size, eos_token_id)
        # the model's vocab: the bitmask covers ids [0, vocab_size)
        self.vocab_size = vocab_size
        # u32 words per bitmask row
        self.bitmask_width = bitmask_width(vocab_size)
        # the one id a finished grammar allows
        self.eos_token_id: int = self.ll_tokenizer.eos_token
        self.cache_size = cache_size
        self.stats = FillStats()
        self._executor = llguidance.LLExecutor(num_threads)
        self._cache: OrderedDict[Hashable, llguidance.LLMatcher] = OrderedDict()
        # lock order: _lock, then _cache_lock (reset copies a pristine matcher under _lock)
        self._cache_lock = threading.Lock()
        self._lock = threading.Lock()
        self._requests: dict[str, _Constrained] = {}

    # -- compiling --------------------------------------------------------------------------

    def compile(self, params: StructuredOutputsParams) -> None:
        """Compile params into the cache; StructuredOutputsError if it cannot compile.

        The engine may call this at admission, before it gives the request a KV block;
        add_request then finds the grammar compiled.
        """
        self._pristine(params)

    @property
    def num_cached_grammars(self) -> int:
        return len(self._cache)

    def _pristine(self, params: StructuredOutputsParams) -> llguidance.LLMatcher:
        """The cached matcher at the grammar's start: only ever deep-copied, never advanced."""
        key = params.key()
        with self._cache_lock:
            pristine = self._cache.get(key)
            if pristine is not None:
                self._cache.move_to_end(key)
                return pristine
        # NOTE: outside the locks: a big grammar can take 100+ ms (llguidance drops the GIL).
        # Two threads compiling the same new grammar at once both build it; one copy is kept.
        grammar = compile_grammar(params, self.ll_tokenizer)
        pristine = new_matcher(grammar, self.ll_tokenizer, params.kind)
        with self._cache_lock:
            self._cache[key] = pristine
            self._cache.move_to_end(key)
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return pristine

    def _copy(self, pristine: llguidance.LLMatcher) -> llguidance.LLMatcher:
        # copies of one shared matcher are taken one at a time (it is a Rust object that
        # several requests, and so several threads' calls, may share)
        with self._cache_lock:
            return pristine.deep_copy()

    # -- the request table --------------------------------------------------------------------

    def add_request(self, req_id: str, params: StructuredOutputsParams) -> None:
        """Start a matcher for req_id; StructuredOutputsError (a ValueError) if it can't compile."""
        pristine = self._pristine(params)
        entry = _Constrained(pristine=pristine, matcher=self._copy(pristine), kind=params.kind)
        with self._lock:
            if req_id in self._requests:
                raise ValueError(f"request {req_id!r} already has a structured output matcher")
            self._requests[req_id] = entry

    def remove(self, req_id: str) -> None:
        """Forget req_id (finished or aborted); a no-op when it was never constrained."""
        with self._lock:
            self._requests.pop(req_id, None)

    def __contains__(self, req_id: object) -> bool:
        return req_id in self._requests

    @property
    def num_requests(self) -> int:
        return len(self._requests)

    # -- advancing ----------------------------------------------------------------------------

    def accept_tokens(self, req_id: str, token_ids: Sequence[int]) -> bool:
        """Advance req_id's matcher by its newly sampled tokens.

        False when a token is not allowed by the grammar (the sampler did not apply the mask,
        or the request banned the only allowed token): the matcher then stays in an error
        state, error(req_id) says why, and its mask allows only eos from then on.
        KeyError if req_id is not constrained.
        """
        with self._lock:
            entry = self._requests[req_id]
            return self._consume(entry, token_ids)

    def reset(self, req_id: str, output_token_ids: Sequence[int]) -> bool:
        """Rebuild req_id's matcher from the grammar's start by replaying its output tokens.

        For preemption by recompute (or any loss of matcher state): afterwards the matcher is
        where it was after accepting output_token_ids, its error cleared. Returns what
        accept_tokens would. KeyError if req_id is not constrained.
        """
        with self._lock:
            entry = self._requests[req_id]
            entry.matcher = self._copy(entry.pristine)
            entry.error = None
            return self._consume(entry, output_token_ids)

    def _consume(self, entry: _Constrained, token_ids: Sequence[int]) -> bool:
        if entry.error is not None:
            return False
        token_ids = [int(t) for t in token_ids]
        bad = [t for t in token_ids if not 0 <= t < self.vocab_size]
        if bad:
            # llguidance raises on an id outside its vocab instead of erring the matcher
            entry.error = f"token id {bad[0]} is outside the vocab [0, {self.vocab_size})"
            return False
        # NOTE: one token at a time: llguidance 1.9's consume_tokens refuses the eos of a
        # grammar that is complete (is_stopped), which consume_token accepts
        for token_id in token_ids:
            if not entry.matcher.consume_token(token_id):
                entry.error = entry.matcher.get_error() or f"token {token_id} is not allowed"
                return False
        return True

    def is_finished(self, req_id: str) -> bool:
        """The grammar is complete: nothing but eos may follow (or eos was accepted).

        The scheduler may end the request right here (finish_reason stop) instead of spending
        a step on the forced eos; False while in error (see error()). KeyError if unknown.
        """
        with self._lock:
            entry = self._requests[req_id]
            return entry.error is None and entry.matcher.is_stopped()

    def error(self, req_id: str) -> str | None:
        """Why req_id's matcher refused a token (None while it is fine). KeyError if unknown."""
        with self._lock:
            return self._requests[req_id].error

    # -- the step bitmask ---------------------------------------------------------------------

    def fill_bitmask(
        self,
        req_ids_by_row: Sequence[str | None],
        out: np.ndarray,  # u32[R, bitmask_width], R >= len(req_ids_by_row), C-contiguous
    ) -> np.ndarray:  # bool[R] has_mask: which rows are constrained
        """Fill the next step's token bitmask: bit j of out[r, w] allows token 32 * w + j.

        Row r is constrained when req_ids_by_row[r] names a request added here; its bits are
        llguidance's mask (0 past the tokenizer's vocab). Every other row (None, unconstrained
        ids, rows past len(req_ids_by_row)) is all ones. All constrained rows are filled in
        one parallel llguidance call.
        """
        if out.dtype != np.uint32 or out.ndim != 2 or out.shape[1] != self.bitmask_width:
            raise ValueError(
                f"out must be u32[R, {self.bitmask_width}], got {out.dtype}{list(out.shape)}"
            )
        if not out.flags["C_CONTIGUOUS"] or not out.flags["WRITEABLE"]:
            raise ValueError("out must be a writeable C-contiguous array")
        if len(req_ids_by_row) > out.shape[0]:
            raise ValueError(f"{len(req_ids_by_row)} rows do not fit in out's {out.shape[0]}")
        has_mask = np.zeros(out.shape[0], dtype=bool)
        with self._lock:
            start = time.perf_counter()
            rows, failed = [], []
            first_row: dict[str, int] = {}
            repeats: list[tuple[int, int]] = []  # (row, the earlier row of the same request)
            for r, rid in enumerate(req_ids_by_row):
                entry = self._requests.get(rid) if rid is not None else None
                if entry is None:
                    continue
                has_mask[r] = True
                if rid in first_row:
                    # llguidance borrows each matcher once per parallel fill: copy the row
                    repeats.append((r, first_row[rid]))
                    continue
                first_row[rid] = r
                # an errored request may only end: eos alone, as llguidance does itself for
                # a matcher in its error state
                (failed if entry.error is not None else rows).append((entry.matcher, r))
            out[~has_mask] = ALL_ALLOWED
            for _, r in failed:
                out[r] = 0
                out[r, self.eos_token_id // 32] = np.uint32(1 << (self.eos_token_id % 32))
            if rows:
                # llguidance writes int32 words; the same bits, viewed in place
                llguidance.numpy.fill_next_token_bitmask_par(
                    self._executor, rows, out.view(np.int32)
                )
            for r, earlier in repeats:
                out[r] = out[earlier]
            if first_row:
                self.stats.num_fills += 1
                self.stats.num_rows += len(rows) + len(failed)
                self.stats.total_s += time.perf_counter() - start
        return has_mask
