"""Named model shapes for random-weight engines (`load_format="dummy"`); no jax, no I/O.

`model="dummy:<name>"` names one of `PRESETS`: an HF config.json's fields, parsed by
ModelSpec.from_hf_config like any other, so a preset and a config.json-only model dir behave
the same. They exist so an accelerator can be benchmarked on a real model's shape without a
download (scripts/device_check.py); their weights are random, so their text is meaningless.
"""

from __future__ import annotations

from typing import Any

DUMMY_PREFIX = "dummy:"

_LLAMA = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "rms_norm_eps": 1e-5}

# name -> HF config.json fields. A preset has no tokenizer: it takes prompt_token_ids (any id
# below its vocab_size) and returns token ids.
PRESETS: dict[str, dict[str, Any]] = {
    # A small shape both Pallas kernels take (CUDA: head_dim % 64 == 0), GQA 2 over 2 kv heads;
    # untied: with random weights a tied head mostly repeats the current token, whatever the
    # attention says, so greedy tokens would not compare the backends
    "tiny": {
        **_LLAMA,
        "vocab_size": 512,
        "hidden_size": 256,
        "intermediate_size": 512,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 64,
        "max_position_embeddings": 2048,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
    },
    # SmolLM2-135M (the built-in default model's shape: GQA 3, head_dim 64, tied embeddings).
    "smollm2-135m": {
        **_LLAMA,
        "vocab_size": 49152,
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "head_dim": 64,
        "max_position_embeddings": 8192,
        "rope_theta": 100000.0,
        "tie_word_embeddings": True,
    },
    # Llama-3.1-8B (bench/throughput.py's COMM shapes), llama3 rope scaling included.
    "llama3-8b": {
        **_LLAMA,
        "vocab_size": 128256,
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "max_position_embeddings": 131072,
        "rope_theta": 500000.0,
        "rope_scaling": {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
        "tie_word_embeddings": False,
    },
}


def is_preset_name(model: str) -> bool:
    """Whether `model` is spelled as a preset ("dummy:..."), known or not."""
    return model.startswith(DUMMY_PREFIX)


def preset_config(model: str) -> dict[str, Any]:
    """The HF config of `model="dummy:<name>"`; ValueError naming `model` when unknown."""
    name = model[len(DUMMY_PREFIX) :] if is_preset_name(model) else model
    if name not in PRESETS:
        known = [DUMMY_PREFIX + n for n in PRESETS]
        raise ValueError(f"model={model!r}: unknown dummy shape preset; known: {known}")
    return dict(PRESETS[name])
