"""LoRARequest: which adapter a request runs with, under vLLM's names.

It travels inside EngineCoreRequest (msgspec), so it is a frozen Struct; nothing here reads
files or imports jax.
"""

from __future__ import annotations

import msgspec


class LoRARequest(msgspec.Struct, frozen=True):
    """An adapter by name, id and path (vLLM's LoRARequest)."""

    # the name clients select it by (the `model` field of an OpenAI request)
    lora_name: str
    # a positive id unique per adapter; the engine's slots and the prefix cache key on it
    lora_int_id: int
    # a directory in the PEFT format (adapter_config.json + adapter_model.safetensors)
    lora_path: str

    def __post_init__(self) -> None:
        if not self.lora_name:
            raise ValueError("lora_name must not be empty")
        if self.lora_int_id < 1:
            raise ValueError(f"lora_int_id must be a positive integer, got {self.lora_int_id}")
        if not self.lora_path:
            raise ValueError("lora_path must not be empty")
