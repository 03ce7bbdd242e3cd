"""Host-side bookkeeping: blocks, KV cache manager, scheduler. Never imports jax."""
