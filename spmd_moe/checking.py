"""Placement vocabulary, the `checked` decorator and the debug-mode checker.

Placements are those of ``spmd_types`` (R / I / V / P) on the layer's *expert axis*:
the mesh axis over which the layer splits tokens and shards experts (the TP group in
TP2EP, the EP mesh dim in torchtitan). A tensor's type in a signature is written
``Float[Placed[Var[EP]], "T D"]``: jaxtyping gives shape and dtype, the class gives placement.

Off, every check is one bool test. On (``spmd_moe.debug()`` / ``SPMD_MOE_DEBUG=1``):

* shapes and dtypes of every ``@checked`` call (jaxtyping + beartype);
* every placement stated on a tensor that spmd_types does not track yet -- by
  ``as_rep`` / ``as_inv`` / ``as_var`` / ``as_par`` or by a ``@checked`` signature where
  the checked region is entered -- is *verified*, never assigned:

  - Replicate / Invariant: same shape, dtype and bytes on every rank, by an exact
    integer checksum exchange (one fixed-size all_gather, as
    ``DTensor.from_local(run_check=True)``);
  - Varying: nothing in general (equal values on every rank are a legal Varying), but a
    parameter declared a token slice (``@checked(tokens=("x_TD",))``: the 'sequence'
    layout's input, the public router's and dispatchers' input) that is identical on
    every rank is rejected as a likely Replicate (torchtitan #3622);
  - Partial: shape and dtype agreement only -- Partial CANNOT be verified from values
    (any local tensors are summands of some total);

* inside the layer (``tracked_region``), spmd_types tracks placements through every op
  in strict mode; the caller's tensors are never marked (the layer gets marked
  aliases) and the layer's own parameters are marked only for the call, so no verdict
  depends on an earlier call;
* production kernels that have a reference path (the fused CUDA combine) are run and
  compared with it bit for bit (``kernels_agree``).

A checksum exchange that fails, or a rank that never joins it, ends after the process
group's timeout in a DistributedError; any mismatch raises the same error on every rank.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import math
import re
import typing
from collections.abc import Callable, Iterator
from typing import Any, ParamSpec, TypeVar, cast

import torch
import typing_rules
from beartype import beartype
from beartype.roar import BeartypeCallHintViolation
from jaxtyping import TypeCheckError, jaxtyped

from spmd_moe import _debug
from spmd_moe.errors import DtypeError, PlacementError, ShapeError
from spmd_moe.placement import EP, placements_of

try:  # the checker half of spmd_types; only needed in debug mode
    import spmd_types as spmd
    from spmd_types.types import PerMeshAxisLocalSpmdType as _LocalType

    _HAVE_SPMD = True
except ImportError:  # pragma: no cover - spmd_types is a core dependency
    _HAVE_SPMD = False



# What the rules cannot say: why such a placement shows up here and what else to change.
_HINTS: dict[tuple[str, str], str] = {
    ("V", "R"): "and pad T to a multiple of the axis size (MoEConfig.padding='pad'); a "
    "replicated tensor here means every rank would route all tokens",
    ("P", "R"): "a replicated count summed again over ranks would be counted n times: "
    "count only this rank's token slice (R->V split first, padding T to a multiple of "
    "the axis size)",
    ("I", "P"): "call spmd_types.all_reduce(x, group, src=P, dst=I) first",
    ("R", "V"): "if each rank holds its own token slice, use layout 'sequence' instead; if "
    "the ranks should hold the same tensor, find where they diverged (a per-rank seed, "
    "dropout, the data loader, an op on one rank only)",
    ("I", "V"): "give every rank the same tensor (a per-rank seed, dropout or data loader "
    "made them differ); if each rank holds its own token slice, use layout 'sequence'",
}


def placement_fix(expected: str, actual: str) -> str:
    """The "Fix:" text: the converting op from typing_rules, plus a layer hint."""
    op = typing_rules.fix(expected, actual)
    hint = _HINTS.get((expected, actual))
    if op and hint:
        return f"{op}, {hint}"
    return op or hint or (
        f"insert the collective that turns {actual} into {expected} on this axis, "
        "or fix the placement stated by the producer"
    )


# ----------------------------------------------------------------------------- helpers


class AxisLike(typing.Protocol):
    """What the checker needs of a parallel context."""

    @property
    def size(self) -> int: ...

    @property
    def name(self) -> str: ...

    @property
    def group(self) -> Any: ...


_WORDS = {"R": "Replicate", "I": "Invariant", "V": "Varying", "P": "Partial"}


def local_type_on(t: torch.Tensor, axis: AxisLike) -> str | None:
    """The spmd_types letter tracked on ``t`` for ``axis``, or None if untyped."""
    if not _HAVE_SPMD or axis.size == 1 or axis.group is None:
        return None
    ty = spmd.maybe_get_axis_local_type(t, axis.group)
    return None if ty is None else str(ty.value)


# ----------------------------------------------------------------------------- value checks
#
# A placement stated on a tensor that spmd_types does not track yet is verified from
# the values, never assigned: one fixed-size int64 all_gather per tensor (as
# DTensor.from_local(run_check=True) does), compared identically on every rank so
# every rank raises the same error (no rank is left waiting in a later collective).
#
#   R / I      same shape, dtype and bytes on every rank (exact integer fingerprint)
#   V          nothing in general (equal values on every rank are a legal Varying);
#              a *token slice* (``tokens=True``: the 'sequence' layout's input, the
#              public router's input) identical on every rank is reported as a likely
#              Replicate: a split that never happened (torchtitan #3622)
#   P          shape and dtype agreement only: any local values are summands of some
#              total, so Partial cannot be verified from values

_MAGIC = 0x5EED_C4EC
_MAX_DIMS = 8
# magic, ndim, dims..., dtype, numel, fp_sum, fp_weighted
_ROW = 1 + 1 + _MAX_DIMS + 1 + 1 + 2
_DTYPES = {d: i for i, d in enumerate((
    torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32,
    torch.int16, torch.int8, torch.uint8, torch.bool, torch.complex64, torch.complex128,
))}
_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _exchange_device(axis: AxisLike) -> torch.device:
    """NCCL moves only CUDA tensors; gloo takes CPU ones."""
    import torch.distributed as dist

    if dist.get_backend(axis.group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def fingerprint(t: torch.Tensor) -> tuple[int, int]:
    """An exact fingerprint of ``t``'s bytes: (sum, position-weighted sum) of its elements
    reinterpreted as integers, in int64 (wrapping). Integer sums do not depend on the
    summation order, so bitwise-equal tensors give equal fingerprints on any device."""
    with torch.no_grad():
        flat = t.detach().contiguous().reshape(-1)
        if flat.is_complex():
            flat = torch.view_as_real(flat).reshape(-1)
        if flat.dtype == torch.bool:
            ints = flat.to(torch.int64)
        else:
            ints = flat.view(_INT_OF_SIZE[flat.element_size()]).to(torch.int64)
        pos = torch.arange(1, ints.numel() + 1, device=ints.device, dtype=torch.int64)
        pos = pos * 0x9E3779B1 + 0x7F4A7C15  # odd multiplier: spreads positions
        both = torch.stack([ints.sum(), (ints * pos).sum()])
        a, b = both.tolist()
    return int(a), int(b)


def _row(t: torch.Tensor, with_values: bool) -> list[int]:
    shape = list(t.shape)
    dims = shape[:_MAX_DIMS - 1] + [math.prod(shape[_MAX_DIMS - 1:])] if len(shape) > _MAX_DIMS else shape
    dims = dims + [-1] * (_MAX_DIMS - len(dims))
    fp = fingerprint(t) if with_values else (0, 0)
    return [_MAGIC, t.ndim, *dims, _DTYPES.get(t.dtype, 99), t.numel(), *fp]


def _gather_rows(t: torch.Tensor, name: str, axis: AxisLike, with_values: bool) -> list[list[int]]:
    """Every rank's row (shape, dtype, fingerprint) in rank order; a failed exchange or a
    rank that never joins ends in the group's timeout as a DistributedError."""
    import torch.distributed as dist

    from spmd_moe.errors import DistributedError

    n = axis.size
    dev = _exchange_device(axis)
    # Checker arithmetic, not layer data: outside spmd_types' tracking (strict mode
    # would reject the untyped fingerprint tensors).
    ctx = spmd.no_typecheck() if _HAVE_SPMD and spmd.is_type_checking() else contextlib.nullcontext()
    try:
        with ctx, torch.no_grad():
            mine = torch.tensor(_row(t, with_values), dtype=torch.int64, device=dev)
            everyone = torch.empty(n * _ROW, dtype=torch.int64, device=dev)
            dist.all_gather_into_tensor(everyone, mine, group=axis.group)
            rows = everyone.view(n, _ROW).tolist()
    except RuntimeError as e:
        raise DistributedError(
            f"{name}: debug-mode placement check on axis '{axis.name}' (size {n}) failed: "
            f"expected every rank to join the checksum exchange, got: "
            f"{str(e).splitlines()[0][:300] if str(e) else type(e).__name__}. Fix: check that "
            "every rank reached this call with debug mode on everywhere (a rank that died, "
            "skipped the call or runs with debug off makes the others time out after the "
            "group's timeout); the group is unusable now, restart the job."
        ) from e
    for r, row in enumerate(rows):
        if row[0] != _MAGIC:  # a peer in some other collective: shapes of what it sent differ
            raise DistributedError(
                f"{name}: debug-mode placement check on axis '{axis.name}' (size {n}): "
                f"expected every rank in the same check, got other data from rank {r}. Fix: "
                "make every rank run the same layers in the same order with debug mode on."
            )
    return [[int(v) for v in row] for row in rows]


