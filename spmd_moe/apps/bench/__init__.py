"""Benchmarks behind `spmd-moe bench` (shipped in the wheel; `python -m spmd_moe.apps.bench.run`)."""
