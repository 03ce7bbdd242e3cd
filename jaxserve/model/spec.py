"""ModelSpec: the static shape and numerics of a decoder-only model, from HF config or GGUF.

The spec is a frozen, hashable dataclass registered as a static pytree node, so it can ride
along as an ordinary `jit` argument and key the compile cache. It is read once at load time;
nothing in here does I/O (the loaders hand it a parsed dict or GGUF metadata).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import jax

# HF `architectures[0]` -> our family name. All four share one forward (llama.py); the
# differences are flags on the spec (qkv_bias, qk_norm, sliding_window).
HF_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}
# GGUF `general.architecture` values we read. llama.cpp writes Mistral models as "llama".
GGUF_ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3")


@dataclass(frozen=True)
class RopeScaling:
    # "llama3" | "linear" | "freq_factors" (GGUF's per-frequency divisors, llama3.1 style)
    rope_type: str
    # context stretch factor ("llama3", "linear")
    factor: float = 1.0
    # llama3: wavelengths longer than original_max / low_freq_factor are divided by factor
    low_freq_factor: float = 1.0
    # llama3: wavelengths shorter than original_max / high_freq_factor are kept as they are
    high_freq_factor: float = 4.0
    # llama3: the context length the model was pre-trained with
    original_max_position_embeddings: int = 8192
    # "freq_factors": one divisor per rotary frequency (head_dim // 2 of them)
    freq_factors: tuple[float, ...] | None = None


@jax.tree_util.register_static
@dataclass(frozen=True)
class ModelSpec:
    architecture: str  # family: "llama" | "mistral" | "qwen2" | "qwen3"
    vocab_size: int
    hidden_size: int  # E
    intermediate_size: int  # F (SwiGLU width)
    num_layers: int
    num_q_heads: int
    num_kv_heads: int
    head_dim: int  # not always hidden_size // num_q_heads (Qwen3)
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: RopeScaling | None
    max_position_embeddings: int
    tie_word_embeddings: bool  # lm_head is embed.T
    qkv_bias: bool = False  # Qwen2: biases on q/k/v projections
    qk_norm: bool = False  # Qwen3: RMSNorm over head_dim on q and k, before rope
    sliding_window: int | None = None  # Mistral: keys further back than this are masked
    bos_token_id: int | None = None
    eos_token_id: int | None = None  # the first of eos_token_ids
    eos_token_ids: tuple[int, ...] = ()  # every token id that ends generation

    def __post_init__(self) -> None:
        if self.num_q_heads % self.num_kv_heads:
            raise ValueError(
                f"num_q_heads ({self.num_q_heads}) must be a multiple of "
                f"num_kv_heads ({self.num_kv_heads})"
            )

    @classmethod
    def from_hf_config(cls, config: Mapping[str, Any]) -> ModelSpec:
        """Reads a parsed HF `config.json` (transformers 4.x or 5.x layout)."""
        archs = config.get("architectures") or []
        arch_name = archs[0] if archs else str(config.get("model_type", "<missing>"))
        family = HF_ARCHITECTURES.get(arch_name)
        if family is None:
            # a config without `architectures` still loads if its model_type is known
            family = {v: v for v in HF_ARCHITECTURES.values()}.get(arch_name)
        if family is None:
            raise ValueError(
                f"unsupported architecture {arch_name!r}; supported: {sorted(HF_ARCHITECTURES)}"
            )
        num_q = int(config["num_attention_heads"])
        hidden = int(config["hidden_size"])
        # transformers 5 folds rope_theta and rope_scaling into `rope_parameters`
        rope_params = dict(config.get("rope_parameters") or {})
        rope_theta = float(config.get("rope_theta") or rope_params.get("rope_theta") or 10000.0)
        scaling = config.get("rope_scaling") or rope_params
        sliding = None
        if family == "mistral":
            sliding = config.get("sliding_window")
        elif config.get("use_sliding_window"):
            # Qwen2/3 apply it to only some layers (max_window_layers): not modelled here
            raise ValueError(f"use_sliding_window=True is not supported for {arch_name}")
        bos, eos, eos_all = _token_ids(config.get("bos_token_id"), config.get("eos_token_id"))
        return cls(
            architecture=family,
            vocab_size=int(config["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(config["intermediate_size"]),
            num_layers=int(config["num_hidden_layers"]),
            num_q_heads=num_q,
            num_kv_heads=int(config.get("num_key_value_heads") or num_q),
            head_dim=int(config.get("head_dim") or hidden // num_q),
            rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_scaling=_hf_rope_scaling(scaling),
            max_position_embeddings=int(config.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            # Qwen2 always has q/k/v biases; the others only when attention_bias says so
            qkv_bias=family == "qwen2" or bool(config.get("attention_bias", False)),
            qk_norm=family == "qwen3",
            sliding_window=int(sliding) if sliding else None,
            bos_token_id=bos,
            eos_token_id=eos,
            eos_token_ids=eos_all,
        )

    @classmethod
    def from_gguf(
        cls,
        metadata: Mapping[str, Any],
        tensor_names: set[str],
        rope_freqs: tuple[float, ...] | None = None,
    ) -> ModelSpec:
        """Reads GGUF metadata (key -> python value) plus the tensor names present.

        Biases, q/k norms and the untied lm_head are detected from which tensors exist, as
        llama.cpp does; `rope_freqs` is the `rope_freqs.weight` tensor when the file has one.
        """
        arch = str(metadata.get("general.architecture", "<missing>"))
        if arch not in GGUF_ARCHITECTURES:
            raise ValueError(
                f"unsupported GGUF architecture {arch!r}; supported: {list(GGUF_ARCHITECTURES)}"
            )

        def get(key: str, default: Any = None) -> Any:
            return metadata.get(f"{arch}.{key}", default)

        hidden = int(get("embedding_length"))
        num_q = int(get("attention.head_count"))
        head_dim = int(get("attention.key_length") or hidden // num_q)
        vocab = get("vocab_size")
        scaling = None
        if rope_freqs is not None:
            scaling = RopeScaling("freq_factors", freq_factors=rope_freqs)
        elif get("rope.scaling.type") == "linear":
            scaling = RopeScaling("linear", factor=float(get("rope.scaling.factor")))
        elif get("rope.scaling.type") not in (None, "none"):
            raise ValueError(f"unsupported GGUF rope scaling {get('rope.scaling.type')!r}")
        bos, eos, eos_all = _token_ids(
            metadata.get("tokenizer.ggml.bos_token_id"),
            metadata.get("tokenizer.ggml.eos_token_id"),
        )
        return cls(
            architecture=arch,
            vocab_size=int(vocab),
            hidden_size=hidden,
            intermediate_size=int(get("feed_forward_length")),
            num_layers=int(get("block_count")),
            num_q_heads=num_q,
            num_kv_heads=int(get("attention.head_count_kv") or num_q),
            head_dim=head_dim,
            rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-6)),
            rope_theta=float(get("rope.freq_base", 10000.0)),
            rope_scaling=scaling,
            max_position_embeddings=int(get("context_length", 2048)),
            tie_word_embeddings="output.weight" not in tensor_names,
            qkv_bias="blk.0.attn_q.bias" in tensor_names,
            qk_norm="blk.0.attn_q_norm.weight" in tensor_names,
            sliding_window=int(get("attention.sliding_window")) if arch == "mistral" else None,
            bos_token_id=bos,
            eos_token_id=eos,
            eos_token_ids=eos_all,
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (spec.json of a converted checkpoint)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ModelSpec:
        d = dict(d)
        rs = d.get("rope_scaling")
        if rs is not None:
            ff = rs.get("freq_factors")
            rs = RopeScaling(**{**rs, "freq_factors": tuple(ff) if ff is not None else None})
        d["rope_scaling"] = rs
        d["eos_token_ids"] = tuple(d.get("eos_token_ids", ()))
        return cls(**d)


def _token_ids(bos: Any, eos: Any) -> tuple[int | None, int | None, tuple[int, ...]]:
    """(bos, first eos, all eos): HF configs give eos as an int or a list."""
    if isinstance(bos, list):
        bos = bos[0] if bos else None
    eos_all = tuple(int(e) for e in eos) if isinstance(eos, list) else ()
    if not isinstance(eos, list) and eos is not None:
        eos_all = (int(eos),)
    first = eos_all[0] if eos_all else None
    return (int(bos) if bos is not None else None), first, eos_all


def _hf_rope_scaling(scaling: Mapping[str, Any] | None) -> RopeScaling | None:
    if not scaling:
        return None
    kind = scaling.get("rope_type") or scaling.get("type") or "default"
    if kind == "default":
        return None
    if kind == "linear":
        return RopeScaling("linear", factor=float(scaling["factor"]))
    if kind == "llama3":
        return RopeScaling(
            "llama3",
            factor=float(scaling["factor"]),
            low_freq_factor=float(scaling["low_freq_factor"]),
            high_freq_factor=float(scaling["high_freq_factor"]),
            original_max_position_embeddings=int(scaling["original_max_position_embeddings"]),
        )
    raise ValueError(f"unsupported rope scaling type {kind!r}; supported: default, linear, llama3")