def _shape_of(row: list[int]) -> list[int]:
    return [d for d in row[2:2 + _MAX_DIMS]][: row[1] if row[1] <= _MAX_DIMS else _MAX_DIMS]


def _dtype_name(row: list[int]) -> str:
    names = {i: str(d).removeprefix("torch.") for d, i in _DTYPES.items()}
    return names.get(row[2 + _MAX_DIMS], "other dtype")


def _differs(rows: list[list[int]], lo: int, hi: int) -> list[int]:
    return [r for r in range(1, len(rows)) if rows[r][lo:hi] != rows[0][lo:hi]]


_TOKEN_FIX = (
    "give each rank its own slice of the tokens (shard the batch or sequence over this "
    "axis, or spmd_moe.collectives.split_tokens(x, pctx) on a replicated batch: pad T to a "
    "multiple of the axis size first); if every rank really holds the same tokens, use "
    "layout 'replicated' (or 'invariant'), which splits them itself"
)


def verify_values(t: torch.Tensor, name: str, code: str, axis: AxisLike, *, tokens: bool = False) -> None:
    """Debug mode: verify from the values that ``t`` can be ``code`` on ``axis``.

    R / I: same shape, dtype and bytes on every rank. P: same shape and dtype (Partial
    cannot be verified from values). V: nothing, unless ``tokens`` (``t`` is documented
    as this rank's token slice): then identical non-empty data on every rank is
    rejected as a likely Replicate. A collective on every rank of the axis, except for V
    without ``tokens`` (no communication).
    """
    if axis.size == 1 or axis.group is None or not _HAVE_SPMD:
        return
    if code == "V" and not tokens:
        return  # an all-ranks-equal Varying is legal in general: nothing to check
    rows = _gather_rows(t, name, axis, with_values=code in ("R", "I") or tokens)
    where = f"{name} on axis '{axis.name}' (size {axis.size})"
    shape_diff = _differs(rows, 1, 2 + _MAX_DIMS + 1)  # ndim, dims, dtype
    if code in ("R", "I", "P") and shape_diff:
        r = shape_diff[0]
        got = (f"shape {_shape_of(rows[r])} ({_dtype_name(rows[r])}) on rank {r} vs "
               f"{_shape_of(rows[0])} ({_dtype_name(rows[0])}) on rank 0")
        if code == "P":
            raise PlacementError(
                f"{where}: expected placement P (Partial: summands of one shape on every "
                f"rank), got {got}. Fix: every rank must compute its summand of the same "
                "tensor (same shape and dtype); check what feeds this tensor on each rank."
            )
        raise PlacementError(
            f"{where}: expected placement {code} ({_WORDS[code]}: the same values on every "
            f"rank), got V: differs across ranks: Varying ({got}). Fix: "
            f"{placement_fix(code, 'V')}."
        )
    if code in ("R", "I"):
        val_diff = _differs(rows, _ROW - 2, _ROW)
        if val_diff:
            raise PlacementError(
                f"{where}: expected placement {code} ({_WORDS[code]}: the same values on "
                f"every rank), got V: differs across ranks: Varying (ranks {val_diff} hold "
                f"other values than rank 0; shape {_shape_of(rows[0])}). Fix: "
                f"{_summand_fix(name) if _looks_like_count(name) else placement_fix(code, 'V')}."
            )
        return
    if tokens and not shape_diff and rows[0][_ROW - 3] > 0 and not _differs(rows, _ROW - 2, _ROW):
        raise PlacementError(
            f"{where}: expected placement V (Varying: this rank's own token slice), got "
            f"identical tokens on all {axis.size} ranks (shape {_shape_of(rows[0])}): likely "
            "R (Replicate), a token split that never happened (torchtitan #3622): every "
            "token would be routed and counted once per rank. Fix: " + _TOKEN_FIX + "."
        )


