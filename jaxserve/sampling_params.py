"""SamplingParams: how one request samples and when it stops (vLLM's names and defaults).

Frozen and validated on construction: a bad value raises ValueError naming the field, before
the request reaches the engine.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from jaxserve.structured_output.params import StructuredOutputsParams

# Most top-N logprobs a request may ask for (vLLM's max_logprobs default); static in the step.
MAX_LOGPROBS = 20
# Most token ids a request may ban while min_tokens is unmet (its stop ids + eos); static width.
MAX_BANNED_TOKEN_IDS = 16
# Most stop strings a request may give.
MAX_STOP_STRINGS = 16
# Token ids, counts and top_k travel to the device as int32; seeds are hashed from int64.
INT32_MAX = (1 << 31) - 1
INT64_MAX = (1 << 63) - 1
# Completions per prompt: each is its own engine request, so n is a memory bound, not a dtype one.
MAX_N = 1024
# Most logit_bias entries a request may give (a static width of the step's arrays) and the bound
# on each bias (OpenAI's: -100 bans a token, 100 all but forces it).
MAX_LOGIT_BIAS = 256
# Most allowed_token_ids and bad_words a request may give (both become the step's token mask).
MAX_ALLOWED_TOKEN_IDS = 1 << 16
MAX_BAD_WORDS = 128
# Floats go to the device as float32: keep them finite there. Past ~100 a temperature already
# flattens any model's distribution to float32 precision; past 1e4 a repetition penalty
# already drives every seen logit to ~0.
MAX_TEMPERATURE = 1e4
MAX_REPETITION_PENALTY = 1e4


@dataclass(frozen=True)
class Range:
    """The closed (or, with is_lo_open, half-open) interval a numeric field must lie in."""

    lo: float
    hi: float
    # top_p and repetition_penalty exclude their lower bound (0)
    is_lo_open: bool = False

    def __contains__(self, value: float) -> bool:
        return (self.lo < value if self.is_lo_open else self.lo <= value) and value <= self.hi

    def describe(self) -> str:
        lo, hi = (x if isinstance(x, int) else f"{x:g}" for x in (self.lo, self.hi))
        return f"{'(' if self.is_lo_open else '['}{lo}, {hi}]"


# NOTE: the one declaration of every numeric bound. SamplingParams checks these offline, and the
# server's request Structs (server/protocol.py) build their msgspec Meta (and so /openapi.json)
# from the same table, so the two can never drift apart.
INT_RANGES: dict[str, Range] = {
    "n": Range(1, MAX_N),
    # -1 (vLLM's "disabled") is stored as 0
    "top_k": Range(-1, INT32_MAX),
    "seed": Range(0, INT64_MAX),
    "max_tokens": Range(1, INT32_MAX),
    "min_tokens": Range(0, INT32_MAX),
    "logprobs": Range(0, MAX_LOGPROBS),
}
FLOAT_RANGES: dict[str, Range] = {
    "temperature": Range(0.0, MAX_TEMPERATURE),
    "top_p": Range(0.0, 1.0, is_lo_open=True),
    "min_p": Range(0.0, 1.0),
    "presence_penalty": Range(-2.0, 2.0),
    "frequency_penalty": Range(-2.0, 2.0),
    "repetition_penalty": Range(0.0, MAX_REPETITION_PENALTY, is_lo_open=True),
}
# A token id (prompt ids, stop_token_ids, /detokenize): int32 on device, never negative.
TOKEN_ID_RANGE = Range(0, INT32_MAX)
# Scheduling priority (lower first): int32, as vLLM's.
PRIORITY_RANGE = Range(-(1 << 31), INT32_MAX)
# One logit_bias value (OpenAI's bound).
LOGIT_BIAS_RANGE = Range(-100.0, 100.0)
_OPTIONAL = frozenset({"seed", "max_tokens", "logprobs"})
_BOOLS = ("ignore_eos", "include_stop_str_in_output", "skip_special_tokens")


def is_int(value: object) -> bool:
    """An integer (numpy's too); bool is an int subclass in Python but never a count or an id."""
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


def is_number(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def check_text(value: str, field: str) -> str:
    """The one text sanitizer: every string bound for the tokenizer or the engine passes it.

    A lone surrogate ("\\ud800", which JSON can carry) is refused: it has no UTF-8 encoding,
    so the tokenizer, msgspec and the detokenizer would all fail on it later, far from the
    field. NUL ("\\u0000") is accepted as ordinary text, as vLLM and the HF tokenizers take it.
    On the server, msgspec already refuses a surrogate while decoding the body (without saying
    where); server/validate.py then runs this over the body's strings to name the field.
    """
    if not isinstance(value, str):
        raise ValueError(f"{field} must be a string, got {type(value).__name__}")
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            raise ValueError(
                f"{field} holds a lone surrogate (U+{ord(value[e.start]):04X}) at character "
                f"{e.start}; send valid Unicode text"
            ) from None
    return value


# Temperatures at or below this are greedy (vLLM's _SAMPLING_EPS): dividing by a tinier one
# only risks overflow, and the result is the argmax anyway. The sampler reads it too.
GREEDY_TEMPERATURE = 1e-5


@dataclass(frozen=True)
class SamplingParams:
    # number of completions for the prompt; they share the prompt's KV blocks
    n: int = 1
    # 0 means greedy
    temperature: float = 1.0
    # nucleus sampling mass in (0, 1]
    top_p: float = 1.0
    # keep the k most likely tokens; 0 or -1 disables
    top_k: int = 0
    # drop tokens whose probability is below min_p * the top probability
    min_p: float = 0.0
    # OpenAI-style penalties on generated tokens, in [-2, 2]
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    # CTRL-style penalty on prompt and generated tokens, > 0 (1 disables)
    repetition_penalty: float = 1.0
    # per-request seed: the same seed gives the same tokens whatever the batch-mates
    seed: int | None = None
    # most tokens to generate; None: up to max_model_len
    max_tokens: int | None = 16
    # generate at least this many tokens before eos / stop ids may end the request
    min_tokens: int = 0
    # strings that end generation (not included in the text unless include_stop_str_in_output)
    stop: tuple[str, ...] = ()
    # token ids that end generation (kept in token_ids, left out of the text when special)
    stop_token_ids: tuple[int, ...] = ()
    # keep generating past the eos token
    ignore_eos: bool = False
    # number of top logprobs to return per generated token (plus the sampled one); None: none
    logprobs: int | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    # top logprobs per prompt token (plus the prompt token's own); None: none. The first
    # prompt token has none (nothing predicts it); a request with it skips prefix-cache hits
    prompt_logprobs: int | None = None
    # token id -> bias added to its logit before sampling (a dict is accepted; sorted pairs are
    # stored); at most MAX_LOGIT_BIAS entries, each bias in [-100, 100]
    logit_bias: tuple[tuple[int, float], ...] = ()
    # only these token ids may be sampled; None: all
    allowed_token_ids: tuple[int, ...] | None = None
    # words never generated: a word's last token is banned wherever the output ends with the
    # rest of it (the API side tokenizes them into bad_words_token_ids)
    bad_words: tuple[str, ...] = ()
    # bad_words as token id sequences (filled by the InputProcessor; given directly offline)
    bad_words_token_ids: tuple[tuple[int, ...], ...] = ()
    # the output must follow this constraint (JSON schema, regex, choice, grammar, JSON object)
    structured_outputs: StructuredOutputsParams | None = None

    def __post_init__(self) -> None:
        # Accept lists and single strings the way vLLM does, but store tuples (frozen, hashable).
        object.__setattr__(self, "stop", _as_tuple(self.stop, "stop", str))
        object.__setattr__(
            self, "stop_token_ids", _as_tuple(self.stop_token_ids, "stop_token_ids", int)
        )
        object.__setattr__(self, "bad_words", _as_tuple(self.bad_words, "bad_words", str))
        object.__setattr__(self, "logit_bias", _logit_bias(self.logit_bias))
        if self.allowed_token_ids is not None:
            ids = _as_tuple(self.allowed_token_ids, "allowed_token_ids", int)
            if not ids:
                raise ValueError("allowed_token_ids must hold at least one token id")
            object.__setattr__(self, "allowed_token_ids", ids)
        object.__setattr__(
            self, "bad_words_token_ids", _token_id_sequences(self.bad_words_token_ids)
        )
        if self.structured_outputs is not None and not isinstance(
            self.structured_outputs, StructuredOutputsParams
        ):
            raise ValueError(
                "structured_outputs must be StructuredOutputsParams, got "
                f"{type(self.structured_outputs).__name__}"
            )
        self._validate()
        if self.top_k == -1:
            object.__setattr__(self, "top_k", 0)

    def _validate(self) -> None:
        def bad(field: str, why: str) -> ValueError:
            return ValueError(f"{field} {why}, got {getattr(self, field)!r}")

        # numpy scalars are welcome offline; they are stored as Python numbers (IPC encodes those)
        for name, r in INT_RANGES.items():
            v = getattr(self, name)
            if v is None and name in _OPTIONAL:
                continue
            if not is_int(v) or v not in r:
                raise bad(name, f"must be an integer in {r.describe()}")
            object.__setattr__(self, name, int(v))
        for name, r in FLOAT_RANGES.items():
            v = getattr(self, name)
            # NaN compares false with everything, so `not in r` refuses it too. The range is
            # checked on the float32 the device gets: top_p=1e-300 would arrive there as 0.
            if not is_number(v) or not math.isfinite(v) or v not in r:
                raise bad(name, f"must be a finite number in {r.describe()}")
            if float(np.float32(v)) not in r:
                raise bad(name, f"must be in {r.describe()} as a float32 (the device's type)")
            object.__setattr__(self, name, float(v))
        for name in _BOOLS:
            if not isinstance(getattr(self, name), bool):
                raise bad(name, "must be a boolean")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise bad("min_tokens", f"must be <= max_tokens ({self.max_tokens})")
        if len(self.stop) > MAX_STOP_STRINGS:
            raise bad("stop", f"may hold at most {MAX_STOP_STRINGS} strings")
        for i, s in enumerate(self.stop):
            if not s:
                raise bad("stop", "must hold non-empty strings")
            check_text(s, f"stop[{i}]")
        for i, t in enumerate(self.stop_token_ids):
            if t not in TOKEN_ID_RANGE:
                raise ValueError(
                    f"stop_token_ids[{i}] must be a token id in {TOKEN_ID_RANGE.describe()}, "
                    f"got {t}"
                )
        if len(self.stop_token_ids) >= MAX_BANNED_TOKEN_IDS:
            raise bad("stop_token_ids", f"may hold at most {MAX_BANNED_TOKEN_IDS - 1} ids")
        if self.prompt_logprobs is not None and (
            not is_int(self.prompt_logprobs) or self.prompt_logprobs not in INT_RANGES["logprobs"]
        ):
            raise bad(
                "prompt_logprobs", f"must be an integer in {INT_RANGES['logprobs'].describe()}"
            )
        for name, ids in (
            ("allowed_token_ids", self.allowed_token_ids or ()),
            ("logit_bias", [t for t, _ in self.logit_bias]),
            *((f"bad_words_token_ids[{i}]", seq) for i, seq in enumerate(self.bad_words_token_ids)),
        ):
            for t in ids:
                if t not in TOKEN_ID_RANGE:
                    raise ValueError(f"{name} holds {t}, not a token id")
        if (
            self.allowed_token_ids is not None
            and len(self.allowed_token_ids) > MAX_ALLOWED_TOKEN_IDS
        ):
            raise bad("allowed_token_ids", f"may hold at most {MAX_ALLOWED_TOKEN_IDS} ids")
        if len(self.bad_words) > MAX_BAD_WORDS or len(self.bad_words_token_ids) > 2 * MAX_BAD_WORDS:
            raise bad("bad_words", f"may hold at most {MAX_BAD_WORDS} words")
        if self.structured_outputs is not None and (self.ignore_eos or self.min_tokens):
            # a complete grammar allows nothing but eos: neither could ever be honoured
            field = "ignore_eos" if self.ignore_eos else "min_tokens"
            raise bad(field, "cannot be combined with structured_outputs (which ends with eos)")
        for i, w in enumerate(self.bad_words):
            if not w:
                raise bad("bad_words", "must hold non-empty strings")
            check_text(w, f"bad_words[{i}]")

    @property
    def is_greedy(self) -> bool:
        """The one greedy rule (the sampler applies the same threshold on device)."""
        return self.temperature <= GREEDY_TEMPERATURE

    @property
    def has_penalties(self) -> bool:
        return (
            self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
            or self.repetition_penalty != 1.0
        )

    def with_updates(self, **changes: object) -> SamplingParams:
        """A copy with some fields changed (validated again)."""
        import dataclasses

        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]


def _logit_bias(value: object) -> tuple[tuple[int, float], ...]:
    """A {token id: bias} dict (or pairs) -> sorted (id, bias) pairs, each bias checked."""
    if value is None:
        return ()
    items = value.items() if isinstance(value, Mapping) else value
    if isinstance(items, (str, bytes)) or not isinstance(items, (Sequence, type({}.items()))):
        raise ValueError(
            f"logit_bias must be a dict of token id -> bias, got {type(value).__name__}"
        )
    pairs: dict[int, float] = {}
    for item in items:
        if not isinstance(item, Sequence) or len(item) != 2:
            raise ValueError("logit_bias must map token ids to numbers")
        tid, bias = item
        if not is_int(tid):
            raise ValueError(f"logit_bias keys must be token ids (integers), got {tid!r}")
        if not is_number(bias) or not math.isfinite(bias) or bias not in LOGIT_BIAS_RANGE:
            raise ValueError(
                f"logit_bias[{tid}] must be a number in {LOGIT_BIAS_RANGE.describe()}, got {bias!r}"
            )
        pairs[int(tid)] = float(bias)
    if len(pairs) > MAX_LOGIT_BIAS:
        raise ValueError(f"logit_bias may hold at most {MAX_LOGIT_BIAS} entries, got {len(pairs)}")
    return tuple(sorted(pairs.items()))


def _token_id_sequences(value: object) -> tuple[tuple[int, ...], ...]:
    seqs = _as_tuple(value, "bad_words_token_ids", Sequence)
    out = []
    for i, seq in enumerate(seqs):
        ids = _as_tuple(seq, f"bad_words_token_ids[{i}]", int)
        if not ids:
            raise ValueError(f"bad_words_token_ids[{i}] must not be empty")
        out.append(ids)
    return tuple(out)


def _as_tuple(value: object, field: str, kind: type) -> tuple:
    """None, one value or a sequence of them -> a tuple whose items are all of `kind`."""
    if value is None:
        return ()
    if isinstance(value, str) and kind is str:
        return (value,)
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise ValueError(f"{field} must be a list, got {type(value).__name__}")
    items = tuple(value)
    for i, v in enumerate(items):
        if not isinstance(v, kind) or isinstance(v, bool):
            raise ValueError(f"{field}[{i}] must be a {kind.__name__}, got {v!r}")
    return items


def as_token_ids(values: Sequence[int], vocab_size: int, field: str = "prompt_token_ids") -> list:
    """Checks that every id is an int in [0, vocab_size); raises ValueError naming the field."""
    ids = list(values)
    for i, t in enumerate(ids):
        if not is_int(t) or not 0 <= t < vocab_size:
            raise ValueError(f"{field}[{i}] must be a token id in [0, {vocab_size}), got {t!r}")
    return ids
