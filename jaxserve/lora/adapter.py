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

if TYPE_CHECKING:  # only its fields are read; importing it would import jax
    from jaxserve.model.spec import ModelSpec

# the LayerParams fields (jaxserve/model/llama.py) a LoRA adapter may modify
LORA_TARGETS = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")
# PEFT / HF module name -> our LayerParams field
PEFT_MODULES = {
    "q_proj": "wq",
    "k_proj": "wk",
    "v_proj": "wv",
    "o_proj": "wo",
    "gate_proj": "w_gate",
    "up_proj": "w_up",
    "down_proj": "w_down",
}
# HF parent module of each projection inside a decoder layer
_PARENT = {
    m: ("mlp" if m in ("gate_proj", "up_proj", "down_proj") else "self_attn") for m in PEFT_MODULES
}
# modules of an HF Llama-family model that LoRA would also match but the engine does not adapt
_OTHER_TOP_MODULES = (
    *("", "model", "model.embed_tokens", "model.layers", "model.norm", "model.rotary_emb"),
    "lm_head",
)
_OTHER_LAYER_MODULES = (
    *("", ".self_attn", ".mlp", ".mlp.act_fn", ".input_layernorm", ".post_attention_layernorm"),
    *(".self_attn.q_norm", ".self_attn.k_norm"),
)

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"

