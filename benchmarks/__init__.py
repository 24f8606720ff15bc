"""Benchmarks (outside the package; run from the repository root)."""
