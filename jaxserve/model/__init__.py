"""Pure model code: ModelSpec, params pytrees, forward. No jit here (the runner owns it)."""