def _looks_like_count(name: str) -> bool:
    """A per-rank count stated Replicate (the #3622 family) differs across ranks like any
    Varying tensor; its fix is a sum, not a gather, so the message says so."""
    low = name.lower()
    return "count" in low or "tokens_per_expert" in low


def _summand_fix(name: str) -> str:
    return (
        f"{name} looks like this rank's count, i.e. its summand of the global count: state it "
        "Partial (spmd_moe.placement.as_par(x, pctx)) and sum it with spmd_moe.collectives.all_reduce(x, pctx) "
        "(P -> R); for a layer's tokens_per_expert_E, moe.global_tokens_per_expert() does both. "
        "An all_gather would stack the ranks' counts instead of adding them"
    )


def _mismatch(where: str, expected: str, actual: str) -> PlacementError:
    return PlacementError(
        f"{where}: expected placement {expected}, got {actual}. "
        f"Fix: {placement_fix(expected, actual)}."
    )


def check_placement(t: torch.Tensor, name: str, expected: str, axis: AxisLike, *, tokens: bool = False) -> None:
    """Debug mode: raise PlacementError unless ``t`` is ``expected`` on ``axis``.

    A tensor spmd_types tracks is checked against its tracked placement; an untracked one
    is verified from its values (:func:`verify_values`). Nothing is written on ``t``.
    """
    if axis.size == 1 or axis.group is None or not _HAVE_SPMD:
        return  # one rank: every placement is the same thing
    actual = local_type_on(t, axis)
    if actual is None:
        verify_values(t, name, expected, axis, tokens=tokens)
    elif actual != expected:
        raise _mismatch(f"{name} on axis '{axis.name}' (size {axis.size})", expected, actual)


