"""Test suite (a package, so tests/server never shadows the top-level server package)."""
