"""Placements with mesh axes: the types every spmd_moe tensor carries.

A tensor's type names its placement on each mesh axis it is laid out over::

    x_TD: Float[Placed[Var[EP]], "T D"]            # Varying on the expert axis
    y_TD: Placed[Var[EP], Rep[DP]]                 # ... and Replicate on a data axis

``Rep`` / ``Inv`` / ``Var`` / ``Par`` are spmd_types' R / I / V / P; ``EP`` (the layer's
expert axis) and ``DP`` are axis roles, and users name their own by subclassing
:class:`Axis`. For mypy (with ``plugins = spmd_moe.mypy_plugin``) ``Placed[...]`` is a
``torch.Tensor`` subtype whose placements the plugin follows through torch ops, using
the rules in ``typing_rules``; jaxtyping's ``Float[X, "T D"]`` is ``X`` for mypy.
At runtime ``Placed[...]`` is a real class carrying the placements (read by
``spmd_moe.checking.checked`` in debug mode); ``isinstance`` accepts any tensor, so the
types cost nothing.

A placement is *stated* only on a tensor that has none (an input, a buffer) with
``as_rep`` / ``as_inv`` / ``as_var`` / ``as_par`` (verified in debug mode), or through
``unchecked_cast(Placed[...], t, reason=...)``, which says why it cannot be checked.
"""

from __future__ import annotations

import typing
from typing import TYPE_CHECKING, Any, ClassVar, Generic, TypeVar, TypeVarTuple, Unpack

import torch

from spmd_moe import _debug

if TYPE_CHECKING:
    from spmd_moe.parallel import ParallelContext

__all__ = [
    "DP", "EP", "Axis", "Inv", "Par", "Placed", "Rep", "Var",
    "as_inv", "as_par", "as_rep", "as_var", "placements_of", "unchecked_cast",
]


class Axis:
    """A mesh axis role. Subclass it to name an axis of your own (``name`` is shown in
    messages and is the key the mypy plugin orders axes by)."""

    name: ClassVar[str] = "axis"


class EP(Axis):
    """The layer's expert axis: tokens split and experts sharded over it (TP2EP's TP
    group in vLLM, the ``ep`` mesh dim in torchtitan)."""

    name = "ep"


class DP(Axis):
    """A data / sequence axis: a second axis for user model code (not used by the layer)."""

    name = "dp"


A = TypeVar("A", bound=Axis)


class _PerAxis(Generic[A]):
    code: ClassVar[str] = "?"


class Rep(_PerAxis[A]):
    """Replicate on axis A: the same value on every rank; its gradient is Partial."""

    code = "R"


class Inv(_PerAxis[A]):
    """Invariant on axis A: the same value on every rank; its gradient is Invariant."""

    code = "I"


class Var(_PerAxis[A]):
    """Varying on axis A: each rank holds different data (its token slice, its experts)."""

    code = "V"


class Par(_PerAxis[A]):
    """Partial on axis A: the true value is the sum over ranks of the local tensors."""

    code = "P"


_CODES: dict[type, str] = {Rep: "R", Inv: "I", Var: "V", Par: "P"}

_Ts = TypeVarTuple("_Ts")

if TYPE_CHECKING:

    class Placed(torch.Tensor, Generic[Unpack[_Ts]]):
        """A tensor with a placement per named mesh axis (see the module docstring)."""

        placements: ClassVar[dict[str, str]]

