"""Placement vocabulary, the `checked` decorator and the debug-mode checker glue.

Placements are those of ``spmd_types`` (R / I / V / P) on the layer's *expert axis*:
the mesh axis over which the layer splits tokens and shards experts (the TP group in
TP2EP, the EP mesh dim in torchtitan). A tensor's type in a signature is written
``Float[Placed[Var[EP]], "T D"]``: jaxtyping gives shape and dtype, the class gives placement.

* Statically (mypy) ``Rep``, ``Inv``, ``Var`` and ``Par`` are four distinct subclasses of
  ``torch.Tensor``: passing a ``Par`` where a ``Rep`` is required is a type error. A plain
  ``Tensor`` is none of them; ``as_rep`` / ``as_var`` / ... state a placement (and check
  it in debug mode), the typed collectives in ``spmd_moe.collectives`` change it.
* At runtime the four classes accept any tensor (``isinstance`` is Tensor's), so they
  cost nothing. In debug mode :func:`checked` checks shapes and dtypes (jaxtyping +
  beartype) and placements (spmd_types' tracked local type on the expert axis).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
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


def local_type_on(t: torch.Tensor, axis: AxisLike) -> str | None:
    """The spmd_types letter tracked on ``t`` for ``axis``, or None if untyped."""
    if not _HAVE_SPMD or axis.size == 1 or axis.group is None:
        return None
    ty = spmd.maybe_get_axis_local_type(t, axis.group) if hasattr(spmd, "maybe_get_axis_local_type") else None
    return None if ty is None else str(ty.value)


def check_placement(t: torch.Tensor, name: str, expected: str, axis: AxisLike) -> None:
    """Debug mode: raise PlacementError unless ``t`` is ``expected`` on ``axis``.

    An untyped tensor is given the expected type (it enters the tracked region here).
    """
    if axis.size == 1 or axis.group is None or not _HAVE_SPMD:
        return  # one rank: every placement is the same thing
    actual = local_type_on(t, axis)
    if actual is None:
        spmd.assert_type(t, {axis.group: _LocalType(expected)})
        return
    if actual != expected:
        raise PlacementError(
            f"{name} on axis '{axis.name}' (size {axis.size}): expected placement "
            f"{expected}, got {actual}. Fix: {placement_fix(expected, actual)}."
        )


def verify_stated(t: torch.Tensor, code: str, pctx: AxisLike, name: str) -> None:
    """Debug mode: check a placement stated with as_rep / as_var / ... on ``pctx``'s axis."""
    check_placement(t, name, code, pctx)


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


def checked(fn: Callable[_P, _T]) -> Callable[_P, _T]:
    """Check shapes, dtypes (jaxtyping+beartype) and placements of ``fn`` in debug mode.

    Off, the wrapper is one bool test and a call. The placement axis is ``self.pctx``
    of the method's owner (a ParallelContext).
    """
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
        if axis is not None and axis.size > 1:
            bound = sig.bind(*args, **kwargs)
            for pname, brand in params.items():
                v = bound.arguments.get(pname)
                if isinstance(v, torch.Tensor):
                    check_placement(v, f"{qual}({pname})", brand, axis)
        try:
            out = typed_fn(*args, **kwargs)
        except (BeartypeCallHintViolation, TypeCheckError) as e:
            hints = typing.get_type_hints(fn, include_extras=True)
            arguments = sig.bind(*args, **kwargs).arguments
            raise _shape_or_dtype_error(qual, e, hints, arguments) from None
        if axis is not None and axis.size > 1 and ret is not None:
            outs = out if isinstance(out, tuple) else (out,)
            for i, (o, out_brand) in enumerate(zip(outs, ret)):
                if out_brand is not None and isinstance(o, torch.Tensor):
                    check_placement(o, f"{qual} -> output {i}", out_brand, axis)
        return out

    return wrapper


_call_log: dict[str, int] | None = None


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
