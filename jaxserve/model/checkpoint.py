"""Converted checkpoints: orbax params + spec.json + tokenizer files in one directory.

Loading a GGUF dequantizes every tensor on the host; a converted copy restores the already
dequantized, stacked arrays directly (and in the target dtype), so later starts are fast.
Layout of a checkpoint dir:
    spec.json      ModelSpec.to_dict()
    params/        orbax StandardCheckpointer tree (a flat dict keyed as llama.param_shapes)
    tokenizer/     tokenizer.save_pretrained(), when a tokenizer was given
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxserve.model.llama import Params, param_shapes, params_from_arrays
from jaxserve.model.spec import ModelSpec

_SPEC_FILE = "spec.json"
_PARAMS_DIR = "params"


def is_checkpoint(path: Path) -> bool:
    return (path / _SPEC_FILE).is_file() and (path / _PARAMS_DIR).is_dir()


def _flat(params: Params) -> dict[str, jax.Array]:
    flat = {"embed": params.embed, "final_norm": params.final_norm}
    if params.lm_head is not None:
        flat["lm_head"] = params.lm_head
    for name, value in vars(params.layers).items():
        if value is not None:
            flat[name] = value
    return flat


def save_checkpoint(
    dst: str | Path, params: Params, spec: ModelSpec, tokenizer: Any = None
) -> None:
    """Writes params (orbax), spec.json and the tokenizer's files under `dst` (created)."""
    import orbax.checkpoint as ocp

    dst = Path(dst).absolute()  # orbax insists on absolute paths
    dst.mkdir(parents=True, exist_ok=True)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(dst / _PARAMS_DIR, _flat(params))
        ckptr.wait_until_finished()
    (dst / _SPEC_FILE).write_text(json.dumps(spec.to_dict(), indent=2))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(dst / "tokenizer"))


def load_checkpoint(
    src: str | Path, dtype: jnp.dtype | None = None, *, mesh: Mesh | None = None
) -> tuple[ModelSpec, Params]:
    """Restores (spec, params); `dtype` None keeps the saved dtype, else casts on restore.

    `mesh`: restore every array straight into its tensor-parallel NamedSharding (each device
    reads only its shard). The params keep the model's layout; kv columns that TP will repeat
    (TP > kv heads) are restored replicated, they are small.
    """
    import orbax.checkpoint as ocp

    from jaxserve.model import sharding

    src = Path(src).absolute()
    spec = ModelSpec.from_dict(json.loads((src / _SPEC_FILE).read_text()))
    repeat = sharding.kv_repeat(spec, mesh.shape["model"]) if mesh is not None else 1
    with ocp.StandardCheckpointer() as ckptr:
        meta = ckptr.metadata(src / _PARAMS_DIR)
        tree = getattr(meta, "item_metadata", meta)
        target = {}
        for name, shape in param_shapes(spec).items():
            saved_dtype = tree[name].dtype
            if mesh is None:
                # explicit: else orbax restores onto the devices the checkpoint was saved from
                shard = jax.sharding.SingleDeviceSharding(jax.devices()[0])
            elif repeat > 1 and name in ("wk", "wv", "bk", "bv"):
                shard = NamedSharding(mesh, PartitionSpec())
            else:
                shard = sharding.named(mesh, name, shape)
            target[name] = jax.ShapeDtypeStruct(shape, dtype or saved_dtype, sharding=shard)
        arrays = ckptr.restore(src / _PARAMS_DIR, target)
    return spec, params_from_arrays(spec, dict(arrays))
