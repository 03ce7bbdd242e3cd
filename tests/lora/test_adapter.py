"""load_peft_adapter against peft itself, and every refusal naming what is wrong.

The oracle is peft's merge_and_unload: for every target and layer, our x @ W delta `a @ b`
must equal (merged weight - base weight).T. Tolerance: 2 * eps32 * max(|W|, |W + delta|) per
weight. peft rounds the merged weight to float32 once (at most eps/2 of its magnitude), the
subtraction of the base is then exact or off by one more such rounding, and the two sides sum
the r products of A and B in different orders (a few eps of |delta|, which is below |W| here).
Measured: at most 0.91 * eps32 * max|W| over all cases.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from jaxserve.lora.adapter import (
    LORA_TARGETS,
    PEFT_MODULES,
    load_peft_adapter,
    target_dims,
)
from jaxserve.model.spec import ModelSpec

from ..model.helpers import tiny_hf_model
from .peft_util import hf_base_model, make_peft_adapter, peft_deltas, peft_greedy

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
MLP = ["gate_proj", "up_proj", "down_proj"]
ALL = ATTN + MLP
EPS = float(np.finfo(np.float32).eps)
MAX_RANK = 16


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> dict[str, tuple[Path, ModelSpec]]:
    """arch -> (HF dir, its ModelSpec) for a tiny Llama and a tiny Qwen2 (q/k/v biases)."""
    out = {}
    for arch in ("llama_tied", "qwen2"):
        path = tmp_path_factory.mktemp(arch)
        tiny_hf_model(arch).save_pretrained(path, safe_serialization=True)
        out[arch] = (path, _spec(path))
    return out


def _spec(path: Path) -> ModelSpec:
    return ModelSpec.from_hf_config(json.loads((path / "config.json").read_text()))


def _assert_matches_peft(base: Path, adapter: Path, spec: ModelSpec) -> None:
    """For every target and layer: a @ b == peft's merged delta (zeros where untargeted)."""
    w = load_peft_adapter(adapter, spec, MAX_RANK)
    deltas = peft_deltas(base, adapter)
    base_sd = hf_base_model(base).state_dict()
    assert len(deltas) == spec.num_layers * len(LORA_TARGETS)
    for (layer, module), want in deltas.items():
        target = PEFT_MODULES[module]
        parent = "mlp" if module in MLP else "self_attn"
        base_w = base_sd[f"model.layers.{layer}.{parent}.{module}.weight"].numpy().T
        if target in w.weights:
            a, b = w.weights[target]
            assert a.dtype == b.dtype == np.float32
            assert a.shape == (spec.num_layers, target_dims(spec, target)[0], w.rank)
            assert b.shape == (spec.num_layers, w.rank, target_dims(spec, target)[1])
            got = a[layer] @ b[layer]
        else:
            got = np.zeros_like(want)
        tol = 2 * EPS * max(np.abs(base_w).max(), np.abs(base_w + want).max())
        np.testing.assert_allclose(got, want, rtol=0, atol=tol, err_msg=f"{layer} {module}")


@pytest.mark.parametrize("arch", ["llama_tied", "qwen2"])
@pytest.mark.parametrize(("rank", "alpha", "use_rslora"), [(8, 16, False), (16, 24, True)])
@pytest.mark.parametrize("targets", [ATTN, MLP, ALL], ids=["attn", "mlp", "all"])
def test_matches_peft_merge(bases, tmp_path, arch, rank, alpha, use_rslora, targets):
    base, spec = bases[arch]
    adapter = make_peft_adapter(
        base, tmp_path, rank=rank, alpha=alpha, target_modules=targets, use_rslora=use_rslora
    )
    w = load_peft_adapter(adapter, spec, MAX_RANK)
    assert w.rank == rank
    assert w.scale == pytest.approx(alpha / math.sqrt(rank) if use_rslora else alpha / rank)
    assert set(w.weights) == {PEFT_MODULES[m] for m in targets}
    assert w.nbytes == sum(a.nbytes + b.nbytes for a, b in w.weights.values())
    _assert_matches_peft(base, adapter, spec)


