"""Thin adapters from spmd_moe to serving/training frameworks.

Each subpackage imports its framework; the core (``spmd_moe`` itself) never does.
"""
