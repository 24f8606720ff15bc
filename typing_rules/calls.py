"""The placement of one op call with its operands in call order (a proposal, not yet read
by the mypy plugin).

``typing_rules.ops.join`` gives every tensor operand of an op the same role. For a few
table ops that is unsound (tests/test_typing_rules.py::test_partial_verdicts_are_numerically_true
finds them): an operand that selects or divides enters non-linearly (a divisor, an
index, a mask, a ``where`` condition: a Partial one does not add up), and ``where`` is
additive in its two branches (a Replicate or scalar branch beside a Partial one is
summed once per rank). :func:`join_call` handles those ops and is ``join`` for every
other one. Pure Python, like the rest of typing_rules.

The operands must be in call order: the receiver (or the first argument of a torch
function) is position 0; Python scalars count only where the plugin counts them
(arithmetic), untyped tensors are "S" in their place.
"""

from __future__ import annotations

from collections.abc import Sequence

from typing_rules.ops import OPS, Linearity, Operand, RuleViolation, join

# Operand positions that enter the op non-linearly: they may not be Partial.
NONLINEAR_OPERANDS: dict[str, tuple[int, ...]] = {
    "__truediv__": (1,), "div": (1,),  # the divisor: 1/y
    "gather": (1,), "take_along_dim": (1,), "index_select": (1,), "__getitem__": (1,),  # the index
    "repeat_interleave": (1,),  # the repeat counts
    "masked_fill": (1,),  # the mask
    "where": (0,),  # the condition
}
# How the remaining operands combine, where it is not the table's linearity.
OTHER_OPERANDS: dict[str, Linearity] = {
    "where": "linear",  # where(c, a0 + a1, b0 + b1) = where(c, a0, b0) + where(c, a1, b1)
}


def join_call(op: str, operands: Sequence[Operand], axis: str, what: str = "") -> str | None:
    """The output placement on ``axis`` of ``op`` called with ``operands`` (call order).

    The non-linear operands may not be Partial (``partial_nonlinear``); the others are
    joined with the op's linearity (``OTHER_OPERANDS`` where it differs); the result is
    then combined with the non-linear operands as one factor with its selectors: a
    Partial result survives Replicate / scalar selectors only. A view op joins its first
    operand only (its other tensors lend a shape or a dtype).
    """
    lin = OPS[op]
    ops = list(operands[:1]) if lin == "view" else list(operands)
    nl = [i for i in NONLINEAR_OPERANDS.get(op, ()) if i < len(ops)]
    if any(ops[i] == "P" for i in nl):
        raise RuleViolation("partial_nonlinear", axis, ops, what or f"{op}: operand {nl}")
    rest = join(OTHER_OPERANDS.get(op, lin), [o for i, o in enumerate(ops) if i not in nl], axis, what)
    if not nl:
        return rest
    selected: Operand = rest if rest is not None else "S"  # type: ignore[assignment]
    return join("multilinear", [selected, *[ops[i] for i in nl]], axis, what)
