"""Dispatchers move routed rows to the rank and slot order of their experts and back.

One per way of moving rows: local (EP size 1), all_to_all (prefill), all_gather
(decode, no host sync). Each implements :class:`Dispatcher` with its own typed state.
"""

from spmd_moe.dispatch.all_gather import AllGatherDispatcher, AllGatherState
from spmd_moe.dispatch.all_to_all import AllToAllDispatcher, AllToAllState
from spmd_moe.dispatch.base import Dispatcher, SentRows
from spmd_moe.dispatch.local import LocalDispatcher, LocalState

__all__ = [
    "AllGatherDispatcher", "AllGatherState", "AllToAllDispatcher", "AllToAllState",
    "Dispatcher", "LocalDispatcher", "LocalState", "SentRows",
]
