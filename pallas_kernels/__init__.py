"""Pallas kernels for jaxserve (Mosaic TPU and Mosaic GPU), each with its pure-jnp reference."""
