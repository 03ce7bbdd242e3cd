"""LoRA adapters: the request that names one, reading PEFT files, and their slots."""