else:

    class _PlacedMeta(torch._C._TensorMeta):
        # Any tensor is an instance at runtime: placements are verified by `checked`
        # in debug mode (with a message that says the fix), never by isinstance.
        def __instancecheck__(cls, obj: object) -> bool:
            return isinstance(obj, torch.Tensor)

        def __repr__(cls) -> str:
            p = getattr(cls, "placements", None)
            if not p:
                return "Placed"
            return "Placed[" + ", ".join(f"{_NAMES[c]}[{a}]" for a, c in p.items()) + "]"

    _NAMES = {"R": "Rep", "I": "Inv", "V": "Var", "P": "Par"}
    _CACHE: dict[tuple[tuple[str, str], ...], type] = {}
    _BY_PARAMS: dict[Any, type] = {}  # Placed[...] subscripts already built (aliases hash by value)

    class Placed(torch.Tensor, metaclass=_PlacedMeta):
        """A tensor with a placement per named mesh axis (see the module docstring)."""

        placements: ClassVar[dict[str, str]] = {}
        axis_roles: ClassVar[dict[str, type[Axis]]] = {}

        def __class_getitem__(cls, params: Any) -> type:
            try:
                hit = _BY_PARAMS.get(params)
            except TypeError:  # unhashable: _make says what is wrong
                return cls._make(params)
            if hit is not None:  # the hot path: Placed[Var[EP]] in unchecked_cast (~8 us -> <1 us)
                return hit
            made = cls._make(params)
            _BY_PARAMS[params] = made
            return made

        @classmethod
        def _make(cls, params: Any) -> type:
            if not isinstance(params, tuple):
                params = (params,)
            spec: list[tuple[str, str, type[Axis]]] = []
            for p in params:
                origin, args = typing.get_origin(p), typing.get_args(p)
                if origin not in _CODES or len(args) != 1 or not (
                    isinstance(args[0], type) and issubclass(args[0], Axis)
                ):
                    raise TypeError(
                        f"Placed[...]: expected Rep[AX] / Inv[AX] / Var[AX] / Par[AX] with AX an "
                        f"Axis subclass, got {p!r}. Fix: e.g. Placed[Var[EP], Rep[DP]]."
                    )
                spec.append((args[0].name, _CODES[origin], args[0]))
            names = [s[0] for s in spec]
            if len(set(names)) != len(names):
                raise TypeError(f"Placed[...]: axis named twice in {names}. Fix: one placement per axis.")
            key = tuple(sorted((a, c) for a, c, _ in spec))
            if key not in _CACHE:
                _CACHE[key] = _PlacedMeta(
                    "Placed", (Placed,),
                    {"placements": dict(key), "axis_roles": {a: ax for a, _, ax in spec},
                     "__module__": __name__},
                )
            return _CACHE[key]


def placements_of(hint: Any) -> dict[str, str] | None:
    """The {axis name: letter} of a ``Placed[...]`` inside a hint (``Float[Placed[...], "T D"]``,
    ``X | None``), or None if the hint carries no placement."""
    if isinstance(hint, type) and issubclass(hint, Placed):
        return dict(hint.placements) if hint.placements else None
    array_type = getattr(hint, "array_type", None)  # jaxtyping's Float[X, "..."]
    if array_type is not None and array_type is not hint:
        found = placements_of(array_type)
        if found is not None:
            return found
    for arg in typing.get_args(hint):
        found = placements_of(arg)
        if found is not None:
            return found
    return None


# ----------------------------------------------------------------------------- stating
# The mypy plugin types these precisely: the result keeps t's other axes and gains
# `pctx`'s axis; stating a placement on a tensor that already has one on that axis is
# an error ("restating a known placement"). Without the plugin they are typed as below.


def _state(t: torch.Tensor, code: str, pctx: ParallelContext[Any], name: str) -> torch.Tensor:
    """Off: ``t``. Debug mode: verify the statement (spmd_moe.checking.verify_stated) and
    return the tensor to use (inside the layer's tracked region a marked alias, never
    the caller's object)."""
    if _debug._enabled:
        from spmd_moe.checking import verify_stated

        return verify_stated(t, code, pctx, name)
    return t


def as_rep(t: torch.Tensor, pctx: ParallelContext[A], name: str = "tensor") -> Placed[Rep[A]]:
    """State that the untyped ``t`` is Replicate on ``pctx``'s axis (verified in debug mode)."""
    return typing.cast("Placed[Rep[A]]", _state(t, "R", pctx, name))


def as_inv(t: torch.Tensor, pctx: ParallelContext[A], name: str = "tensor") -> Placed[Inv[A]]:
    """State that the untyped ``t`` is Invariant on ``pctx``'s axis (verified in debug mode)."""
    return typing.cast("Placed[Inv[A]]", _state(t, "I", pctx, name))


def as_var(t: torch.Tensor, pctx: ParallelContext[A], name: str = "tensor") -> Placed[Var[A]]:
    """State that the untyped ``t`` is Varying on ``pctx``'s axis (verified in debug mode)."""
    return typing.cast("Placed[Var[A]]", _state(t, "V", pctx, name))


def as_par(t: torch.Tensor, pctx: ParallelContext[A], name: str = "tensor") -> Placed[Par[A]]:
    """State that the untyped ``t`` is Partial on ``pctx``'s axis (cannot be verified:
    any local values are summands of some total)."""
    return typing.cast("Placed[Par[A]]", _state(t, "P", pctx, name))


_T = TypeVar("_T")


def unchecked_cast(typ: type[_T], t: torch.Tensor, *, reason: str) -> _T:
    """Give ``t`` the placement type ``typ`` with no static or runtime check.

    The escape hatch for what the rules cannot express; ``reason`` says why it holds
    (grep for ``unchecked_cast(`` to audit every one).
    """
    if not reason:
        raise ValueError("unchecked_cast: expected a reason, got ''. Fix: say why the placement holds.")
    return typing.cast(_T, t)
