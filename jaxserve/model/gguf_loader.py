"""GGUF files -> (ModelSpec, HF-named float32 tensors), dequantized with the `gguf` package.

GGUF names map one-to-one onto Hugging Face names, so the rest of loading (stacking,
transposing, casting) is shared with safetensors in loader.py. One trap: llama.cpp's converter
permutes the rows of Q and K of llama-architecture models into an interleaved-pair rope
layout; we undo it (as transformers' GGUF loader does) so our rotate_half rope applies.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from jaxserve.model.spec import ModelSpec

# GGUF per-layer tensor suffix -> HF per-layer name
_LAYER_NAMES = {
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLK = re.compile(r"blk\.(\d+)\.(.+)")
# architectures whose Q/K rows llama.cpp permutes at conversion time
_PERMUTED_ARCHS = ("llama", "mistral")


def read_metadata(reader: Any) -> dict[str, Any]:
    """GGUF key -> python value (strings, numbers, lists); big token arrays are skipped."""
    out = {}
    for key, field in reader.fields.items():
        if key in (
            "tokenizer.ggml.tokens",
            "tokenizer.ggml.scores",
            "tokenizer.ggml.merges",
            "tokenizer.ggml.token_type",
        ):
            continue
        try:
            out[key] = field.contents()
        except Exception:  # noqa: BLE001 - an odd metadata type must not block loading
            continue
    return out


def load_gguf(
    path: Path,
) -> tuple[ModelSpec, dict[str, Any], Iterator[tuple[str, np.ndarray]]]:
    """Opens a GGUF file: (spec, metadata, lazy stream of (HF name, f32 [out, in]))."""
    import gguf  # deferred: only GGUF loads need it

    reader = gguf.GGUFReader(str(path))
    meta = read_metadata(reader)
    names = {t.name for t in reader.tensors}
    rope_freqs = None
    for t in reader.tensors:
        if t.name == "rope_freqs.weight":
            rope_freqs = tuple(float(x) for x in _dequantize(t))
        if t.name == "token_embd.weight":
            # older files have no `<arch>.vocab_size`; the embedding's rows are the vocab
            meta.setdefault(f"{meta.get('general.architecture')}.vocab_size", int(t.shape[1]))
    spec = ModelSpec.from_gguf(meta, names, rope_freqs)

    def tensors() -> Iterator[tuple[str, np.ndarray]]:
        for t in reader.tensors:
            if t.name == "rope_freqs.weight":
                continue
            w = _dequantize(t)
            m = _BLK.fullmatch(t.name)
            if m:
                suffix = m.group(2)
                if suffix not in _LAYER_NAMES:
                    raise ValueError(f"{path}: unexpected GGUF tensor {t.name!r}")
                hf = f"model.layers.{m.group(1)}.{_LAYER_NAMES[suffix]}"
                if spec.architecture in _PERMUTED_ARCHS and suffix in (
                    "attn_q.weight",
                    "attn_k.weight",
                ):
                    heads = spec.num_q_heads if suffix == "attn_q.weight" else spec.num_kv_heads
                    w = unpermute_rope_rows(w, heads)
            elif t.name in _GLOBAL_NAMES:
                hf = _GLOBAL_NAMES[t.name]
            else:
                raise ValueError(f"{path}: unexpected GGUF tensor {t.name!r}")
            yield hf, w

    return spec, meta, tensors()


def _dequantize(t: Any) -> np.ndarray:  # f32, HF layout (GGUF's shape reversed)
    from gguf.quants import dequantize

    w = dequantize(t.data, t.tensor_type)
    shape = tuple(int(s) for s in reversed(t.shape))
    return np.asarray(w, dtype=np.float32).reshape(shape)


def unpermute_rope_rows(w: np.ndarray, num_heads: int) -> np.ndarray:
    """Inverts llama.cpp's `permute`: per head, rows (pair, 2) -> (2, pair).

    llama.cpp stores each head's rotary rows interleaved (x0, x_half, x1, x_half+1, ...);
    HF's rotate_half wants the two halves contiguous.
    """
    half = w.shape[0] // num_heads // 2
    return w.reshape(num_heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
