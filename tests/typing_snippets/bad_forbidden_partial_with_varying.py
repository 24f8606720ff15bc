"""FORBIDDEN['partial_with_varying']: Partial combined with Varying (e.g. the shared
experts' Partial output added to the routed output's token slice without reduce_scatter)."""

import torch

from spmd_moe.placement import EP, Par, Placed, Var


def shared_added_without_reduce(shared_TD: Placed[Par[EP]], routed_TD: Placed[Var[EP]]) -> None:
    routed_TD + shared_TD  # E: placement rule 'partial_with_varying' on axis 'EP'
    torch.cat([routed_TD, shared_TD])  # E: placement rule 'partial_with_varying' on axis 'EP'
    shared_TD * routed_TD  # E: placement rule 'partial_with_varying' on axis 'EP'
