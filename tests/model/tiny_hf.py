"""Tiny random HF model directories written with numpy (config.json + safetensors) that carry
SmolLM2's tokenizer, so the engine can serve them end to end (the TP worker, LoRA oracles)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def write_tiny_hf(path: Path, arch: str, kv_heads: int, tie: bool) -> Path:
    """A 2-layer random HF dir (config.json + safetensors) with SmolLM2's tokenizer."""
    from safetensors.numpy import save_file

    from jaxserve.model.loader import load_tokenizer

    tok = load_tokenizer("smollm2-135m")
    vocab, hidden, heads, hd, ffn, layers = len(tok), 128, 8, 16, 256, 2
    rng = np.random.default_rng(kv_heads)

    def w(*shape: int) -> np.ndarray:  # HF layout [out, in]; 0.2 keeps greedy argmaxes apart
        return (0.2 * rng.standard_normal(shape)).astype(np.float32)

    def norm(n: int) -> np.ndarray:
        return (1.0 + 0.1 * rng.standard_normal(n)).astype(np.float32)

    t = {"model.embed_tokens.weight": w(vocab, hidden), "model.norm.weight": norm(hidden)}
    if not tie:
        t["lm_head.weight"] = w(vocab, hidden)
    for i in range(layers):
        p = f"model.layers.{i}."
        t[p + "input_layernorm.weight"] = norm(hidden)
        t[p + "post_attention_layernorm.weight"] = norm(hidden)
        t[p + "self_attn.q_proj.weight"] = w(heads * hd, hidden)
        t[p + "self_attn.k_proj.weight"] = w(kv_heads * hd, hidden)
        t[p + "self_attn.v_proj.weight"] = w(kv_heads * hd, hidden)
        t[p + "self_attn.o_proj.weight"] = w(hidden, heads * hd)
        t[p + "mlp.gate_proj.weight"] = w(ffn, hidden)
        t[p + "mlp.up_proj.weight"] = w(ffn, hidden)
        t[p + "mlp.down_proj.weight"] = w(hidden, ffn)
        if arch == "Qwen2ForCausalLM":
            t[p + "self_attn.q_proj.bias"] = w(heads * hd)
            t[p + "self_attn.k_proj.bias"] = w(kv_heads * hd)
            t[p + "self_attn.v_proj.bias"] = w(kv_heads * hd)
    path.mkdir(parents=True, exist_ok=True)
    save_file(t, str(path / "model.safetensors"))
    config = dict(
        architectures=[arch],
        # transformers' AutoConfig needs it (the peft oracle loads these dirs)
        model_type={"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2"}[arch],
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=ffn,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=hd,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=tie,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    (path / "config.json").write_text(json.dumps(config))
    tok.save_pretrained(str(path))
    return path
