"""How placements flow through torch ops, per mesh axis: the table and the join.

Read by the mypy plugin (``spmd_moe.mypy_plugin``) and by the runtime checker; it
agrees with spmd_types' own inference (``tests/test_typing_rules.py`` checks that), so
what mypy accepts is what spmd_types' debug-mode tracking accepts. Pure Python: the
plugin imports it inside mypy, without torch.

An operand's placement on one axis is ``"R" | "I" | "V" | "P"``, or ``"S"`` for a
Python scalar or a tensor with no placement on that axis (it adopts the others').
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

Linearity = Literal["view", "linear", "multilinear", "nonlinear"]
Operand = Literal["R", "I", "V", "P", "S"]


@dataclass(frozen=True)
class Forbidden:
    """A placement combination no op may produce: the rule's name, why, and the fix."""

    name: str
    why: str
    fix: str


FORBIDDEN: dict[str, Forbidden] = {f.name: f for f in (
    Forbidden(
        "partial_nonlinear",
        "Partial into a non-linear op: f(sum of partials) != sum of f(partials)",
        "reduce it first: all_reduce (P -> R) or reduce_scatter (P -> V)",
    ),
    Forbidden(
        "partial_times_partial",
        "Partial in more than one factor of a product: (a1+a2)(b1+b2) != a1 b1 + a2 b2",
        "reduce all but one factor first (all_reduce / reduce_scatter)",
    ),
    Forbidden(
        "partial_plus_nonpartial",
        "Partial added to a Replicate value or a constant: the non-partial term is summed "
        "once per rank",
        "reduce the Partial first, or make every term Partial",
    ),
    Forbidden(
        "partial_with_varying",
        "Partial combined with Varying: no rank holds a term of a well-defined sum",
        "reduce the Partial first (reduce_scatter -> V matches a token slice)",
    ),
    Forbidden(
        "invariant_mix",
        "Invariant combined with another placement: its gradient convention (complete on "
        "every rank) differs from Replicate's (Partial)",
        "convert first: invariant_to_replicate (I -> R) or replicate_to_invariant (R -> I)",
    ),
    Forbidden(
        "collective_input",
        "a collective given a placement it does not take (e.g. Replicate into a reducing "
        "collective multiplies by the axis size; gathering a Replicate tensor repeats it)",
        "use the collective that takes this placement, on the axis where the tensor has it",
    ),
    Forbidden(
        "restate",
        "stating a placement on an axis where the tensor already has one: a placement is "
        "stated on untyped tensors only (inputs, buffers), changed only by collectives",
        "drop the as_* call, or convert with the collective that changes the placement",
    ),
    Forbidden(
        "partial_through_function",
        "Partial on an axis the called function's signature does not name: the function "
        "runs replicated over that axis and may apply non-linear ops",
        "reduce it over that axis first, or name the axis in the function's signature",
    ),
)}


class RuleViolation(Exception):
    """An op broke a placement rule on one axis."""

    def __init__(self, rule: str, axis: str, operands: Sequence[str], what: str = "") -> None:
        self.rule = FORBIDDEN[rule]
        self.axis = axis
        self.operands = tuple(operands)
        where = f" ({what})" if what else ""
        super().__init__(
            f"placement rule '{rule}' on axis '{axis}'{where}: {self.rule.why}; operands "
            f"{list(self.operands)}. Fix: {self.rule.fix}"
        )


def join(linearity: Linearity, operands: Sequence[Operand], axis: str, what: str = "") -> str | None:
    """The output placement on ``axis`` of an op with this linearity, or None when no
    operand has a placement there. Raises RuleViolation for a forbidden combination.

    * ``view``: one tensor operand, any placement kept (reshape, dtype casts, pad); other
      tensor arguments (``view_as(t)``, ``.to(t)``) only lend a shape or dtype.
    * ``linear``: every tensor operand enters linearly and additively (add, sub, cat,
      sum): P + P -> P, P + anything else is affine.
    * ``multilinear``: linear in each factor (mul, matmul, linear, indexing / gather by
      an index tensor, which selects the same way from each summand):
      one Partial factor times Replicate/scalar factors stays Partial.
    * ``nonlinear``: anything else (softmax, silu, exp, comparisons, top-k): no Partial.
    """
    kinds = set(operands) - {"S"}
    if not kinds:
        return None
    if kinds <= {"R"}:
        return "R"
    if kinds <= {"I"}:
        return "I"
    if kinds <= {"R", "V"}:
        return "V"
    if "I" in kinds:
        raise RuleViolation("invariant_mix", axis, operands, what)
    # A Partial operand is present.
    if kinds - {"P", "R"}:
        raise RuleViolation("partial_with_varying", axis, operands, what)
    if linearity == "nonlinear":
        raise RuleViolation("partial_nonlinear", axis, operands, what)
    if linearity in ("linear", "view") and (kinds != {"P"} or "S" in operands):
        raise RuleViolation("partial_plus_nonpartial", axis, operands, what)
    if linearity == "multilinear" and sum(o == "P" for o in operands) > 1:
        raise RuleViolation("partial_times_partial", axis, operands, what)
    return "P"