def verify_stated(t: torch.Tensor, code: str, pctx: AxisLike, name: str) -> torch.Tensor:
    """Debug mode: check a placement stated with as_rep / as_inv / as_var / as_par and
    return the tensor to use from there on.

    Verified, never assigned: R / I by a checksum exchange over the axis; P by shape
    agreement only (Partial cannot be verified from values); V needs no exchange (an
    all-ranks-equal Varying is legal; token inputs get the #3622 check in ``checked``).
    A tensor that spmd_types already tracks must carry the stated placement. ``t``
    itself is never marked: inside a tracked region (spmd_types' typecheck mode) the
    result is a marked alias of an untracked ``t`` (:func:`typed_alias`), elsewhere ``t``.
    """
    if pctx.size == 1 or pctx.group is None or not _HAVE_SPMD:
        return t
    tracked = local_type_on(t, pctx)
    check_placement(t, name, code, pctx)
    if tracked is None and spmd.is_type_checking():
        return typed_alias(t, code, pctx)
    return t


def typed_alias(t: torch.Tensor, code: str, axis: AxisLike) -> torch.Tensor:
    """A new tensor object sharing ``t``'s storage and autograd history
    (``t.view_as(t)``), marked ``code`` on ``axis`` for spmd_types' tracking. The
    caller's ``t`` gets no mark: nothing outlives the tracked region on it."""
    ctx = spmd.no_typecheck() if spmd.is_type_checking() else contextlib.nullcontext()
    with ctx:
        alias = t.view_as(t)
    spmd.assert_type(alias, {axis.group: _LocalType(code)})
    return alias


