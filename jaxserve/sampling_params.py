"""SamplingParams: how one request samples and when it stops (vLLM's names and defaults).

Frozen and validated on construction: a bad value raises ValueError naming the field, before
the request reaches the engine.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

# Most top-N logprobs a request may ask for (vLLM's max_logprobs default); static in the step.
MAX_LOGPROBS = 20
# Most token ids a request may ban while min_tokens is unmet (its stop ids + eos); static width.
MAX_BANNED_TOKEN_IDS = 16
# Most stop strings a request may give.
MAX_STOP_STRINGS = 16


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

    def __post_init__(self) -> None:
        # Accept lists and single strings the way vLLM does, but store tuples (frozen, hashable).
        stop = self.stop
        if stop is None:
            stop = ()
        elif isinstance(stop, str):
            stop = (stop,)
        object.__setattr__(self, "stop", tuple(stop))
        stop_ids = self.stop_token_ids if self.stop_token_ids is not None else ()
        object.__setattr__(self, "stop_token_ids", tuple(stop_ids))
        if self.top_k == -1:
            object.__setattr__(self, "top_k", 0)
        self._validate()

    def _validate(self) -> None:
        def bad(field: str, why: str) -> ValueError:
            return ValueError(f"{field} {why}, got {getattr(self, field)!r}")

        if not isinstance(self.n, int) or self.n < 1:
            raise bad("n", "must be an integer >= 1")
        if self.temperature < 0.0:
            raise bad("temperature", "must be >= 0")
        if not 0.0 < self.top_p <= 1.0:
            raise bad("top_p", "must be in (0, 1]")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise bad("top_k", "must be 0 or -1 (disabled) or a positive integer")
        if not 0.0 <= self.min_p <= 1.0:
            raise bad("min_p", "must be in [0, 1]")
        if not -2.0 <= self.presence_penalty <= 2.0:
            raise bad("presence_penalty", "must be in [-2, 2]")
        if not -2.0 <= self.frequency_penalty <= 2.0:
            raise bad("frequency_penalty", "must be in [-2, 2]")
        if not self.repetition_penalty > 0.0:
            raise bad("repetition_penalty", "must be > 0")
        if self.seed is not None and (not isinstance(self.seed, int) or self.seed < 0):
            raise bad("seed", "must be a non-negative integer")
        if self.max_tokens is not None and (
            not isinstance(self.max_tokens, int) or self.max_tokens < 1
        ):
            raise bad("max_tokens", "must be an integer >= 1")
        if not isinstance(self.min_tokens, int) or self.min_tokens < 0:
            raise bad("min_tokens", "must be an integer >= 0")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise bad("min_tokens", f"must be <= max_tokens ({self.max_tokens})")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise bad("logprobs", f"must be in [0, {MAX_LOGPROBS}]")
        if len(self.stop) > MAX_STOP_STRINGS:
            raise bad("stop", f"may hold at most {MAX_STOP_STRINGS} strings")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise bad("stop", "must hold non-empty strings")
        if any(not isinstance(t, int) or t < 0 for t in self.stop_token_ids):
            raise bad("stop_token_ids", "must hold non-negative integers")
        if len(self.stop_token_ids) >= MAX_BANNED_TOKEN_IDS:
            raise bad("stop_token_ids", f"may hold at most {MAX_BANNED_TOKEN_IDS - 1} ids")

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0

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


def as_token_ids(values: Sequence[int], vocab_size: int, field: str = "prompt_token_ids") -> list:
    """Checks that every id is an int in [0, vocab_size); raises ValueError naming the field."""
    ids = list(values)
    for i, t in enumerate(ids):
        if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab_size:
            raise ValueError(f"{field}[{i}] must be a token id in [0, {vocab_size}), got {t!r}")
    return ids