def through_function(placements: Sequence[str], axis: str, what: str = "") -> str:
    """The placement a function that does not name ``axis`` gives its outputs there,
    from its inputs' placements on that axis (the function runs replicated over it)."""
    kinds = set(placements)
    if "P" in kinds:
        raise RuleViolation("partial_through_function", axis, placements, what)
    if "V" in kinds:
        if "I" in kinds:
            raise RuleViolation("invariant_mix", axis, placements, what)
        return "V"
    if kinds == {"I"}:
        return "I"
    if "I" in kinds:
        raise RuleViolation("invariant_mix", axis, placements, what)
    return "R"


# ----------------------------------------------------------------------------- the table
# Tensor methods and torch / torch.nn.functional functions, by name. An op not listed
# gives a plain Tensor: its result has no placement and must be stated again.

_VIEW = (
    "view", "view_as", "reshape", "reshape_as", "flatten", "unflatten", "squeeze",
    "unsqueeze", "transpose", "t", "T", "mT", "permute", "contiguous", "clone", "detach",
    "expand", "expand_as", "narrow", "to", "float", "double", "half", "bfloat16", "type_as",
    "neg", "__neg__", "__pos__", "movedim", "select", "repeat",
    "cpu", "cuda", "requires_grad_", "unbind", "pad",
)
_LINEAR = (
    "__add__", "__radd__", "__sub__", "__rsub__", "add", "sub", "__iadd__", "__isub__",
    "sum", "mean", "cat", "stack", "cumsum", "diff",
)
_MULTILINEAR = (
    "__mul__", "__rmul__", "__imul__", "mul", "__matmul__", "__rmatmul__", "matmul", "mm",
    "bmm", "linear", "einsum", "__truediv__", "div", "gather", "index_select",
    "take_along_dim", "__getitem__", "masked_fill", "where", "outer", "repeat_interleave",
)
_NONLINEAR = (
    "silu", "gelu", "relu", "sigmoid", "softmax", "log_softmax", "exp", "log", "sqrt",
    "rsqrt", "tanh", "pow", "__pow__", "__rtruediv__", "abs", "square", "max", "min",
    "amax", "amin", "argmax", "argmin", "topk", "sort", "argsort", "clamp", "clip",
    "__lt__", "__le__", "__gt__", "__ge__", "__eq__", "__ne__", "lt", "le", "gt", "ge",
    "eq", "ne", "isfinite", "isnan", "__and__", "__or__", "__invert__", "logical_and",
    "logical_or", "logical_not", "norm", "rms_norm", "layer_norm", "bincount",
    "__floordiv__", "__mod__", "floor_divide", "remainder", "round", "sign", "cumprod",
    "prod", "any", "all", "long", "int", "bool", "nonzero", "one_hot",
)

OPS: dict[str, Linearity] = {
    **{n: "view" for n in _VIEW},
    **{n: "linear" for n in _LINEAR},
    **{n: "multilinear" for n in _MULTILINEAR},
    **{n: "nonlinear" for n in _NONLINEAR},
}
# Ops whose result is a (values, indices) pair of tensors, both placed like the input.
PAIR_OPS = frozenset({"topk", "sort", "max", "min"})
# Ops whose result is a tuple of tensors placed like the input.
TUPLE_OPS = frozenset({"unbind", "chunk", "split"})
# Ops taking a sequence of tensors as their first argument.
SEQUENCE_OPS = frozenset({"cat", "stack"})
# Integer-valued results: dtype casts to integers are not linear maps.
assert not set(_VIEW) & set(_NONLINEAR)