@contextlib.contextmanager
def typed_params(axis: AxisLike, where: str, params: list[tuple[str, torch.Tensor, str]]) -> Iterator[None]:
    """The layer's own parameters and buffers inside its tracked region: each is
    verified from its values (R / I by checksum: a replicated gate weight must be the
    same on every rank), marked for spmd_types, and unmarked again on exit (a mark
    this did not add is left alone), so no verdict depends on an earlier call."""
    added: list[torch.Tensor] = []
    try:
        for pname, p, code in params:
            actual = local_type_on(p, axis)
            if actual is None:
                verify_values(p, f"{where}: {pname}", code, axis)
                with spmd.no_typecheck():
                    spmd.assert_type(p, {axis.group: _LocalType(code)})
                added.append(p)
            elif actual != code:
                raise _mismatch(f"{where}: {pname} on axis '{axis.name}' (size {axis.size})", code, actual)
        yield
    finally:
        for p in added:
            _unmark(p)


@contextlib.contextmanager
def tracked_region(
    axis: AxisLike, where: str, params: list[tuple[str, torch.Tensor, str]], *, strict: bool = True
) -> Iterator[None]:
    """A layer's tracked region (debug mode, >1 rank): spmd_types' typecheck mode in
    strict mode (every operand of every op must carry a placement on the axis) with
    the axis as the current mesh (deterministic factories such as torch.zeros /
    torch.arange are Replicate), the layer's own ``params`` verified and marked
    (:func:`typed_params`), and spmd_types' errors re-raised as PlacementError naming
    the layer and the axis."""
    from spmd_types.checker import typecheck

    full = f"{where} on axis '{axis.name}' (size {axis.size})"
    try:
        with spmd.set_current_mesh([axis.group]), typecheck(strict_mode="strict" if strict else "permissive"):
            with typed_params(axis, where, params):
                yield
    except spmd.SpmdTypeError as e:
        raise PlacementError(f"{full}: placement check failed: {e}") from e


def untracked() -> contextlib.AbstractContextManager[Any]:
    """Outside spmd_types' tracking inside a tracked region (checker arithmetic, a kernel
    run only to be compared); a no-op elsewhere."""
    if _HAVE_SPMD and spmd.is_type_checking():
        return spmd.no_typecheck()  # type: ignore[no-any-return]
    return contextlib.nullcontext()


