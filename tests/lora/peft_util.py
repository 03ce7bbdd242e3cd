"""PEFT fixtures and oracles for the LoRA tests: random adapters saved by peft, and peft's own
logits, greedy tokens and merged weights (transformers + peft, torch on CPU, float32).

A base is an HF `save_pretrained` dir (config.json + safetensors, e.g. the `tiny_model_dir`
fixture or a `tiny_hf_model(arch)` saved to a dir), a GGUF file (the `smollm2_gguf` fixture),
or the name of a built-in model ("smollm2-135m"). GGUF bases are read the way
tests/model/test_smollm2.py reads them (transformers' own dequantizer, no download), so the
oracle runs on the same weights jaxserve loads.
"""

from __future__ import annotations

import copy
import functools
import math
from pathlib import Path
from typing import Any

import numpy as np

# the std of a random adapter's delta (B @ A * scaling) relative to its base weight's std:
# large enough that greedy tokens of the tiny models and of smollm2 change within a few tokens
# (measured; test_adapter.py checks the tiny Llama), small enough that smollm2 stays coherent
DELTA_REL_STD = 0.1


def hf_base_model(base: str | Path) -> Any:
    """A fresh transformers model (float32, eval) of `base`; callers may modify it freely."""
    import torch
    from transformers import AutoModelForCausalLM

    from jaxserve.model.builtin import BUILTIN_MODELS, fetch_builtin

    path = fetch_builtin(str(base)) if str(base) in BUILTIN_MODELS else Path(base)
    if path.is_dir():  # fast: not cached, so a rewritten dir is always read afresh
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return copy.deepcopy(_load_gguf(str(path)))


@functools.lru_cache(maxsize=1)
def _load_gguf(path: str) -> Any:
    """transformers' dequantize + Q/K un-permute, without from_pretrained(gguf_file=), as in
    tests/model/test_smollm2.py; ~35 s for smollm2 on 2 cores, hence cached per process."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    gguf = Path(path)
    config = AutoConfig.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    state = load_gguf_checkpoint(path, return_tensors=True, model_to_load=model)["tensors"]
    missing = model.load_state_dict(state, strict=False).missing_keys
    assert missing in ([], ["lm_head.weight"]), missing  # lm_head is missing only when tied
    model.tie_weights()
    return model


def make_peft_adapter(
    base_dir: str | Path,
    out_dir: str | Path,
    *,
    rank: int,
    alpha: float,
    target_modules: list[str] | str,
    use_rslora: bool = False,
    seed: int = 0,
    std: float | None = None,
    **lora_config: Any,
) -> Path:
    """Saves a random PEFT LoRA adapter for `base_dir` in `out_dir` (safetensors); returns it.

    Both lora_A and lora_B are random normal (peft zero-inits B, which would make the adapter
    a no-op and a test of it unable to fail). `std`: of every A and B entry; None sizes each
    module so its delta's std is DELTA_REL_STD times its base weight's std, which works for
    any base. Extra keywords go to LoraConfig (layers_to_transform, rank_pattern, ...).
    Deterministic per seed.
    """
    import torch
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraLayer

    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        target_modules=target_modules,
        use_rslora=use_rslora,
        lora_dropout=0.0,
        **lora_config,
    )
    model = get_peft_model(hf_base_model(base_dir), config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, module in sorted(model.named_modules(), key=lambda nm: nm[0]):
            if not isinstance(module, LoraLayer):
                continue
            a, b = module.lora_A["default"].weight, module.lora_B["default"].weight
            s = std
            if s is None:  # delta std = scaling * sqrt(r) * s^2
                base_std = float(module.get_base_layer().weight.std())
                scaling = module.scaling["default"]
                s = math.sqrt(DELTA_REL_STD * base_std / (scaling * math.sqrt(a.shape[0])))
            a.copy_(torch.randn(a.shape, generator=gen) * s)
            b.copy_(torch.randn(b.shape, generator=gen) * s)
    model.save_pretrained(str(out_dir), safe_serialization=True)
    return Path(out_dir)


def peft_model(base_dir: str | Path, adapter_dir: str | Path | None) -> Any:
    """The base with the adapter applied by peft (PeftModel.from_pretrained); None: the base."""
    base = hf_base_model(base_dir)
    if adapter_dir is None:
        return base
    from peft import PeftModel

    return PeftModel.from_pretrained(base, str(adapter_dir)).eval()


def peft_logits(
    base_dir: str | Path, adapter_dir: str | Path | None, token_ids: list[int]
) -> np.ndarray:
    """f32[T, V]: the logits of every position of `token_ids` under peft (the oracle)."""
    import torch

    model = peft_model(base_dir, adapter_dir)
    with torch.no_grad():
        return model(torch.tensor([token_ids])).logits[0].float().numpy()


def peft_greedy(
    base_dir: str | Path, adapter_dir: str | Path | None, prompt_ids: list[int], n: int
) -> list[int]:
    """Exactly n greedy tokens after `prompt_ids` (HF generate, do_sample=False, EOS ignored)."""
    import torch

    model = peft_model(base_dir, adapter_dir)
    ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            pad_token_id=0,
        )
    return out[0, len(prompt_ids) :].tolist()


def peft_deltas(base_dir: str | Path, adapter_dir: str | Path) -> dict[tuple[int, str], np.ndarray]:
    """(layer, HF module name) -> f32[in, out]: what merge_and_unload adds to each decoder
    projection, in our x @ W layout ((merged - base).T); zeros where the adapter has none."""
    base = {k: v.clone() for k, v in hf_base_model(base_dir).state_dict().items()}
    merged = peft_model(base_dir, adapter_dir).merge_and_unload().state_dict()
    deltas = {}
    for key, w in merged.items():
        parts = key.split(".")  # model.layers.{i}.{self_attn|mlp}.{module}.weight
        if len(parts) == 6 and parts[1] == "layers" and parts[5] == "weight" and w.ndim == 2:
            deltas[(int(parts[2]), parts[4])] = (w - base[key]).T.detach().numpy().copy()
    return deltas
