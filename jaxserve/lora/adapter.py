"""PEFT LoRA adapters read from disk (no torch, no jax): config checks, weights in x @ W layout.

`load_peft_adapter` turns a PEFT directory (`adapter_config.json` + `adapter_model.safetensors`)
into `LoRAWeights`: per target, A f32[L, in, r] and B f32[L, r, out] with the scale folded into
B, so the engine's delta is `x @ a @ b`. Whatever the engine cannot compute exactly as PEFT
does is refused with a ValueError naming the file, key or field; nothing is silently dropped.

Decisions (where the issue is silent):
- `target_modules` is resolved as PEFT resolves it, against the module names of an HF
  Llama-family model (`model.layers.{i}.self_attn.q_proj`, ...): a string is a regex
  full-matched against each name ("all-linear" is our 7 projections), a list entry matches a
  name equal to it or ending in ".entry", and `layers_to_transform`/`layers_pattern` restrict
  the layers of list entries only (PEFT ignores them for a regex). A match on anything but the
  7 projections (embed_tokens, lm_head, a norm, a container) is refused; entries that match
  nothing are ignored, as PEFT does, unless nothing matches at all. `exclude_modules` is
  honoured with PEFT's rules.
- The tensors must be exactly the targeted (layer, module) pairs, each with both lora_A and
  lora_B: an extra one is refused (it would be ignored by the target list), a missing one too
  (a truncated file; PEFT would run that module with its random init).
- `rank_pattern` / `alpha_pattern` are supported (PEFT's suffix-regex match per module): the
  per-module scale is folded into b, and modules of a smaller rank are zero-padded to `rank`,
  the largest rank in the adapter (zero rows/columns add nothing to x @ a @ b).
- Refused config features that change the math: peft_type != LORA, use_dora, bias != "none",
  lora_bias, modules_to_save, fan_in_fan_out, layer_replication, trainable_token_indices,
  target_parameters, activated LoRA (alora_invocation_tokens), QA-LoRA, BD-LoRA, Arrow,
  MonteCLoRA, KaSA, VeLoRA, and PiSSA/OLoRA/CorDA/LoftQ/LoRA-GA initialisations that were not
  converted (they presume a modified base model). Other fields (dropout, task_type, the base
  model's name, init methods that leave the base alone) do not change inference and are ignored.
- Tensor dtypes F32, F16, BF16 and F64 are read and converted to float32; bf16 is decoded by
  hand (safetensors' numpy path has no bfloat16).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import safetensors

from jaxserve.lora.peft_config import (
    LORA_TARGETS,
    PARENT_MODULE,
    PEFT_MODULES,
    check_config,
    pattern_value,
    targeted_modules,
)

if TYPE_CHECKING:  # only its fields are read; importing it would import jax
    from jaxserve.model.spec import ModelSpec

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"

# `...layers.{i}.{parent}.{module}.lora_{A|B}.weight`, with any prefix before `layers.`
_KEY_RE = re.compile(
    r"^(?:.*\.)?layers\.(?P<layer>\d+)\.(?P<parent>[^.]+)\.(?P<module>[^.]+)"
    r"\.lora_(?P<ab>[AB])\.weight$"
)
_DTYPES = {"F32": np.float32, "F16": np.float16, "F64": np.float64}


@dataclass(frozen=True)
class LoRAWeights:
    """One adapter's weights in the engine's layout, ready to copy into a device slot."""

    # width of every a/b below: the adapter's r (the largest, with a rank_pattern)
    rank: int
    # the adapter-wide scale, alpha / r (alpha / sqrt(r) with use_rslora); ALREADY folded into
    # every b (per module, with alpha_pattern/rank_pattern): never multiply by it again
    scale: float
    # target (a LORA_TARGETS name) -> (a f32[L, in, rank], b f32[L, rank, out]) with
    # delta = x @ a @ b; only the targets the adapter has; uncovered layers are zeros
    weights: dict[str, tuple[np.ndarray, np.ndarray]]

    @property
    def nbytes(self) -> int:
        """Host bytes of all a and b arrays."""
        return sum(a.nbytes + b.nbytes for a, b in self.weights.values())


def target_dims(spec: ModelSpec, target: str) -> tuple[int, int]:
    """(in, out) of the base weight `target` in x @ W layout."""
    e, f = spec.hidden_size, spec.intermediate_size
    q, kv = spec.num_q_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
    dims = {
        "wq": (e, q),
        "wk": (e, kv),
        "wv": (e, kv),
        "wo": (q, e),
        "w_gate": (e, f),
        "w_up": (e, f),
        "w_down": (f, e),
    }
    if target not in dims:
        raise ValueError(f"unknown LoRA target {target!r}; known: {list(LORA_TARGETS)}")
    return dims[target]


def load_peft_adapter(path: str | Path, spec: ModelSpec, max_lora_rank: int) -> LoRAWeights:
    """Reads and checks a PEFT LoRA directory against the base model `spec`."""
    root = _check_dir(Path(path))
    config = _read_config(root / CONFIG_FILE)
    cfg_name = str(root / CONFIG_FILE)
    rank, alpha, use_rslora = check_config(config, cfg_name)
    expected = targeted_modules(config, spec, cfg_name)  # (layer, module) -> hf name
    ranks: dict[tuple[int, str], int] = {}
    scales: dict[tuple[int, str], float] = {}
    for key, hf_name in expected.items():
        r = pattern_value(config, "rank_pattern", hf_name, rank, cfg_name)
        a = pattern_value(config, "alpha_pattern", hf_name, alpha, cfg_name)
        if not isinstance(r, int):
            raise ValueError(f"{cfg_name}: rank_pattern gives {hf_name} a non-integer rank {r!r}")
        if r < 1 or r > max_lora_rank:
            where = "r" if r == rank else f"rank_pattern for {hf_name}"
            raise ValueError(
                f"{cfg_name}: {where} = {r} is outside 1..max_lora_rank ({max_lora_rank})"
            )
        ranks[key] = r
        scales[key] = a / math.sqrt(r) if use_rslora else a / r
    width = max(ranks.values())

    file = root / WEIGHTS_FILE
    pairs = _read_pairs(file, spec)
    extra, missing = sorted(pairs.keys() - expected.keys()), sorted(expected.keys() - pairs.keys())
    if extra:  # PEFT would skip them: a sign the config and the weights disagree
        layer, module = extra[0]
        raise ValueError(
            f"{file}: has tensors for layer {layer} {module}, which adapter_config.json's "
            f"target_modules / layers_to_transform do not target"
        )
    if missing:  # PEFT would run these modules with their random init
        raise ValueError(
            f"{file}: no lora_A/lora_B tensors for the targeted {expected[missing[0]]}"
        )

    weights: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for (layer, module), (a_key, a_w, b_key, b_w) in sorted(pairs.items()):
        target = PEFT_MODULES[module]
        d_in, d_out = target_dims(spec, target)
        r = ranks[(layer, module)]
        for k, w, want in ((a_key, a_w, (r, d_in)), (b_key, b_w, (d_out, r))):
            if w.shape != want:
                raise ValueError(
                    f"{file}: {k} has shape {list(w.shape)}, expected {list(want)} for r={r} "
                    f"and the base model's {module} ({d_in} -> {d_out}); is the adapter for "
                    f"another base model?"
                )
        if target not in weights:
            weights[target] = (
                np.zeros((spec.num_layers, d_in, width), np.float32),
                np.zeros((spec.num_layers, width, d_out), np.float32),
            )
        a_out, b_out = weights[target]
        a_out[layer, :, :r] = a_w.T
        b_out[layer, :r, :] = b_w.T * np.float32(scales[(layer, module)])
    default_scale = alpha / math.sqrt(rank) if use_rslora else alpha / rank
    return LoRAWeights(rank=width, scale=default_scale, weights=weights)


# --- files -------------------------------------------------------------------------------


def _check_dir(root: Path) -> Path:
    if not root.exists():
        raise ValueError(f"LoRA adapter path {str(root)!r} does not exist")
    if not root.is_dir():
        raise ValueError(
            f"LoRA adapter path {str(root)!r} is not a directory (a PEFT adapter is a "
            f"directory with {CONFIG_FILE} and {WEIGHTS_FILE})"
        )
    if not (root / CONFIG_FILE).is_file():
        raise ValueError(f"{root}: no {CONFIG_FILE} (not a PEFT adapter directory)")
    if not (root / WEIGHTS_FILE).is_file():
        if (root / "adapter_model.bin").is_file():
            raise ValueError(
                f"{root}: has adapter_model.bin but no {WEIGHTS_FILE}; torch pickles are not "
                f"read (unsafe, and need torch): convert it to safetensors, e.g. "
                f"PeftModel.from_pretrained(...).save_pretrained(dir, safe_serialization=True)"
            )
        raise ValueError(f"{root}: no {WEIGHTS_FILE}")
    return root


def _read_config(path: Path) -> dict[str, Any]:
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path}: must hold a JSON object, got {type(config).__name__}")
    return config


def _decode(file: Path, name: str, info: dict[str, Any]) -> np.ndarray:
    """One tensor from safetensors.deserialize as float32 (bf16 decoded by hand)."""
    dtype, shape, data = info["dtype"], info["shape"], info["data"]
    if dtype == "BF16":  # the high half of a float32
        bits = np.frombuffer(data, dtype="<u2").astype(np.uint32) << 16
        return bits.view(np.float32).reshape(shape)
    if dtype not in _DTYPES:
        raise ValueError(f"{file}: {name} has dtype {dtype}; LoRA weights must be F32/F16/BF16")
    return (
        np.frombuffer(data, dtype=np.dtype(_DTYPES[dtype]).newbyteorder("<"))
        .reshape(shape)
        .astype(np.float32)
    )


def _read_pairs(
    file: Path, spec: ModelSpec
) -> dict[tuple[int, str], tuple[str, np.ndarray, str, np.ndarray]]:
    """(layer, module) -> (lora_A key, A [r, in], lora_B key, B [out, r]), keys checked."""
    try:
        tensors = safetensors.deserialize(file.read_bytes())
    except Exception as e:  # SafetensorError and friends: a corrupt or truncated file
        raise ValueError(f"{file}: not a readable safetensors file ({e})") from None
    halves: dict[tuple[int, str], dict[str, tuple[str, np.ndarray]]] = {}
    for name, info in tensors:
        m = _KEY_RE.match(name)
        if m is None:
            raise ValueError(
                f"{file}: tensor {name!r} is not a LoRA weight of a decoder layer projection "
                f"(expected ...layers.{{i}}.self_attn.q_proj.lora_A.weight and the like, for "
                f"modules {list(PEFT_MODULES)})"
            )
        layer, parent, module = int(m["layer"]), m["parent"], m["module"]
        if module not in PEFT_MODULES:
            raise ValueError(
                f"{file}: tensor {name!r} adapts module {module!r}, which is not supported "
                f"(supported: {list(PEFT_MODULES)})"
            )
        if parent != PARENT_MODULE[module]:
            raise ValueError(
                f"{file}: tensor {name!r} puts {module} under {parent!r}; this model has it "
                f"under {PARENT_MODULE[module]!r}"
            )
        if layer >= spec.num_layers:
            raise ValueError(
                f"{file}: tensor {name!r} is for layer {layer}, but the base model has "
                f"{spec.num_layers} layers (0..{spec.num_layers - 1})"
            )
        halves.setdefault((layer, module), {})[m["ab"]] = (name, _decode(file, name, info))
    pairs = {}
    for (layer, module), h in halves.items():
        if set(h) != {"A", "B"}:
            have, lack = next(iter(h.values()))[0], "lora_B" if "A" in h else "lora_A"
            raise ValueError(f"{file}: {have!r} has no matching {lack} tensor")
        pairs[(layer, module)] = (*h["A"], *h["B"])
    return pairs