def kernels_agree(what: str, fast: torch.Tensor, reference: torch.Tensor, axis: AxisLike) -> None:
    """Debug mode: the production kernel's result ``fast`` must equal the reference
    path's bit for bit (the fused CUDA combine guarantees it). Every rank learns whether
    any rank differs and all raise together (a lone raise would leave the others
    waiting in the layer's next collective)."""
    import torch.distributed as dist

    from spmd_moe.errors import DistributedError, SpmdMoeError

    with torch.no_grad(), untracked():
        same = fast.shape == reference.shape and fast.dtype == reference.dtype and bool(torch.equal(fast, reference))
        bad = [] if same else [0]
        if axis.size > 1 and axis.group is not None:
            dev = _exchange_device(axis)
            flags = torch.empty(axis.size, dtype=torch.int64, device=dev)
            try:
                dist.all_gather_into_tensor(flags, torch.tensor([0 if same else 1], dtype=torch.int64, device=dev), group=axis.group)
            except RuntimeError as e:
                raise DistributedError(
                    f"{what}: debug-mode kernel comparison on axis '{axis.name}' (size {axis.size}) "
                    f"failed: expected every rank to join, got: {str(e).splitlines()[0][:300]}. "
                    "Fix: check that every rank reached this layer with debug mode on."
                ) from e
            bad = [r for r, f in enumerate(flags.tolist()) if f]
    if bad:
        detail = ""
        if not same:
            if fast.shape != reference.shape or fast.dtype != reference.dtype:
                detail = f" (here {fast.dtype} {list(fast.shape)} vs {reference.dtype} {list(reference.shape)})"
            else:
                with untracked():
                    diff = (fast.float() - reference.float()).abs()
                    detail = f" (here {int((fast != reference).sum())} entries differ, max |diff| {float(diff.max()):.3g})"
        raise SpmdMoeError(
            f"{what}: expected the production kernel to equal the reference path bit for bit, "
            f"got a difference on ranks {bad}{detail}. Fix: none on your side: please report "
            "this message as a bug; meanwhile run with the reference path (the fused kernel "
            "is skipped with autograd on or on CPU)."
        )


def _unmark(t: torch.Tensor) -> None:
    from spmd_types._type_attr import _LOCAL_TYPE_ATTR

    if _LOCAL_TYPE_ATTR in t.__dict__:
        delattr(t, _LOCAL_TYPE_ATTR)


# ----------------------------------------------------------------------------- checked

_P = ParamSpec("_P")
_T = TypeVar("_T")


def _expert_axis_code(hint: Any) -> str | None:
    """The letter a hint states on the layer's expert axis ('ep'), or None."""
    p = placements_of(hint)
    return None if p is None else p.get(EP.name)


def _return_codes(hint: Any) -> list[str | None] | None:
    if typing.get_origin(hint) is tuple:
        return [_expert_axis_code(a) for a in typing.get_args(hint)]
    b = _expert_axis_code(hint)
    return None if b is None else [b]


def _axis_of(args: tuple[Any, ...]) -> AxisLike | None:
    owner = args[0] if args else None
    pctx = getattr(owner, "pctx", None)
    return cast("AxisLike | None", pctx)


@typing.overload
def checked(fn: Callable[_P, _T], /) -> Callable[_P, _T]: ...


@typing.overload
def checked(*, tokens: tuple[str, ...] = ()) -> Callable[[Callable[_P, _T]], Callable[_P, _T]]: ...


def checked(fn: Callable[_P, _T] | None = None, /, *, tokens: tuple[str, ...] = ()) -> Any:
    """Check shapes, dtypes (jaxtyping+beartype) and placements of ``fn`` in debug mode.

    Off, the wrapper is one bool test and a call. The placement axis is ``self.pctx``
    of the method's owner (a ParallelContext). On, each tensor parameter with a
    placement on the expert axis is checked against spmd_types' tracked placement, or,
    if untracked, verified from its values (:func:`verify_values`; never assigned);
    inside a tracked region (spmd_types' typecheck mode) ``fn`` then gets a marked alias
    of it (:func:`typed_alias`), never the caller's object marked. ``tokens`` names the
    Varying parameters documented as this rank's token slice (``@checked(tokens=("x_TD",))``):
    identical on every rank, they are rejected as a likely Replicate (torchtitan #3622).
    Results are checked the same way (tracked placement, else values).
    """
    if fn is None:
        return functools.partial(_checked, tokens=frozenset(tokens))
    return _checked(fn, tokens=frozenset())


