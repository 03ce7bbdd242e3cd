"""Frozen engine configuration, read once from the user's arguments; no I/O happens here.

EngineArgs is the one declaration of every engine argument (vLLM's names, a comment each: the
CLI's flags and their help come from it, see jaxserve/cli.py). `model_config()`,
`cache_config()`, `scheduler_config()`, `lora_config()` and `parallel_config()` hand each part
the fields it reads, picked by name, and each part validates its own.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

from jaxserve.model import presets

Dtype = Literal["auto", "float32", "bfloat16", "float16"]
KVCacheDtype = Literal["auto", "float32", "bfloat16"]
AttentionBackend = Literal["auto", "xla", "pallas"]
SchedulingPolicy = Literal["fcfs", "priority"]
LoadFormat = Literal["auto", "dummy"]

DEFAULT_MODEL = "smollm2-135m"


@dataclass(frozen=True)
class ModelConfig:
    # a built-in name ("smollm2-135m"), an HF model dir, a .gguf file, or a converted orbax dir
    model: str = DEFAULT_MODEL
    # "auto" (float32 on CPU, bfloat16 on GPU/TPU), "float32", "bfloat16", "float16"
    dtype: str = "auto"
    # longest prompt + output a request may have; None: min(model's context, 2048)
    max_model_len: int | None = None
    # "auto" | "xla" | "pallas": the attention inside the step; auto = pallas on TPU and CUDA,
    # xla on CPU (where "pallas" runs the TPU kernel in interpret mode: tests only, slow)
    attention_backend: str = "auto"
    # "auto": read the weights `model` names; "dummy": random weights of its shape, made on
    # the device (model/dummy.py); a "dummy:<preset>" model needs it
    load_format: str = "auto"

    def __post_init__(self) -> None:
        if self.load_format not in ("auto", "dummy"):
            raise ValueError(f"load_format must be auto|dummy, got {self.load_format!r}")
        if presets.is_preset_name(self.model):
            presets.preset_config(self.model)  # an unknown preset: ValueError naming model
            if self.load_format != "dummy":
                raise ValueError(
                    f"model={self.model!r} is a shape preset: it needs load_format='dummy'"
                )
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
    # "auto" (the weights' dtype), "float32", "bfloat16": the KV cache's dtype
    kv_cache_dtype: str = "auto"

    def __post_init__(self) -> None:
        if self.kv_cache_dtype not in ("auto", "float32", "bfloat16"):
            raise ValueError(
                f"kv_cache_dtype must be auto|float32|bfloat16, got {self.kv_cache_dtype!r}"
            )
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
    scheduling_policy: str = "fcfs"
    # split long prompts over several steps
    enable_chunked_prefill: bool = True
    # most prompt tokens one request computes in a step that also carries decodes (0: no cap)
    long_prefill_token_threshold: int = 0
    # seats of max_num_seqs only urgent requests may take: the engine-core process reserves one
    # for health probes, so a full batch never delays them (not an engine argument)
    num_reserved_seqs: int = 0

    def __post_init__(self) -> None:
        if self.max_num_batched_tokens <= 0:
            raise ValueError(
                f"max_num_batched_tokens must be positive, got {self.max_num_batched_tokens}"
            )
        if self.max_num_seqs <= 0:
            raise ValueError(f"max_num_seqs must be positive, got {self.max_num_seqs}")
        if self.long_prefill_token_threshold < 0:
            raise ValueError(
                "long_prefill_token_threshold must be >= 0 (0: no cap), "
                f"got {self.long_prefill_token_threshold}"
            )
        if self.long_prefill_token_threshold and not self.enable_chunked_prefill:
            raise ValueError("long_prefill_token_threshold needs enable_chunked_prefill")
        if self.scheduling_policy not in ("fcfs", "priority"):
            raise ValueError(
                f"scheduling_policy must be fcfs|priority, got {self.scheduling_policy!r}"
            )
        if not 0 <= self.num_reserved_seqs < self.max_num_seqs:
            raise ValueError(
                f"num_reserved_seqs must be in [0, max_num_seqs), got {self.num_reserved_seqs}"
            )


@dataclass(frozen=True)
class LoRAConfig:
    # serve LoRA adapters (the step gets adapter slots; off: today's program exactly)
    enable_lora: bool = False
    # adapters resident on the device at once (slot 0, "no adapter", comes on top)
    max_loras: int = 1
    # largest adapter rank accepted; every slot is this wide (smaller ranks are zero-padded)
    max_lora_rank: int = 16
    # adapters kept read in host memory (LRU); None: max_loras
    max_cpu_loras: int | None = None

    def __post_init__(self) -> None:
        if self.max_loras < 1:
            raise ValueError(f"max_loras must be >= 1, got {self.max_loras}")
        if self.max_lora_rank < 1:
            raise ValueError(f"max_lora_rank must be >= 1, got {self.max_lora_rank}")
        if self.max_cpu_loras is not None and self.max_cpu_loras < self.max_loras:
            raise ValueError(
                f"max_cpu_loras ({self.max_cpu_loras}) must be >= max_loras ({self.max_loras})"
            )

    @property
    def num_cpu_loras(self) -> int:
        """Adapters the host cache holds."""
        return self.max_loras if self.max_cpu_loras is None else self.max_cpu_loras


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
    """Every engine argument under its vLLM name; `LLM(**kwargs)` and the CLI fill this.

    NOTE: the comment above each field is its --help text (jaxserve/cli.py reads it).
    """

    # a built-in name (smollm2-135m), a Hugging Face model dir, a .gguf file, or a dir written
    # by `jaxserve convert`; with --load-format dummy also a shape preset (dummy:tiny,
    # dummy:smollm2-135m, dummy:llama3-8b)
    model: str = DEFAULT_MODEL
    # where the tokenizer comes from (same forms as model); default: the model's own
    tokenizer: str | None = None
    # weights dtype (and the KV cache's, see kv_cache_dtype); auto: float32 on CPU, bfloat16
    # on GPU/TPU
    dtype: Dtype = "auto"
    # KV cache dtype; auto: the weights' (a bf16 cache on CPU is held as uint16 bits, since
    # XLA:CPU gathers real bf16 by converting the whole cache to float32)
    kv_cache_dtype: KVCacheDtype = "auto"
    # longest prompt + output a request may have (default: min(model context, 2048))
    max_model_len: int | None = None
    # auto: read the model's weights; dummy: random weights of its shape made on the device
    # (no download: a preset or a config.json is enough; such a model has no tokenizer unless
    # its dir holds one, so prompts are token ids)
    load_format: LoadFormat = "auto"
    # seed of the engine's RNG, which draws the seeds of requests that give none
    seed: int = 0
    # the attention inside the step; auto: the Pallas kernels on TPU and CUDA, xla on CPU
    attention_backend: AttentionBackend = "auto"
    # tokens per KV block
    block_size: int = 16
    # bytes of KV cache to allocate (the CPU way to size it)
    kv_cache_memory: int | None = None
    # fraction of accelerator memory for weights + KV cache
    gpu_memory_utilization: float = 0.9
    # an explicit number of KV blocks (the null block included); overrides both sizes above
    num_gpu_blocks_override: int | None = None
    # reuse the KV blocks of identical prompt prefixes
    enable_prefix_caching: bool = True
    # split long prompts over several steps (within the token budget)
    enable_chunked_prefill: bool = True
    # most prompt tokens one request computes in a step that also carries other requests'
    # decodes, so a new prompt cannot stall every stream (0: no cap; a lone prompt is never
    # capped, unlike vLLM's, which caps every step)
    long_prefill_token_threshold: int = 0
    # schedule and stage step k+1 while the device runs step k (its decodes read k's sampled
    # ids on the device); same tokens, stop checks one step late. Multi-host engines step
    # synchronously
    async_scheduling: bool = True
    # token budget of one step (prefill chunks + decodes)
    max_num_batched_tokens: int = 512
    # most requests in one step
    max_num_seqs: int = 64
    # admission order: fcfs, or priority (lower value first, then arrival)
    scheduling_policy: SchedulingPolicy = "fcfs"
    # compile every shape bucket at start-up (the compile count after warmup stays 0)
    enable_warmup: bool = True
    # devices to shard weights and KV cache over (tensor parallel; must suit the model's heads)
    tensor_parallel_size: int = 1
    # engine replicas, each on its own tensor_parallel_size devices (data parallel)
    data_parallel_size: int = 1
    # serve LoRA adapters (requests select one; see --lora-modules)
    enable_lora: bool = False
    # adapters resident on the device at once (with enable_lora)
    max_loras: int = 1
    # largest LoRA rank accepted (every device slot is this wide)
    max_lora_rank: int = 16
    # adapters kept in host memory, least recently used evicted first (default: max_loras)
    max_cpu_loras: int | None = None

    @classmethod
    def from_kwargs(cls, **kwargs: object) -> EngineArgs:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(kwargs) - names)
        if unknown:
            raise TypeError(f"unknown engine argument(s) {unknown}; known: {sorted(names)}")
        return cls(**kwargs)  # type: ignore[arg-type]

    def __post_init__(self) -> None:
        self.model_config()  # a bad load_format or preset fails here, naming the field
        self.parallel_config()  # bad sizes fail here, naming the field
        self.lora_config()

    def _pick(self, part: type) -> dict[str, Any]:
        """The fields of `part` this EngineArgs holds (same names)."""
        names = {f.name for f in dataclasses.fields(part)}
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name in names}

    def model_config(self) -> ModelConfig:
        return ModelConfig(**self._pick(ModelConfig))

    def cache_config(self) -> CacheConfig:
        return CacheConfig(**self._pick(CacheConfig))

    def lora_config(self) -> LoRAConfig:
        return LoRAConfig(**self._pick(LoRAConfig))

    def parallel_config(self) -> ParallelConfig:
        return ParallelConfig(**self._pick(ParallelConfig))

    def scheduler_config(self, max_model_len: int) -> SchedulerConfig:
        """The scheduler's part; max_model_len is the one the engine resolved from the model."""
        return SchedulerConfig(**{**self._pick(SchedulerConfig), "max_model_len": max_model_len})
