"""One entry point from a `model` string to (spec, params, tokenizer); no torch at runtime.

`model` is a built-in name ("smollm2-135m"), a Hugging Face model dir (config.json +
safetensors, sharded or not), a .gguf file, or a dir written by checkpoint.save_checkpoint;
with load_format="dummy", a shape preset ("dummy:llama3-8b") or an HF dir's config.json with
random weights made on the device (model/dummy.py).
Every source is turned into a stream of HF-named tensors in HF layout ([out, in]); one
assembler transposes them to "x @ W" layout, stacks the layers and casts to the dtype.
"""

from __future__ import annotations

import json
import logging
import shutil
import struct
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from jax.sharding import Mesh

from jaxserve.model import builtin, checkpoint, dummy, presets, sharding
from jaxserve.model.llama import Params, param_shapes, params_from_arrays
from jaxserve.model.spec import ModelSpec

logger = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    spec: ModelSpec
    # None once an engine's runner holds its own placed copy (EngineCore drops this one, so
    # the weights are never on the device twice)
    params: Params | None
    tokenizer: Any | None  # a transformers tokenizer; None when the source has none


# HF per-layer name (after "model.layers.N.") -> (our field, transpose to [in, out]?)
_LAYER_FIELDS = {
    "input_layernorm.weight": ("attn_norm", False),
    "self_attn.q_proj.weight": ("wq", True),
    "self_attn.k_proj.weight": ("wk", True),
    "self_attn.v_proj.weight": ("wv", True),
    "self_attn.o_proj.weight": ("wo", True),
    "self_attn.q_proj.bias": ("bq", False),
    "self_attn.k_proj.bias": ("bk", False),
    "self_attn.v_proj.bias": ("bv", False),
    "self_attn.q_norm.weight": ("q_norm", False),
    "self_attn.k_norm.weight": ("k_norm", False),
    "post_attention_layernorm.weight": ("mlp_norm", False),
    "mlp.gate_proj.weight": ("w_gate", True),
    "mlp.up_proj.weight": ("w_up", True),
    "mlp.down_proj.weight": ("w_down", True),
}
_GLOBAL_FIELDS = {
    "model.embed_tokens.weight": ("embed", False),
    "model.norm.weight": ("final_norm", False),
    "lm_head.weight": ("lm_head", True),
}


def resolve_dtype(dtype: str | jnp.dtype) -> jnp.dtype:
    """ "auto" is float32 on CPU (XLA:CPU bf16 is slow) and bfloat16 on accelerators."""
    if isinstance(dtype, str):
        if dtype == "auto":
            return jnp.dtype(jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16)
        return jnp.dtype(dtype)
    return jnp.dtype(dtype)


def resolve_kv_cache_dtype(kv_cache_dtype: str, weight_dtype: jnp.dtype) -> jnp.dtype:
    """ "auto" is the weights' dtype.

    NOTE: on CPU a bf16 cache is held as uint16 bits (attention.kv_storage_dtype): XLA:CPU
    has no bf16 gather, and with a real bf16 cache it converted the whole layer-stacked cache
    to f32 in every layer of every step (4.8 s against 0.9 s for an f32 cache, a 16-request
    decode step of the default model). As bits, bf16 KV measured faster than f32 KV with bf16
    weights (16 x 64 prompt x 32 output tokens, one quiet run: 103.8 vs 89.4 tok/s; f32
    weights and KV: 81.9).
    """
    if kv_cache_dtype == "auto":
        return jnp.dtype(weight_dtype)
    return jnp.dtype(kv_cache_dtype)