def _checked(fn: Callable[_P, _T], tokens: frozenset[str]) -> Callable[_P, _T]:
    typed_fn = jaxtyped(typechecker=beartype)(fn)
    sig = inspect.signature(fn)
    info: dict[str, Any] = {}

    def _hints() -> tuple[dict[str, str], list[str | None] | None]:
        if not info:
            hints = typing.get_type_hints(fn, include_extras=True)
            params = {}
            for pname in sig.parameters:
                if pname in hints:
                    b = _expert_axis_code(hints[pname])
                    if b is not None:
                        params[pname] = b
            bad = sorted(set(tokens) - {p for p, c in params.items() if c == "V"})
            if bad:
                raise TypeError(f"checked(tokens={sorted(tokens)}): {bad} not Varying parameters of {fn.__qualname__}")
            info["params"] = params
            info["ret"] = _return_codes(hints["return"]) if "return" in hints else None
        return info["params"], info["ret"]

    qual = fn.__qualname__

    @functools.wraps(fn)
    def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _T:
        if not _debug._enabled:
            return fn(*args, **kwargs)
        if _call_log is not None:
            _call_log[qual] = _call_log.get(qual, 0) + 1
        params, ret = _hints()
        axis = _axis_of(args)
        global _depth
        outer = _depth == 0  # entering the checked region: verify what comes in
        call_args, call_kwargs = args, kwargs
        if axis is not None and axis.size > 1 and axis.group is not None and _HAVE_SPMD:
            bound = sig.bind(*args, **kwargs)
            tracking = spmd.is_type_checking()
            aliased = False
            for pname, code in params.items():
                v = bound.arguments.get(pname)
                if not isinstance(v, torch.Tensor):
                    continue
                actual = local_type_on(v, axis)
                if actual is None:
                    if not outer:
                        continue  # the layer's own untracked tensor: mypy's business
                    verify_values(v, f"{qual}({pname})", code, axis, tokens=pname in tokens)
                    if tracking:
                        bound.arguments[pname] = typed_alias(v, code, axis)
                        aliased = True
                elif actual != code:
                    raise _mismatch(f"{qual}({pname}) on axis '{axis.name}' (size {axis.size})", code, actual)
                elif outer and pname in tokens:
                    # A token slice stated just before (as_var's tracked alias): the #3622
                    # check still compares its values across ranks.
                    verify_values(v, f"{qual}({pname})", code, axis, tokens=True)
            if aliased:
                call_args, call_kwargs = tuple(bound.args), dict(bound.kwargs)  # type: ignore[assignment]
        _depth += 1
        try:
            out = typed_fn(*call_args, **call_kwargs)
        except (BeartypeCallHintViolation, TypeCheckError) as e:
            hints = typing.get_type_hints(fn, include_extras=True)
            arguments = sig.bind(*args, **kwargs).arguments
            raise _shape_or_dtype_error(qual, e, hints, arguments) from None
        finally:
            _depth -= 1
        if axis is not None and axis.size > 1 and ret is not None:
            outs = out if isinstance(out, tuple) else (out,)
            for i, (o, out_brand) in enumerate(zip(outs, ret)):
                if out_brand is None or not isinstance(o, torch.Tensor):
                    continue
                if outer:
                    check_placement(o, f"{qual} -> output {i}", out_brand, axis)
                else:
                    actual = local_type_on(o, axis)
                    if actual is not None and actual != out_brand:
                        raise _mismatch(f"{qual} -> output {i} on axis '{axis.name}' (size {axis.size})", out_brand, actual)
        return out

    return wrapper


_call_log: dict[str, int] | None = None
_depth = 0  # nesting of checked calls: values are verified where the region is entered


