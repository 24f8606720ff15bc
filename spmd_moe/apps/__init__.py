"""Applications: the `spmd-moe` CLI verbs (demo, bench, parity, check) and the tiny checkpoint.

The layers (everything else under ``spmd_moe``) never import this package; it imports them.
"""