@pytest.mark.parametrize(
    "config",
    [
        dict(target_modules=["q_proj", "down_proj"], layers_to_transform=[1]),
        dict(target_modules=ALL, rank_pattern={"q_proj": 4}, alpha_pattern={"down_proj": 40}),
        dict(target_modules=r"model\.layers\.\d+\.self_attn\.(q_proj|v_proj)"),
        dict(target_modules="all-linear", exclude_modules=["o_proj"]),
    ],
    ids=["layers_to_transform", "rank_alpha_pattern", "regex", "all_linear_exclude"],
)
def test_config_variants_match_peft(bases, tmp_path, config):
    base, spec = bases["llama_tied"]
    adapter = make_peft_adapter(base, tmp_path, rank=8, alpha=16, **config)
    _assert_matches_peft(base, adapter, spec)
    w = load_peft_adapter(adapter, spec, MAX_RANK)
    if "layers_to_transform" in config:
        for a, b in w.weights.values():
            assert not a[0].any() and not b[0].any() and a[1].any() and b[1].any()
    if "rank_pattern" in config:
        a, b = w.weights["wq"]  # rank 4 in a rank-8 adapter: zero-padded
        assert w.rank == 8 and not a[:, :, 4:].any() and not b[:, 4:, :].any()
    if isinstance(config["target_modules"], str):
        expected = {"wq", "wv"} if "q_proj" in config["target_modules"] else set(LORA_TARGETS)
        assert set(w.weights) == expected - ({"wo"} if "exclude_modules" in config else set())


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_files(bases, tmp_path, dtype):
    """bf16/f16 tensors decode exactly (bf16 by hand: numpy has no bfloat16)."""
    base, spec = bases["llama_tied"]
    adapter = make_peft_adapter(base, tmp_path / "a", rank=8, alpha=16, target_modules=ALL)
    from safetensors.torch import load_file as tload
    from safetensors.torch import save_file as tsave

    tensors = tload(adapter / "adapter_model.safetensors")
    half = {k: v.to(getattr(torch, dtype)) for k, v in tensors.items()}
    rounded = _copy(adapter, tmp_path / "f32")
    tsave({k: v.float() for k, v in half.items()}, rounded / "adapter_model.safetensors")
    tsave(half, adapter / "adapter_model.safetensors")
    got, want = load_peft_adapter(adapter, spec, 16), load_peft_adapter(rounded, spec, 16)
    for target, (a, b) in want.weights.items():
        np.testing.assert_array_equal(got.weights[target][0], a)
        np.testing.assert_array_equal(got.weights[target][1], b)


def test_adapter_changes_greedy_tokens(bases, tmp_path):
    """The fixture is not a no-op (peft's zero-init B would be): greedy tokens change."""
    base, _ = bases["llama_tied"]
    adapter = make_peft_adapter(base, tmp_path, rank=8, alpha=16, target_modules=ALL)
    prompt = [5, 17, 200, 3, 99, 42, 42, 7]
    assert peft_greedy(base, adapter, prompt, 8) != peft_greedy(base, None, prompt, 8)
    again = make_peft_adapter(base, tmp_path / "again", rank=8, alpha=16, target_modules=ALL)
    assert (again / "adapter_model.safetensors").read_bytes() == (
        adapter / "adapter_model.safetensors"
    ).read_bytes()  # deterministic per seed


