"""Constrained decoding with llguidance: request params, grammar compilation, per-request matchers.

params.py (StructuredOutputsParams) -> grammar.py (llguidance grammar text, validated) ->
manager.py (one matcher per request, the step's token bitmask). Host-side only: no jax; the
mask is applied on device by jaxserve/runner/token_bitmask.py.
"""
