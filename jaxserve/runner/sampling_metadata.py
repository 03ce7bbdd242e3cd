"""Host-side builder of SamplingMetadata: per-request SamplingParams -> numpy arrays [R].

Runs every step on the host (numpy only, no jax); the runner device_puts the result next to
the other step inputs. Padding rows are greedy with no penalties, bans or logprobs, so they
cost nothing and change nothing.

NOTE on failures: a row that cannot be written (a value its array cannot hold) raises
RowStagingError naming the row, so the runner can leave that one request out of the step.
`check_sampling_row` runs the same writes once at admission, so such a request is normally
refused by add_request (ValueError naming the field) and never reaches a step.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from jaxserve.request import Request
from jaxserve.runner.sampler import SamplingMetadata
from jaxserve.sampling_params import MAX_BANNED_TOKEN_IDS, MAX_LOGIT_BIAS, SamplingParams


@dataclass(frozen=True)
class SamplingRow:
    """What the sampler needs from one request this step (a plain view, no engine state)."""

    params: SamplingParams
    # the seed actually used (the user's, or one the engine drew); any int, folded to 32 bits
    seed: int
    # tokens generated so far: the draw for this step is keyed by (seed, step)
    step: int
    # read only when params.has_penalties
    prompt_token_ids: Sequence[int]
    output_token_ids: Sequence[int]
    # banned with the stop ids while min_tokens is unmet (unless ignore_eos); None: no eos
    eos_token_id: int | None

    @classmethod
    def from_request(cls, request: Request, step: int | None = None) -> SamplingRow:
        """step: the index of the output token this row samples (default: the next one the
        host knows of; async scheduling passes the one after the token in flight)."""
        return cls(
            params=request.sampling_params,
            seed=request.sampling_seed,
            step=request.num_output_tokens if step is None else step,
            prompt_token_ids=request.prompt_token_ids,
            output_token_ids=request.output_token_ids,
            eos_token_id=request.eos_token_id,
        )

    @property
    def num_penalty_tokens(self) -> int:
        """Entries this row needs in penalty_token_ids (0 when it has no penalties)."""
        if not self.params.has_penalties:
            return 0
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def banned_token_ids(self) -> list[int]:
        """eos (unless ignore_eos) + stop ids while fewer than min_tokens tokens are out."""
        p = self.params
        if self.step >= p.min_tokens:
            return []
        banned = list(p.stop_token_ids)
        if self.eos_token_id is not None and not p.ignore_eos:
            banned.append(self.eos_token_id)
        return banned


class RowStagingError(ValueError):
    """Row `row` of a step's sampling metadata could not be written (its cause is chained)."""

    def __init__(self, row: int, cause: BaseException) -> None:
        super().__init__(f"sampling row {row}: {type(cause).__name__}: {cause}")
        # index of the row in the rows given to build_sampling_metadata
        self.row = row
        self.cause = cause


_INT32 = np.iinfo(np.int32)
_FLOAT32_MAX = float(np.finfo(np.float32).max)
# SamplingParams fields staged into int32 / float32 arrays (the names users send)
_INT32_FIELDS = ("top_k", "logprobs", "min_tokens")
_FLOAT32_FIELDS = (
    "temperature",
    "top_p",
    "min_p",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
)


def _check_int32(name: str, value: object) -> None:
    if not isinstance(value, int) or not _INT32.min <= value <= _INT32.max:
        raise ValueError(f"{name} must be an integer in the engine's int32 range, got {value!r}")


def check_sampling_row(row: SamplingRow, penalty_len: int) -> None:
    """Raises ValueError naming the field when `row` could not be staged into a step.

    Called at admission (EngineCore.add_request): a request whose values the step's arrays
    cannot hold (top_k=3_000_000_000 in an int32) fails alone, before it takes any block.
    """
    p = row.params
    for name in _INT32_FIELDS:
        value = getattr(p, name)
        if value is not None:
            _check_int32(name, value)
    for name in _FLOAT32_FIELDS:
        value = getattr(p, name)
        if not isinstance(value, (int, float)) or not (
            math.isfinite(value) and abs(value) <= _FLOAT32_MAX
        ):
            raise ValueError(f"{name} must be a finite float32, got {value!r}")
    for i, token_id in enumerate(p.stop_token_ids):
        _check_int32(f"stop_token_ids[{i}]", token_id)
    if row.eos_token_id is not None:
        _check_int32("eos_token_id", row.eos_token_id)
    if len(p.stop_token_ids) + 1 > MAX_BANNED_TOKEN_IDS:
        raise ValueError(f"stop_token_ids may hold at most {MAX_BANNED_TOKEN_IDS - 1} ids")
    if row.num_penalty_tokens > penalty_len:
        raise ValueError(
            f"prompt + output ({row.num_penalty_tokens} tokens) exceed the penalty window "
            f"of {penalty_len} tokens"
        )
    try:  # the very writes a step does, as the catch-all for anything the checks above miss
        build_sampling_metadata([row], 1, penalty_len)
    except RowStagingError as e:
        raise ValueError(f"sampling_params cannot be staged: {e.cause}") from None


