"""Benchmarks of masc_jax (see benchmarks/README.md). Not part of the library."""
