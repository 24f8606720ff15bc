"""FORBIDDEN['partial_times_partial']: Partial in more than one factor of a product."""

import torch

from spmd_moe.placement import EP, Par, Placed


def product_of_partials(a: Placed[Par[EP]], b: Placed[Par[EP]]) -> None:
    a * b  # E: placement rule 'partial_times_partial' on axis 'EP'
    a @ b  # E: placement rule 'partial_times_partial' on axis 'EP'
    torch.matmul(a, b)  # E: placement rule 'partial_times_partial' on axis 'EP'