def fold_seed(seed: int) -> int:
    """Any Python int -> u32, mixing in the high bits so seeds past 2**32 stay distinct-ish."""
    seed &= (1 << 64) - 1
    return (seed ^ (seed >> 32)) & 0xFFFFFFFF


def penalty_width(num_blocks_per_req: int, block_size: int, max_model_len: int) -> int:
    """L, the width of a step's penalty_token_ids, for its block-table bucket B.

    A sampling row's prompt + output are exactly the tokens its KV blocks hold after the step,
    and B covers every row's blocks, so B * block_size holds any row's history (and
    max_model_len caps it). L follows B, a static bucket already: no new program, and a batch
    of short requests sends [R, 64], not [R, max_model_len].
    """
    return min(max_model_len, num_blocks_per_req * block_size)


def required_penalty_len(rows: Sequence[SamplingRow | None]) -> int:
    """The smallest penalty_len that fits every row's prompt + output (0: no row penalizes)."""
    return max((row.num_penalty_tokens for row in rows if row is not None), default=0)


# id(SamplingParams) -> (the params, their float32 and int32 step values); a request's params
# are one object for its life, so they are converted once, not once per step.
_FIXED: dict[int, tuple[SamplingParams, np.ndarray, np.ndarray]] = {}
_MAX_FIXED = 4096

# The fixed values of a padding row: greedy, no filters, no penalties, no logprobs (-1).
PADDING_FLOATS = np.array(
    [1.0 if f in ("top_p", "repetition_penalty") else 0.0 for f in _FLOAT32_FIELDS], np.float32
)
PADDING_INTS = np.array([0, -1], np.int32)  # top_k, logprobs


def fixed_values(p: SamplingParams) -> tuple[np.ndarray, np.ndarray]:
    """(f32[_FLOAT32_FIELDS], i32[top_k, logprobs or -1]) of `p`; raises (OverflowError) for
    an int that int32 cannot hold, as a per-row write would."""
    hit = _FIXED.get(id(p))
    if hit is not None and hit[0] is p:
        return hit[1], hit[2]
    f = np.array([getattr(p, name) for name in _FLOAT32_FIELDS], np.float32)
    k = np.array([p.top_k, -1 if p.logprobs is None else p.logprobs], np.int32)
    if len(_FIXED) >= _MAX_FIXED:
        _FIXED.clear()
    _FIXED[id(p)] = (p, f, k)
    return f, k


def logit_bias_arrays(p: SamplingParams) -> tuple[np.ndarray, np.ndarray] | None:
    """(i32 ids, f32 values) of p.logit_bias, None without one."""
    if not p.logit_bias:
        return None
    if len(p.logit_bias) > MAX_LOGIT_BIAS:
        raise ValueError(f"logit_bias may hold at most {MAX_LOGIT_BIAS} entries")
    ids = np.array([t for t, _ in p.logit_bias], np.int32)
    return ids, np.array([b for _, b in p.logit_bias], np.float32)


@functools.lru_cache(maxsize=64)
def _all_minus_one(num_rows: int, width: int) -> np.ndarray:
    # Shared across steps: the common no-penalty case allocates nothing. Read-only so a
    # consumer cannot corrupt the cache.
    a = np.full((num_rows, width), -1, np.int32)
    a.setflags(write=False)
    return a


@functools.lru_cache(maxsize=64)
def _zeros(shape: tuple[int, ...], dtype: type) -> np.ndarray:
    a = np.zeros(shape, dtype)
    a.setflags(write=False)
    return a


def build_sampling_metadata(
    rows: Sequence[SamplingRow | None],
    num_rows: int,
    penalty_len: int,
    *,
    bitmask_width: int | None = None,
    token_mask: tuple[np.ndarray, np.ndarray] | None = None,
) -> SamplingMetadata:
    """SamplingMetadata of numpy arrays for `rows` padded to `num_rows` (None: padding row).

    penalty_len (L, a static bucket chosen by the runner) must be >= required_penalty_len(rows);
    it is only read when some row has penalties. bitmask_width: words per token-bitmask row
    (the runner always gives it, so every step has the same program); token_mask: this step's
    (bitmask, has_mask) from TokenMasks.fill, None when no row is constrained.

    The engine's steps keep the fixed values in their InputBatch rows instead (written once
    per request); both end in step_sampling_metadata, and both write rows with the same
    functions (fixed_values, fold_seed, logit_bias_arrays).
    """
    if len(rows) > num_rows:
        raise ValueError(f"{len(rows)} rows do not fit in num_rows={num_rows}")
    floats = np.repeat(PADDING_FLOATS[:, None], num_rows, axis=1)
    ints = np.repeat(PADDING_INTS[:, None], num_rows, axis=1)
    seeds = np.zeros(num_rows, np.uint32)
    steps = np.zeros(num_rows, np.int32)
    bias: tuple[np.ndarray, np.ndarray] | None = None
    for i, row in enumerate(rows):
        if row is None:
            continue
        try:
            floats[:, i], ints[:, i] = fixed_values(row.params)
            seeds[i] = fold_seed(row.seed)
            if not 0 <= row.step <= _INT32.max:
                raise ValueError(f"step {row.step} is outside int32")
            steps[i] = row.step
            row_bias = logit_bias_arrays(row.params)
            if row_bias is not None:
                if bias is None:
                    bias = (
                        np.full((num_rows, MAX_LOGIT_BIAS), -1, np.int32),
                        np.zeros((num_rows, MAX_LOGIT_BIAS), np.float32),
                    )
                bias[0][i, : len(row_bias[0])], bias[1][i, : len(row_bias[1])] = row_bias
        except Exception as e:  # noqa: BLE001 - a failure here is this row's alone
            raise RowStagingError(i, e) from e
    special = {i: row for i, row in enumerate(rows) if row is not None}
    return step_sampling_metadata(
        floats,
        ints,
        seeds,
        steps,
        special,
        num_rows,
        penalty_len,
        bias=bias,
        bitmask_width=bitmask_width,
        token_mask=token_mask,
    )