def test_reads_without_torch_or_jax():
    """The server reads adapters in processes that may have neither (issue 13: no torch)."""
    code = (
        "import sys, jaxserve.lora.adapter; "
        "print(sorted(m for m in ('jax', 'torch', 'ml_dtypes') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# --- refusals ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def good(bases, tmp_path_factory) -> Path:
    """A valid rank-8 adapter on q/v/down of the tiny Llama, copied and broken by each test."""
    base, _ = bases["llama_tied"]
    out = tmp_path_factory.mktemp("good")
    return make_peft_adapter(
        base, out, rank=8, alpha=16, target_modules=["q_proj", "v_proj", "down_proj"]
    )


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _with_config(src: Path, dst: Path, **changes) -> Path:
    _copy(src, dst)
    config = json.loads((dst / "adapter_config.json").read_text())
    config.update(changes)
    (dst / "adapter_config.json").write_text(json.dumps(config))
    return dst


def _with_tensors(src: Path, dst: Path, edit) -> Path:
    _copy(src, dst)
    tensors = load_file(dst / "adapter_model.safetensors")
    save_file(edit(dict(tensors)), dst / "adapter_model.safetensors")
    return dst


Q0 = "base_model.model.model.layers.0.self_attn.q_proj"

# (name, how to break the adapter in dst, fragments the message must contain)
CONFIG_CASES = [
    ("peft_type", dict(peft_type="IA3"), ["peft_type", "IA3"]),
    ("rank_over_max", dict(r=32), ["r = 32", "max_lora_rank (16)"]),
    ("rank_zero", dict(r=0), ["r must be a positive integer", "0"]),
    ("embed_tokens", dict(target_modules=["q_proj", "embed_tokens"]), ["model.embed_tokens"]),
    ("lm_head", dict(target_modules=["lm_head"]), ["'lm_head'", "not supported"]),
    ("regex_lm_head", dict(target_modules=r"(.*\.)?(q_proj|lm_head)"), ["'lm_head'"]),
    ("bad_regex", dict(target_modules="(["), ["target_modules", "not a regex"]),
    ("no_match", dict(target_modules=["c_attn"]), ["'c_attn'", "matches no module"]),
    ("modules_to_save", dict(modules_to_save=["lm_head"]), ["modules_to_save", "lm_head"]),
    ("dora", dict(use_dora=True), ["use_dora", "DoRA"]),
    ("bias", dict(bias="all"), ["bias = 'all'"]),
    ("lora_bias", dict(lora_bias=True), ["lora_bias"]),
    ("pissa", dict(init_lora_weights="pissa"), ["init_lora_weights = 'pissa'"]),
    ("rank_pattern", dict(rank_pattern={"q_proj": 32}), ["rank_pattern", "q_proj", "32"]),
    ("alpha_pattern", dict(alpha_pattern={"q_proj": "x"}), ["alpha_pattern['q_proj']", "number"]),
    ("layers_to_transform", dict(layers_to_transform=[5]), ["layers_to_transform", "layer 5"]),
    ("extra_tensors", dict(target_modules=["q_proj"]), ["layer 0 down_proj", "do not target"]),
]


@pytest.mark.parametrize(("changes", "fragments"), [c[1:] for c in CONFIG_CASES],
                         ids=[c[0] for c in CONFIG_CASES])  # fmt: skip
def test_bad_config_refused(bases, good, tmp_path, changes, fragments):
    _, spec = bases["llama_tied"]
    bad = _with_config(good, tmp_path / "bad", **changes)
    with pytest.raises(ValueError) as e:
        load_peft_adapter(bad, spec, MAX_RANK)
    assert "adapter_config.json" in str(e.value) or "adapter_model" in str(e.value)
    for f in fragments:
        assert f in str(e.value)


def _rename(old: str, new: str):
    return lambda t: {(k.replace(old, new) if k.startswith(old) else k): v for k, v in t.items()}


TENSOR_CASES = [
    ("layer_out_of_range", _rename(Q0.replace(".0.", ".1."), Q0.replace(".0.", ".7.")),
     ["layers.7.", "layer 7", "2 layers"]),
    ("missing_module", lambda t: {k: v for k, v in t.items() if ".0.self_attn.v_proj" not in k},
     ["model.layers.0.self_attn.v_proj"]),
    ("incomplete_pair", lambda t: {k: v for k, v in t.items() if k != Q0 + ".lora_B.weight"},
     [Q0 + ".lora_A.weight", "no matching lora_B"]),
    ("not_lora", lambda t: {**t, "base_model.model.lm_head.weight": np.zeros((4, 4), np.float32)},
     ["'base_model.model.lm_head.weight'", "not a LoRA weight"]),
    ("unknown_module", _rename(Q0, Q0.replace("q_proj", "qkv_proj")),
     ["'qkv_proj'", "not supported"]),
    ("wrong_parent", _rename(Q0, Q0.replace("self_attn", "mlp")), ["q_proj under 'mlp'"]),
    ("wrong_rank", lambda t: {**t, Q0 + ".lora_A.weight": t[Q0 + ".lora_A.weight"][:4]},
     [Q0 + ".lora_A.weight", "shape [4, 64]", "expected [8, 64]"]),
    ("int_dtype", lambda t: {**t, Q0 + ".lora_A.weight": t[Q0 + ".lora_A.weight"].astype(np.int32)},
     [Q0 + ".lora_A.weight", "dtype I32"]),
]  # fmt: skip


@pytest.mark.parametrize(("edit", "fragments"), [c[1:] for c in TENSOR_CASES],
                         ids=[c[0] for c in TENSOR_CASES])  # fmt: skip
def test_bad_tensors_refused(bases, good, tmp_path, edit, fragments):
    _, spec = bases["llama_tied"]
    bad = _with_tensors(good, tmp_path / "bad", edit)
    with pytest.raises(ValueError) as e:
        load_peft_adapter(bad, spec, MAX_RANK)
    assert "adapter_model.safetensors" in str(e.value)
    for f in fragments:
        assert f in str(e.value)


def test_bad_files_refused(bases, good, tmp_path):
    _, spec = bases["llama_tied"]

    def refused(path: Path, *fragments: str) -> None:
        with pytest.raises(ValueError) as e:
            load_peft_adapter(path, spec, MAX_RANK)
        for f in fragments:
            assert f in str(e.value)

    refused(tmp_path / "nope", "nope", "does not exist")
    (tmp_path / "file").write_text("x")
    refused(tmp_path / "file", "not a directory")
    no_config = _copy(good, tmp_path / "no_config")
    (no_config / "adapter_config.json").unlink()
    refused(no_config, "no adapter_config.json")
    pickle = _copy(good, tmp_path / "pickle")
    (pickle / "adapter_model.safetensors").rename(pickle / "adapter_model.bin")
    refused(pickle, "adapter_model.bin", "torch pickles are not read", "convert")
    (pickle / "adapter_model.bin").unlink()
    refused(pickle, "no adapter_model.safetensors")
    bad_json = _copy(good, tmp_path / "bad_json")
    (bad_json / "adapter_config.json").write_text('{"r": 8,')
    refused(bad_json, "adapter_config.json", "not valid JSON")
    (bad_json / "adapter_config.json").write_text("[1, 2]")
    refused(bad_json, "adapter_config.json", "JSON object", "list")
    truncated = _copy(good, tmp_path / "truncated")
    data = (truncated / "adapter_model.safetensors").read_bytes()
    (truncated / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    refused(truncated, "adapter_model.safetensors", "not a readable safetensors file")


def test_adapter_for_another_base_refused(bases, tmp_path):
    """An adapter trained on a base with another hidden size names the shape mismatch."""
    import transformers as tf

    other = tf.LlamaConfig(
        vocab_size=256,
        hidden_size=32,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    tf.LlamaForCausalLM(other).save_pretrained(tmp_path / "other", safe_serialization=True)
    adapter = make_peft_adapter(tmp_path / "other", tmp_path / "a", rank=8, alpha=16,
                                target_modules=ALL)  # fmt: skip
    _, spec = bases["llama_tied"]  # hidden 64
    with pytest.raises(ValueError) as e:
        load_peft_adapter(adapter, spec, MAX_RANK)
    msg = str(e.value)
    assert "adapter_model.safetensors" in msg and "another base model" in msg
    assert "shape [8, 32], expected [8, 64]" in msg or "shape [32, 8], expected [64, 8]" in msg
