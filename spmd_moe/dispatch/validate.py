"""Metadata check before any data exchange: ranks that disagree fail fast, not hang.

A fixed-size int64 header is all-gathered (same size on every rank whatever they
believe, so the exchange itself cannot mismatch); every rank compares and raises the
same DistributedError. A peer that never joins ends in the process group's timeout.
"""

from __future__ import annotations

import hashlib

import torch
import torch.distributed as dist

from spmd_moe.errors import DistributedError
from spmd_moe.parallel import ParallelContext

_MAGIC = 0x5EED_0E
_FIELDS = ("magic", "num_experts", "top_k", "dim", "axis_size", "config_hash", "token_convention", "layout")
LAYOUT_CODES = {"replicated": 1, "sequence": 2}


def config_hash(fingerprint: tuple[object, ...]) -> int:
    digest = hashlib.sha256(repr(fingerprint).encode()).digest()
    return int.from_bytes(digest[:7], "little")


def _header_device(pctx: ParallelContext) -> torch.device:
    """NCCL moves only CUDA tensors: the header goes where the group's backend wants it."""
    if pctx.group is not None and dist.get_backend(pctx.group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def exchange_header(
    pctx: ParallelContext,
    *,
    num_experts: int,
    top_k: int,
    dim: int,
    fingerprint: tuple[object, ...],
    token_convention: int,
    layout: str,
    what: str,
) -> None:
    """Raise DistributedError on every rank unless all ranks send the same header.

    token_convention: a number all ranks must agree on (the replicated token count T
    for layout 'replicated'; the per-rank token count for the decode dispatcher;
    -1 where ranks may differ).
    """
    if pctx.size == 1:
        return
    mine = torch.tensor(
        [_MAGIC, num_experts, top_k, dim, pctx.size, config_hash(fingerprint),
         token_convention, LAYOUT_CODES[layout]],
        dtype=torch.int64,
        device=_header_device(pctx),
    )
    everyone = torch.empty(pctx.size * len(_FIELDS), dtype=torch.int64, device=mine.device)
    try:
        dist.all_gather_into_tensor(everyone, mine, group=pctx.group)
    except RuntimeError as e:
        raise DistributedError(
            f"{what}: metadata exchange on axis '{pctx.name}' (size {pctx.size}) failed: "
            f"expected every rank to join, got: {str(e).splitlines()[0][:300]}. "
            "Fix: check that every rank reached this MoE layer (a rank that died or "
            "skipped the layer makes the others time out after the group's timeout)."
        ) from e
    everyone = everyone.view(pctx.size, len(_FIELDS))
    ref = everyone[0]
    for r in range(1, pctx.size):
        diff = [i for i in range(len(_FIELDS)) if int(everyone[r, i]) != int(ref[i])]
        if diff:
            i = diff[0]
            name = _FIELDS[i]
            fix = {
                "config_hash": "build the layer from the same MoEConfig on every rank",
                "token_convention": "give every rank the same replicated tokens (layout "
                "'replicated' needs equal T on all ranks; use layout 'sequence' for "
                "per-rank token slices)",
                "num_experts": "load the same checkpoint/config on every rank",
            }.get(name, "make every rank use the same model config and layout")
            raise DistributedError(
                f"{what}: ranks disagree on '{name}' on axis '{pctx.name}': expected "
                f"rank 0's {int(ref[i])}, got {int(everyone[r, i])} on rank {r}. Fix: {fix}."
            )