def step_sampling_metadata(
    floats: np.ndarray,  # f32[len(_FLOAT32_FIELDS), R] the rows' fixed values, by field
    ints: np.ndarray,  # i32[2, R] top_k, logprobs (-1: none)
    seeds: np.ndarray,  # u32[R] folded seeds
    steps: np.ndarray,  # i32[R] each row's sample index
    rows: dict[int, SamplingRow],  # the rows whose bans and penalty ids are written here
    num_rows: int,
    penalty_len: int,
    *,
    bias: tuple[np.ndarray, np.ndarray] | None = None,  # (i32, f32)[R, MAX_LOGIT_BIAS]
    bitmask_width: int | None = None,
    token_mask: tuple[np.ndarray, np.ndarray] | None = None,
) -> SamplingMetadata:
    """SamplingMetadata from the rows' fixed values and the per-step extras of `rows` (a
    min_tokens ban, penalty ids): the one place a step's sampling arrays are assembled."""
    prompt_lens = np.zeros(num_rows, np.int32)
    banned: np.ndarray | None = None
    penalty_ids: np.ndarray | None = None
    for i, row in rows.items():
        try:
            ban = row.banned_token_ids
            if ban:
                if banned is None:
                    banned = np.full((num_rows, MAX_BANNED_TOKEN_IDS), -1, np.int32)
                banned[i, : len(ban)] = ban
            n = row.num_penalty_tokens
            if n:
                if n > penalty_len:
                    raise ValueError(
                        f"row {i} needs {n} penalty tokens but penalty_len={penalty_len}; "
                        "size it with required_penalty_len(rows)"
                    )
                if penalty_ids is None:
                    penalty_ids = np.full((num_rows, penalty_len), -1, np.int32)
                num_prompt = len(row.prompt_token_ids)
                penalty_ids[i, :num_prompt] = row.prompt_token_ids
                penalty_ids[i, num_prompt:n] = row.output_token_ids
                prompt_lens[i] = num_prompt
        except Exception as e:  # noqa: BLE001 - a failure here is this row's alone
            raise RowStagingError(i, e) from e
    column = dict(zip(_FLOAT32_FIELDS, floats, strict=True))
    return SamplingMetadata(
        temperature=column["temperature"],
        top_k=ints[0],
        top_p=column["top_p"],
        min_p=column["min_p"],
        presence_penalty=column["presence_penalty"],
        frequency_penalty=column["frequency_penalty"],
        repetition_penalty=column["repetition_penalty"],
        seeds=seeds,
        steps=steps,
        banned_token_ids=(
            banned if banned is not None else _all_minus_one(num_rows, MAX_BANNED_TOKEN_IDS)
        ),
        penalty_token_ids=(
            penalty_ids if penalty_ids is not None else _all_minus_one(num_rows, penalty_len)
        ),
        penalty_prompt_lens=prompt_lens,
        num_logprobs=ints[1],
        logit_bias_ids=bias[0] if bias is not None else _all_minus_one(num_rows, MAX_LOGIT_BIAS),
        logit_bias_values=(
            bias[1] if bias is not None else _zeros((num_rows, MAX_LOGIT_BIAS), np.float32)
        ),
        **_token_mask_fields(num_rows, bitmask_width, token_mask),
    )


def _token_mask_fields(
    num_rows: int, width: int | None, token_mask: tuple[np.ndarray, np.ndarray] | None
) -> dict[str, np.ndarray | None]:
    if width is None:
        if token_mask is not None:
            raise ValueError("a token_mask needs bitmask_width")
        return {"token_bitmask": None, "has_token_bitmask": None}
    if token_mask is None:
        # no row constrained: zeros that are never read (has_mask is all False)
        return {
            "token_bitmask": _zeros((num_rows, width), np.uint32),
            "has_token_bitmask": _zeros((num_rows,), np.bool_),
        }
    bitmask, has_mask = token_mask
    if bitmask.shape != (num_rows, width) or has_mask.shape != (num_rows,):
        raise ValueError(
            f"token_mask must be u32[{num_rows}, {width}] and bool[{num_rows}], got "
            f"{list(bitmask.shape)} and {list(has_mask.shape)}"
        )
    return {"token_bitmask": bitmask, "has_token_bitmask": has_mask}