def load_model(
    model: str,
    dtype: str | jnp.dtype = "auto",
    *,
    mesh: Mesh | None = None,
    load_format: str = "auto",
) -> LoadedModel:
    """Loads any supported `model` source; see the module docstring for what `model` may be.

    `mesh`: a tensor-parallel mesh to load onto. The params then come back already sharded in
    the execution layout (sharding.place_params): orbax restores each device's shard directly,
    safetensors/GGUF tensors are assembled on the host and placed shard by shard, so no device
    ever holds the whole model.
    `load_format`: "auto" reads the weights `model` names; "dummy" makes random ones of its
    shape on the device (a preset name needs "dummy": it has no weights to read).
    """
    dt = resolve_dtype(dtype)
    if load_format not in ("auto", "dummy"):
        raise ValueError(f"load_format must be auto|dummy, got {load_format!r}")
    if presets.is_preset_name(model) and load_format != "dummy":
        raise ValueError(f"model={model!r} is a shape preset: it needs load_format='dummy'")
    if load_format == "dummy":
        spec = dummy.dummy_spec(model)
        params = dummy.dummy_params(spec, dt, mesh=mesh)
        return LoadedModel(spec=spec, params=params, tokenizer=load_tokenizer(model))
    kind, path = _resolve(model)
    if kind == "gguf" and model in builtin.BUILTIN_MODELS:
        return _load_builtin_first_time(model, path, dt, mesh)
    if kind == "orbax":
        spec, params = checkpoint.load_checkpoint(path, dt, mesh=mesh)
    elif kind == "gguf":
        from jaxserve.model.gguf_loader import load_gguf

        spec, meta, tensors = load_gguf(path)
        params = assemble_params(spec, tensors, dt, source=str(path), host=mesh is not None)
        # a GGUF without a vocabulary (e.g. written by tests) simply has no tokenizer
        tokenizer = _tokenizer(kind, path) if "tokenizer.ggml.model" in meta else None
        if mesh is not None:
            params = sharding.place_params(spec, params, mesh)
        return LoadedModel(spec=spec, params=params, tokenizer=tokenizer)
    else:
        config = json.loads((path / "config.json").read_text())
        spec = ModelSpec.from_hf_config(config)
        params = assemble_params(
            spec, iter_safetensors(path), dt, source=str(path), host=mesh is not None
        )
    if mesh is not None:
        params = sharding.place_params(spec, params, mesh)
    return LoadedModel(spec=spec, params=params, tokenizer=_tokenizer(kind, path))


def _load_builtin_first_time(
    model: str, gguf: Path, dt: jnp.dtype, mesh: Mesh | None
) -> LoadedModel:
    """A built-in with no converted copy yet: dequantize its GGUF once and keep an orbax copy.

    The copy is float32, so that every later load in any dtype skips GGUF parsing and
    dequantization (about 10 s each for smollm2-135m).
    NOTE: this runs under the converted dir's inter-process lock, so that engine cores
    starting together convert once; a process that waited finds the copy and restores it.
    """
    from jaxserve.model.gguf_loader import load_gguf

    dst = builtin.converted_dir(model)
    with builtin.cache_lock(dst, f"converting built-in model {model!r}"):
        if checkpoint.is_checkpoint(dst):  # written by the process we waited for
            spec, params = checkpoint.load_checkpoint(dst, dt, mesh=mesh)
            return LoadedModel(spec=spec, params=params, tokenizer=_tokenizer("orbax", dst))
        host = mesh is not None
        spec, _, tensors = load_gguf(gguf)
        params = assemble_params(spec, tensors, jnp.float32, source=str(gguf), host=host)
        tokenizer = _tokenizer("gguf", gguf)
        _save_converted(dst, params, spec, tokenizer)
    np_dt = _np_dtype(dt)
    params = jax.tree.map(lambda x: x.astype(np_dt) if host else x.astype(dt), params)
    if mesh is not None:
        params = sharding.place_params(spec, params, mesh)
    return LoadedModel(spec=spec, params=params, tokenizer=tokenizer)


def _save_converted(dst: Path, params: Params, spec: ModelSpec, tokenizer: Any) -> None:
    # a private dir next to dst, renamed into place: no loader ever sees half a checkpoint
    tmp: Path | None = None
    try:
        tmp = Path(tempfile.mkdtemp(dir=dst.parent, prefix=f".{dst.name}.", suffix=".tmp"))
        tmp.chmod(0o755)  # mkdtemp makes it 0700; the cache may be shared
        checkpoint.save_checkpoint(tmp, params, spec, tokenizer)
        if dst.exists():  # not a checkpoint (the caller checked, under the lock): debris
            shutil.rmtree(dst)
        tmp.rename(dst)
        logger.info("kept a converted copy in %s: later starts restore it", dst)
    except OSError as e:
        # a read-only or full cache: this load still works, the next one converts again
        logger.warning("could not keep a converted copy in %s (%s)", dst, e)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def load_tokenizer(model: str) -> Any | None:
    """Only the tokenizer of `model` (for processes that never touch the weights).

    None for a shape preset, and for a model dir holding no tokenizer files (config.json
    alone, for load_format="dummy"): such engines take prompt_token_ids only.
    """
    if presets.is_preset_name(model):
        presets.preset_config(model)  # an unknown preset is named here too
        return None
    kind, path = _resolve(model)
    return _tokenizer(kind, path)


