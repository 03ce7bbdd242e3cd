"""Random LoRA adapters in the PEFT file format, written with numpy + safetensors (no torch).

For checks that only need an adapter the engine reads as any PEFT adapter (the TP worker, the
benchmark); the oracle tests use peft itself (peft_util.make_peft_adapter).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

# HF module name -> its parent in a decoder layer
PEFT_MODULES = {
    "q_proj": "self_attn",
    "k_proj": "self_attn",
    "v_proj": "self_attn",
    "o_proj": "self_attn",
    "gate_proj": "mlp",
    "up_proj": "mlp",
    "down_proj": "mlp",
}


def write_random_adapter(
    path: Path,
    *,
    num_layers: int,
    hidden_size: int,
    intermediate_size: int,
    q_size: int,
    kv_size: int,
    rank: int,
    seed: int,
    std: float = 0.01,
    modules: tuple[str, ...] = tuple(PEFT_MODULES),
) -> Path:
    """A rank-`rank` adapter (alpha = 2 * rank) on `modules` of every layer; A and B entries
    are normal(0, std)."""
    from safetensors.numpy import save_file

    e, f = hidden_size, intermediate_size
    dims = {
        "q_proj": (e, q_size),
        "k_proj": (e, kv_size),
        "v_proj": (e, kv_size),
        "o_proj": (q_size, e),
        "gate_proj": (e, f),
        "up_proj": (e, f),
        "down_proj": (f, e),
    }
    rng = np.random.default_rng(seed)
    tensors = {}
    for layer in range(num_layers):
        for module in modules:
            d_in, d_out = dims[module]
            key = f"base_model.model.model.layers.{layer}.{PEFT_MODULES[module]}.{module}"
            a = rng.standard_normal((rank, d_in)) * std
            b = rng.standard_normal((d_out, rank)) * std
            tensors[f"{key}.lora_A.weight"] = a.astype(np.float32)
            tensors[f"{key}.lora_B.weight"] = b.astype(np.float32)
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / "adapter_model.safetensors"))
    config = {
        "peft_type": "LORA",
        "r": rank,
        "lora_alpha": 2 * rank,
        "target_modules": sorted(modules),
        "bias": "none",
    }
    (path / "adapter_config.json").write_text(json.dumps(config))
    return path
