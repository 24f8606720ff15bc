"""Triton kernels (imported lazily; the CPU path never needs Triton)."""
