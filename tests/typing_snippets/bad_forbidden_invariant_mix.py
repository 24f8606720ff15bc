"""FORBIDDEN['invariant_mix']: Invariant combined with another placement (gradient
conventions differ: convert with invariant_to_replicate / replicate_to_invariant)."""

from spmd_moe.placement import EP, Inv, Par, Placed, Rep, Var


def invariant_with_others(i: Placed[Inv[EP]], r: Placed[Rep[EP]], v: Placed[Var[EP]], p: Placed[Par[EP]]) -> None:
    i + r  # E: placement rule 'invariant_mix' on axis 'EP'
    v * i  # E: placement rule 'invariant_mix' on axis 'EP'
    i - p  # E: placement rule 'invariant_mix' on axis 'EP'
