"""Dispatchers move routed rows to the rank and slot order of their experts and back.

They only move rows: weighting by the router's gate values and the sum over k happen
once, in MoE, in a fixed order, whichever dispatcher ran.
"""

from spmd_moe.dispatch.all_gather import AllGatherDispatcher
from spmd_moe.dispatch.all_to_all import AllToAllDispatcher
from spmd_moe.dispatch.local import DispatchState, LocalDispatcher

__all__ = ["AllGatherDispatcher", "AllToAllDispatcher", "DispatchState", "LocalDispatcher"]