@contextlib.contextmanager
def checked_calls() -> Iterator[dict[str, int]]:
    """Count the debug-mode checks made inside the block, by function."""
    global _call_log
    old, _call_log = _call_log, {}
    try:
        yield _call_log
    finally:
        _call_log = old


_SHORT_DTYPES = {"f": "float", "bf": "bfloat", "i": "int", "u": "uint", "c": "complex"}


def _array_hint(hint: Any) -> Any:
    """The jaxtyping array type inside a hint (Float[Placed[Var[EP]], ...] or Optional of it)."""
    if hasattr(hint, "dtypes") and hasattr(hint, "dim_str"):
        return hint
    for arg in typing.get_args(hint):
        found = _array_hint(arg)
        if found is not None:
            return found
    return None


def _dtype_of(short: str) -> str:
    """jaxtyping's short form (f32[3,4](torch), i64[], bool[2]) -> 'float32'."""
    m = re.match(r"([a-z]+?)(\d+)\[", short)
    if m is None:
        return short.split("[")[0]
    return _SHORT_DTYPES.get(m.group(1), m.group(1)) + m.group(2)


def _shape_or_dtype_error(
    qual: str, e: Exception, hints: dict[str, Any], arguments: dict[str, Any]
) -> Exception:
    """Turn jaxtyping/beartype's report into a ShapeError or DtypeError that names the
    parameter, the expected shape/dtype, the actual one and the fix."""
    msg = str(e)
    m = re.search(r"typechecking parameter '(\w+)'", msg)
    pname = m.group(1) if m else None
    what = f"parameter '{pname}'" if pname else "return value"
    hint = _array_hint(hints.get(pname if pname else "return"))
    value = arguments.get(pname) if pname else None
    actual_m = re.search(r"Actual value: (\S+)", msg)
    actual = actual_m.group(1) if actual_m else "?"
    bound_dims = ", ".join(
        ln.strip() for ln in msg.split("annotation are as follows.")[-1].splitlines() if "=" in ln
    ) if "annotation are as follows." in msg else ""
    shape: object
    if isinstance(value, torch.Tensor):
        dtype, shape = str(value.dtype).removeprefix("torch."), list(value.shape)
    else:
        dtype, shape = _dtype_of(actual), actual.split("(")[0]
    if hint is None:  # not an array hint (e.g. a plain int)
        expected_m = re.search(r"Expected type: (.*?)\.?$", msg, re.MULTILINE)
        expected = expected_m.group(1) if expected_m else "the annotated type"
        return DtypeError(
            f"{qual}: {what}: expected type {expected}, got {type(value).__name__} "
            f"{actual}. Fix: pass a value of the annotated type."
        )
    kind = hint.__name__.split("[")[0]  # Float / Int / ...
    # A result that breaks its own signature is a bug in the function, not bad input.
    bug = (f"Fix: none on your side: {qual} returned a result its signature does not "
           "allow; please report this message as a bug.")
    if dtype not in hint.dtypes:
        fix = (
            "Fix: pass integer expert ids / counts (x.long())." if kind == "Int" else
            "Fix: cast the input to the dtype the layer computes in (MoEConfig.param_dtype) "
            "or build the layer with the input's dtype."
        )
        return DtypeError(
            f"{qual}: {what} ({hint.__name__}): expected dtype {kind} "
            f"({', '.join(d for d in hint.dtypes if not d.startswith(('int2', 'int4', 'float4', 'float8')))}), "
            f"got {dtype}. {bug if pname is None else fix}"
        )
    dims = f" with {bound_dims} bound by the other arguments" if bound_dims else ""
    fix = (
        "Fix: pass tensors shaped as the signature states (T tokens x D=MoEConfig.dim; "
        "flatten batch and sequence dims into T first; every argument must agree on the "
        "shared dims)."
    )
    return ShapeError(
        f"{qual}: {what} ({hint.__name__}): expected shape [{', '.join(hint.dim_str.split())}]"
        f"{dims}, got {shape}. {bug if pname is None else fix}"
    )
