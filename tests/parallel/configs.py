"""Engine settings and prompts shared by the parallel workers (no jax import here: the
workers set XLA_FLAGS before jax starts)."""

from __future__ import annotations

# small and unwarmed: every check compiles only the buckets it uses
ENGINE = dict(
    enable_warmup=False,
    max_model_len=64,
    max_num_seqs=4,
    max_num_batched_tokens=32,
    show_progress=False,
)
TINY_PROMPTS = [
    {"prompt_token_ids": [5, 17, 301, 2048, 77]},
    {"prompt_token_ids": [1000, 42, 9, 9, 4000, 12, 31]},
]