def _resolve(model: str) -> tuple[str, Path]:
    """("gguf" | "hf" | "orbax", path); fetches built-ins; names `model` in every error."""
    if model in builtin.BUILTIN_MODELS:
        converted = builtin.converted_dir(model)
        if checkpoint.is_checkpoint(converted):
            return "orbax", converted
        return "gguf", builtin.fetch_builtin(model)
    path = Path(model).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return "gguf", path
    if path.is_dir() and checkpoint.is_checkpoint(path):
        return "orbax", path
    if path.is_dir() and (path / "config.json").is_file():
        return "hf", path
    what = "does not exist" if not path.exists() else "is not a model"
    raise FileNotFoundError(
        f"model={model!r}: path {str(path)!r} {what}; expected a built-in name "
        f"{sorted(builtin.BUILTIN_MODELS)}, an HF model dir (config.json + *.safetensors), "
        f"a .gguf file, or a dir written by `jaxserve convert`"
    )


def _tokenizer(kind: str, path: Path) -> Any | None:
    from transformers import AutoTokenizer  # deferred: slow import, not needed for weights

    if kind == "gguf":
        return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    tok_dir = path / "tokenizer" if kind == "orbax" else path
    files = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
    if not any((tok_dir / f).is_file() for f in files):
        return None
    return AutoTokenizer.from_pretrained(str(tok_dir))


def assemble_params(
    spec: ModelSpec,
    tensors: Iterable[tuple[str, np.ndarray]],  # (HF name, HF layout [out, in] or [D])
    dtype: jnp.dtype,
    *,
    source: str,
    host: bool = False,
) -> Params:
    """Maps HF-named tensors onto the stacked Params pytree ([in, out], cast to dtype).

    host=True keeps the arrays as host numpy (for sharded placement); else on the default
    device.
    """
    shapes = param_shapes(spec)
    np_dtype = _np_dtype(dtype)
    to_array = np.asarray if host else jnp.asarray
    per_layer: dict[str, list[np.ndarray | None]] = {}
    arrays: dict[str, jax.Array] = {}
    for name, w in tensors:
        if name.startswith("model.layers."):
            layer_str, rest = name[len("model.layers.") :].split(".", 1)
            field, transpose = _lookup(_LAYER_FIELDS, rest, name, source)
            slots = per_layer.setdefault(field, [None] * spec.num_layers)
            slots[int(layer_str)] = _convert(w, transpose, np_dtype)
        elif name in _GLOBAL_FIELDS:
            field, transpose = _GLOBAL_FIELDS[name]
            if field == "lm_head" and spec.tie_word_embeddings:
                continue  # some tied checkpoints still store a copy
            arrays[field] = to_array(_convert(w, transpose, np_dtype))
        elif name.endswith("rotary_emb.inv_freq"):
            continue  # old checkpoints store this buffer; we recompute it from the spec
        else:
            raise ValueError(f"{source}: unexpected tensor {name!r}")
    for field, slots in per_layer.items():
        missing = [i for i, s in enumerate(slots) if s is None]
        if missing:
            raise ValueError(f"{source}: {field} missing for layers {missing}")
        arrays[field] = to_array(np.stack(slots))
        slots.clear()  # free host copies as we go
    missing = set(shapes) - set(arrays)
    if missing:
        raise ValueError(f"{source}: checkpoint has no tensors for {sorted(missing)}")
    return params_from_arrays(spec, arrays)


def _np_dtype(dtype: jnp.dtype) -> np.dtype:
    return np.dtype(ml_dtypes.bfloat16) if dtype == jnp.bfloat16 else np.dtype(dtype)


def _lookup(table: dict, key: str, name: str, source: str) -> tuple[str, bool]:
    if key not in table:
        raise ValueError(f"{source}: unexpected tensor {name!r}")
    return table[key]


def _convert(w: np.ndarray, transpose: bool, dtype: np.dtype) -> np.ndarray:
    w = w.T if transpose else w
    return np.ascontiguousarray(w.astype(dtype, copy=False))


# --- safetensors, read directly so bf16 works without torch (numpy has no bfloat16) ---------

_ST_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "I64": np.int64,
    "I32": np.int32,
    "I8": np.int8,
    "U8": np.uint8,
}


def iter_safetensors(model_dir: Path) -> Iterator[tuple[str, np.ndarray]]:
    """(name, array) from model.safetensors or every shard named in the index."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = sorted(set(weight_map.values()))
    elif (model_dir / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise FileNotFoundError(f"{model_dir}: no model.safetensors or its index")
    for f in files:
        yield from read_safetensors(model_dir / f)


def read_safetensors(path: Path) -> Iterator[tuple[str, np.ndarray]]:
    """Memory-maps one .safetensors file (format: u64 header size, JSON header, raw data)."""
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(header_len))
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + header_len)
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in _ST_DTYPES:
            raise ValueError(f"{path}: tensor {name!r} has unsupported dtype {info['dtype']}")
        start, end = info["data_offsets"]
        dt = np.dtype(_ST_DTYPES[info["dtype"]])
        yield name, data[start:end].view(dt).reshape(info["shape"])
