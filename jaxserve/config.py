"""Frozen engine configuration, read once from the user's arguments; no I/O happens here.

EngineArgs keeps vLLM's argument names; `EngineArgs.split()` turns it into the per-part configs
that the scheduler, the KV cache manager and the runner each read.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

DEFAULT_MODEL = "smollm2-135m"


@dataclass(frozen=True)
class ModelConfig:
    # a built-in name ("smollm2-135m"), an HF model dir, a .gguf file, or a converted orbax dir
    model: str = DEFAULT_MODEL
    # "auto" (float32 on CPU, bfloat16 on GPU/TPU), "float32", "bfloat16", "float16"
    dtype: str = "auto"
    # longest prompt + output a request may have; None: min(model's context, 2048)
    max_model_len: int | None = None
    # seed of the engine's RNG, which draws seeds for requests that give none
    seed: int = 0
    # "auto" | "xla" | "pallas": the attention inside the step; auto = pallas on TPU and CUDA,
    # xla on CPU (where "pallas" runs the TPU kernel in interpret mode: tests only, slow)
    attention_backend: str = "auto"

    def __post_init__(self) -> None:
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be auto|float32|bfloat16|float16, got {self.dtype!r}")
        if self.max_model_len is not None and self.max_model_len <= 0:
            raise ValueError(f"max_model_len must be positive, got {self.max_model_len}")
        if self.attention_backend not in ("auto", "xla", "pallas"):
            raise ValueError(
                f"attention_backend must be auto|xla|pallas, got {self.attention_backend!r}"
            )


@dataclass(frozen=True)
class CacheConfig:
    # tokens per KV block
    block_size: int = 16
    # bytes of KV cache to allocate (the CPU way to size it); None: use gpu_memory_utilization
    # on accelerators, or enough for max_num_seqs full-length requests (capped at 1 GiB) on CPU
    kv_cache_memory: int | None = None
    # fraction of device memory the engine may use (weights + KV) on accelerators
    gpu_memory_utilization: float = 0.9
    # an explicit number of KV blocks (including the null block 0); overrides both sizes above
    num_gpu_blocks_override: int | None = None
    # reuse KV blocks of identical prompt prefixes (on by default)
    enable_prefix_caching: bool = True

    def __post_init__(self) -> None:
        if self.block_size <= 0 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a positive power of two, got {self.block_size}")
        if self.kv_cache_memory is not None and self.kv_cache_memory <= 0:
            raise ValueError(f"kv_cache_memory must be positive, got {self.kv_cache_memory}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(
                f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}"
            )
        if self.num_gpu_blocks_override is not None and self.num_gpu_blocks_override < 2:
            raise ValueError(
                f"num_gpu_blocks_override must be >= 2, got {self.num_gpu_blocks_override}"
            )


@dataclass(frozen=True)
class SchedulerConfig:
    # token budget of one step (prefill chunks + decodes together)
    max_num_batched_tokens: int = 512
    # most requests in one step
    max_num_seqs: int = 64
    # filled in by the engine once the model is known
    max_model_len: int = 2048
    # "fcfs" or "priority" (lower value first, then arrival)
    policy: str = "fcfs"
    # split long prompts over several steps
    enable_chunked_prefill: bool = True

    def __post_init__(self) -> None:
        if self.max_num_batched_tokens <= 0:
            raise ValueError(
                f"max_num_batched_tokens must be positive, got {self.max_num_batched_tokens}"
            )
        if self.max_num_seqs <= 0:
            raise ValueError(f"max_num_seqs must be positive, got {self.max_num_seqs}")
        if self.policy not in ("fcfs", "priority"):
            raise ValueError(f"policy must be fcfs|priority, got {self.policy!r}")


@dataclass(frozen=True)
class ParallelConfig:
    # devices one engine replica shards its weights and KV cache over (Megatron-style TP);
    # must divide the model's query heads (checked at model load, naming the valid sizes)
    tensor_parallel_size: int = 1
    # independent engine replicas on disjoint device slices, one router (engine/dp.py)
    data_parallel_size: int = 1

    def __post_init__(self) -> None:
        if self.tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be >= 1, got {self.tensor_parallel_size}")
        if self.data_parallel_size < 1:
            raise ValueError(f"data_parallel_size must be >= 1, got {self.data_parallel_size}")


@dataclass(frozen=True)
class EngineArgs:
    """Every engine argument under its vLLM name; `LLM(**kwargs)` and the CLI fill this."""

    model: str = DEFAULT_MODEL
    tokenizer: str | None = None  # defaults to the model's own tokenizer
    dtype: str = "auto"
    max_model_len: int | None = None
    seed: int = 0
    attention_backend: str = "auto"
    block_size: int = 16
    kv_cache_memory: int | None = None
    gpu_memory_utilization: float = 0.9
    num_gpu_blocks_override: int | None = None
    enable_prefix_caching: bool = True
    max_num_batched_tokens: int = 512
    max_num_seqs: int = 64
    scheduling_policy: str = "fcfs"
    # compile every shape bucket up front (the compile count after warmup must stay 0)
    enable_warmup: bool = True
    # shard weights and KV cache over this many devices (tensor parallel); see ParallelConfig
    tensor_parallel_size: int = 1
    # independent engine replicas, each on its own tensor_parallel_size devices (data parallel)
    data_parallel_size: int = 1

    @classmethod
    def from_kwargs(cls, **kwargs: object) -> EngineArgs:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(kwargs) - names)
        if unknown:
            raise TypeError(f"unknown engine argument(s) {unknown}; known: {sorted(names)}")
        return cls(**kwargs)  # type: ignore[arg-type]

    def __post_init__(self) -> None:
        self.parallel_config()  # bad sizes fail here, naming the field

    def model_config(self) -> ModelConfig:
        return ModelConfig(
            model=self.model,
            dtype=self.dtype,
            max_model_len=self.max_model_len,
            seed=self.seed,
            attention_backend=self.attention_backend,
        )

    def cache_config(self) -> CacheConfig:
        return CacheConfig(
            block_size=self.block_size,
            kv_cache_memory=self.kv_cache_memory,
            gpu_memory_utilization=self.gpu_memory_utilization,
            num_gpu_blocks_override=self.num_gpu_blocks_override,
            enable_prefix_caching=self.enable_prefix_caching,
        )

    def parallel_config(self) -> ParallelConfig:
        return ParallelConfig(
            tensor_parallel_size=self.tensor_parallel_size,
            data_parallel_size=self.data_parallel_size,
        )

    def scheduler_config(self, max_model_len: int) -> SchedulerConfig:
        return SchedulerConfig(
            max_num_batched_tokens=self.max_num_batched_tokens,
            max_num_seqs=self.max_num_seqs,
            max_model_len=max_model_len,
            policy=self.scheduling_policy,
        )