# config fields that must be unset (None / False / empty) because they change the math
_UNSUPPORTED_FIELDS = {
    "use_dora": "DoRA (weight-decomposed LoRA)",
    "lora_bias": "a bias on lora_B",
    "modules_to_save": "fully trained extra modules",
    "fan_in_fan_out": "transposed (Conv1D) base weights",
    "layer_replication": "layer replication",
    "trainable_token_indices": "trainable token embeddings",
    "target_parameters": "LoRA on raw parameters",
    "alora_invocation_tokens": "activated LoRA (applied only after invocation tokens)",
    "use_qalora": "QA-LoRA",
    "use_bdlora": "BD-LoRA",
    "arrow_config": "Arrow routing",
    "monteclora_config": "MonteCLoRA",
    "kasa_config": "KaSA",
    "velora_config": "VeLoRA",
}
# init_lora_weights values that leave a residual in the base weights until converted
_BASE_MODIFYING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")
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
    rank, alpha, use_rslora = _check_config(config, cfg_name)
    expected = _targeted_modules(config, spec, cfg_name)  # (layer, module) -> hf name
    ranks: dict[tuple[int, str], int] = {}
    scales: dict[tuple[int, str], float] = {}
    for key, hf_name in expected.items():
        r = _pattern_value(config, "rank_pattern", hf_name, rank, cfg_name)
        a = _pattern_value(config, "alpha_pattern", hf_name, alpha, cfg_name)
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
        if parent != _PARENT[module]:
            raise ValueError(
                f"{file}: tensor {name!r} puts {module} under {parent!r}; this model has it "
                f"under {_PARENT[module]!r}"
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


# --- config ------------------------------------------------------------------------------


def _check_config(config: dict[str, Any], where: str) -> tuple[int, float, bool]:
    """(r, lora_alpha, use_rslora) after refusing what the engine cannot compute."""
    if config.get("peft_type") != "LORA":
        raise ValueError(
            f"{where}: peft_type is {config.get('peft_type')!r}; only 'LORA' is served"
        )
    for field, what in _UNSUPPORTED_FIELDS.items():
        if config.get(field):
            raise ValueError(f"{where}: {field} = {config[field]!r} ({what}) is not supported")
    if config.get("bias", "none") != "none":
        raise ValueError(
            f"{where}: bias = {config['bias']!r} is not supported (it trains the base model's "
            f"biases); only 'none'"
        )
    init = str(config.get("init_lora_weights", True)).lower()
    if init.startswith(_BASE_MODIFYING_INITS):
        raise ValueError(
            f"{where}: init_lora_weights = {config['init_lora_weights']!r} presumes a modified "
            f"base model; convert it to a plain LoRA first (peft: save_pretrained(..., "
            f"path_initial_model_for_weight_conversion=...))"
        )
    r, alpha = config.get("r", 8), config.get("lora_alpha", 8)
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise ValueError(f"{where}: r must be a positive integer, got {r!r}")
    if not isinstance(alpha, int | float) or isinstance(alpha, bool):
        raise ValueError(f"{where}: lora_alpha must be a number, got {alpha!r}")
    return r, float(alpha), bool(config.get("use_rslora", False))


def _pattern_value(
    config: dict[str, Any], field: str, hf_name: str, default: float, where: str
) -> Any:
    """PEFT's get_pattern_key: the first key whose regex matches a dotted suffix of the name."""
    pattern = config.get(field) or {}
    if not isinstance(pattern, dict):
        raise ValueError(f"{where}: {field} must be a JSON object, got {pattern!r}")
    for key, value in pattern.items():
        try:
            hit = re.match(rf"(.*\.)?({key})$", hf_name)
        except re.error as e:
            raise ValueError(f"{where}: {field} key {key!r} is not a regex ({e})") from None
        if hit:
            if not isinstance(value, int | float) or isinstance(value, bool):
                raise ValueError(f"{where}: {field}[{key!r}] must be a number, got {value!r}")
            return value
    return default


def _hf_module_names(spec: ModelSpec) -> list[tuple[str, int | None, str | None]]:
    """(HF module name, layer, projection or None) for every module of the base model."""
    names: list[tuple[str, int | None, str | None]] = [(n, None, None) for n in _OTHER_TOP_MODULES]
    for i in range(spec.num_layers):
        base = f"model.layers.{i}"
        names += [(base + s, i, None) for s in _OTHER_LAYER_MODULES]
        names += [(f"{base}.{_PARENT[m]}.{m}", i, m) for m in PEFT_MODULES]
    return names


def _targeted_modules(
    config: dict[str, Any], spec: ModelSpec, where: str
) -> dict[tuple[int, str], str]:
    """(layer, module) -> HF name of every module PEFT would wrap on this base model."""
    targets = config.get("target_modules")
    if isinstance(targets, str) and targets.lower() == "all-linear":
        targets = list(PEFT_MODULES)
    if isinstance(targets, list) and not all(isinstance(t, str) for t in targets):
        raise ValueError(f"{where}: target_modules must be a list of strings, got {targets!r}")
    if not targets or not isinstance(targets, str | list):
        raise ValueError(f"{where}: target_modules must name modules, got {targets!r}")
    layers = config.get("layers_to_transform")
    if isinstance(layers, int) and not isinstance(layers, bool):
        layers = [layers]
    if layers is not None and not (
        isinstance(layers, list)
        and all(isinstance(x, int) and not isinstance(x, bool) for x in layers)
    ):
        raise ValueError(f"{where}: layers_to_transform must be a list of ints, got {layers!r}")
    for x in layers or []:
        if not 0 <= x < spec.num_layers:
            raise ValueError(
                f"{where}: layers_to_transform names layer {x}, but the base model has "
                f"{spec.num_layers} layers"
            )
    layers_pattern = config.get("layers_pattern") or None
    if isinstance(layers_pattern, str):
        layers_pattern = [layers_pattern]
    exclude = config.get("exclude_modules") or None

    found: dict[tuple[int, str], str] = {}
    for name, layer, module in _hf_module_names(spec):
        if _excluded(exclude, name):
            continue
        if isinstance(targets, str):
            try:
                hit = re.fullmatch(targets, name) is not None
            except re.error as e:
                raise ValueError(
                    f"{where}: target_modules {targets!r} is not a regex ({e})"
                ) from None
        else:
            hit = any(name == t or name.endswith("." + t) for t in targets)
            if hit and layers:
                hit = _layer_index(name, layers_pattern) in layers
        if not hit:
            continue
        if module is None:
            raise ValueError(
                f"{where}: target_modules {targets!r} matches {name!r}, which is not supported; "
                f"LoRA is served on {list(PEFT_MODULES)} only"
            )
        found[(layer, module)] = name
    if not found:
        raise ValueError(
            f"{where}: target_modules {targets!r} matches no module of the base model "
            f"(supported: {list(PEFT_MODULES)})"
        )
    return found


def _excluded(exclude: Any, name: str) -> bool:
    if exclude is None:
        return False
    if isinstance(exclude, str):
        return re.fullmatch(exclude, name) is not None
    return name in exclude or any(name.endswith("." + e) for e in exclude)


def _layer_index(name: str, layers_pattern: list[str] | None) -> int | None:
    """PEFT's layer index of a module name (the first numbered segment)."""
    if not layers_pattern:
        m = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", name)
    else:
        m = None
        for p in layers_pattern:
            m = re.match(rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.", name)
            if m is not None:
                break
    return int(m["idx"]) if m else None
