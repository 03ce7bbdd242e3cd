"""What a PEFT adapter_config.json means for the engine: which (layer, module) pairs it
targets, their ranks and scales, and the config features refused because they change the math
(see jaxserve/lora/adapter.py's docstring for the decisions). json-level only: no tensors, no
jax, no torch.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

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
PARENT_MODULE = {
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


def check_config(config: dict[str, Any], where: str) -> tuple[int, float, bool]:
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


def pattern_value(
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
        names += [(f"{base}.{PARENT_MODULE[m]}.{m}", i, m) for m in PEFT_MODULES]
    return names


def targeted_modules(
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
