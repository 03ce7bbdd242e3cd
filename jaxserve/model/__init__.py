"""Pure model code: ModelSpec, params pytrees, forward. No jit here (the runner owns it), but
for dummy.py's one-time random init of load_format="dummy" weights."""
