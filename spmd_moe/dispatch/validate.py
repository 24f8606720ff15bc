"""Metadata check before any data exchange: ranks that disagree fail fast, not hang.

A fixed-size int64 header is all-gathered (same size on every rank whatever they
believe, so the exchange itself cannot mismatch); every rank compares and raises the
same DistributedError. A peer that never joins ends in the process group's timeout.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch
import torch.distributed as dist

from spmd_moe.errors import DistributedError
from spmd_moe.parallel import ParallelContext

_MAGIC = 0x5EED_0E
# Compared in this order: the first field that differs is the one reported, so the
# layout comes before the token convention that a layout mismatch also changes.
_FIELDS = ("magic", "axis_size", "layout", "num_experts", "top_k", "dim", "config_hash", "token_convention", "local_tokens")
# Fields that may differ between ranks (exchanged, not compared).
_FREE = ("local_tokens",)
LAYOUT_CODES = {"replicated": 1, "sequence": 2, "invariant": 3}
_LAYOUT_NAMES = {v: k for k, v in LAYOUT_CODES.items()}


def config_hash(fingerprint: tuple[object, ...]) -> int:
    digest = hashlib.sha256(repr(fingerprint).encode()).digest()
    return int.from_bytes(digest[:7], "little")


def _header_device(pctx: ParallelContext[Any]) -> torch.device:
    """NCCL moves only CUDA tensors: the header goes where the group's backend wants it."""
    if pctx.group is not None and dist.get_backend(pctx.group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def exchange_header(
    pctx: ParallelContext[Any],
    *,
    num_experts: int,
    top_k: int,
    dim: int,
    fingerprint: tuple[object, ...],
    token_convention: int,
    layout: str,
    what: str,
    local_tokens: int = -1,
) -> list[int]:
    """Raise DistributedError on every rank unless all ranks send the same header.

    token_convention: a number all ranks must agree on (the replicated token count T
    for layout 'replicated'; -1 where ranks may differ).
    local_tokens: this rank's token count, exchanged but not compared.
    Returns every rank's local_tokens, in rank order (one host sync, already paid).
    """
    if pctx.size == 1:
        return [local_tokens]
    mine = torch.tensor(
        [_MAGIC, pctx.size, LAYOUT_CODES[layout], num_experts, top_k, dim,
         config_hash(fingerprint), token_convention, local_tokens],
        dtype=torch.int64,
        device=_header_device(pctx),
    )
    everyone = torch.empty(pctx.size * len(_FIELDS), dtype=torch.int64, device=mine.device)
    try:
        if pctx.comm is not None:
            # Through the layer's communicator (inside vLLM its shared memory, not gloo):
            # the same int64 words, a fixed size on every rank.
            everyone = pctx.comm.all_gather(mine)
        else:
            dist.all_gather_into_tensor(everyone, mine, group=pctx.group)
    except RuntimeError as e:
        raise DistributedError(
            f"{what}: metadata exchange on axis '{pctx.name}' (size {pctx.size}) failed: "
            f"expected every rank to join, got: {str(e).splitlines()[0][:300]}. "
            "Fix: check that every rank reached this MoE layer (a rank that died or "
            "skipped the layer makes the others time out after the group's timeout)."
        ) from e
    everyone = everyone.view(pctx.size, len(_FIELDS))
    rows = everyone.tolist()  # the one host sync
    ref = rows[0]
    compared = [i for i, f in enumerate(_FIELDS) if f not in _FREE]
    for r in range(1, pctx.size):
        diff = [i for i in compared if rows[r][i] != ref[i]]
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
            shown = _LAYOUT_NAMES if name == "layout" else {}
            raise DistributedError(
                f"{what}: ranks disagree on '{name}' on axis '{pctx.name}': expected "
                f"rank 0's {shown.get(ref[i], ref[i])!r}, got {shown.get(rows[r][i], rows[r][i])!r} "
                f"on rank {r}. Fix: {fix}."
            )
    return [row[_FIELDS.index("local_tokens")] for row in rows]
