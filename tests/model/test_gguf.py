"""GGUF loading on tiny random models: written with gguf.GGUFWriter the way llama.cpp's
converter writes them (Q/K rows permuted for llama), loaded by us, compared to transformers."""

from __future__ import annotations

import numpy as np
import pytest

from jaxserve.model import llama
from jaxserve.model.loader import load_model

from .helpers import BLOCK_SIZE, NUM_BLOCKS, rel_err, run_tokens, tiny_hf_model

torch = pytest.importorskip("torch")
gguf = pytest.importorskip("gguf")

PROMPT = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3]

_NAMES = {  # HF per-layer suffix -> GGUF per-layer suffix
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}


def _llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    # convert_hf_to_gguf.py LlamaModel.permute
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def write_gguf(hf, arch: str, path) -> None:
    c = hf.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_vocab_size(c.vocab_size)
    for name, t in hf.state_dict().items():
        t = t.numpy().astype(np.float32)
        if name == "model.embed_tokens.weight":
            gname = "token_embd.weight"
        elif name == "model.norm.weight":
            gname = "output_norm.weight"
        elif name == "lm_head.weight":
            if c.tie_word_embeddings:
                continue
            gname = "output.weight"
        else:
            _, _, layer, rest = name.split(".", 3)
            stem, kind = rest.rsplit(".", 1)
            gname = f"blk.{layer}.{_NAMES[stem]}.{kind}"
            if arch == "llama" and stem == "self_attn.q_proj":
                t = _llama_cpp_permute(t, c.num_attention_heads)
            elif arch == "llama" and stem == "self_attn.k_proj":
                t = _llama_cpp_permute(t, c.num_key_value_heads)
        w.add_tensor(gname, np.ascontiguousarray(t))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize(
    ("family", "arch"), [("llama_tied", "llama"), ("qwen2", "qwen2"), ("qwen3", "qwen3")]
)
def test_gguf_logits_match_transformers(tmp_path, family, arch):
    hf = tiny_hf_model(family)
    path = tmp_path / "tiny.gguf"
    write_gguf(hf, arch, path)
    m = load_model(str(path), "float32")
    assert m.tokenizer is None
    assert m.spec.qkv_bias == (arch == "qwen2") and m.spec.qk_norm == (arch == "qwen3")
    cache = llama.init_kv_cache(m.spec, NUM_BLOCKS, BLOCK_SIZE)
    ours, _ = run_tokens(m.params, m.spec, PROMPT, 0, cache)
    with torch.no_grad():
        ref = hf(torch.tensor([PROMPT])).logits[0].numpy()
    assert rel_err(ours, ref) <= 1e-4


def test_unsupported_gguf_architecture(tmp_path):
    path = tmp_path / "x.gguf"
    w = gguf.GGUFWriter(str(path), "gpt2")
    w.add_tensor("token_embd.weight", np.zeros((4, 4), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ValueError, match="gpt2.*llama"):
        load_model(str(path))
