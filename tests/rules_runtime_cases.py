"""The op cases run under spmd_types' tracking by tests/test_rules_runtime.py.

Each case is an op of ``typing_rules.ops.OPS`` written as a call on test-owned tensors
whose placement on the axis the test states with ``spmd_types.assert_type``. The
operands a case lists are exactly what the mypy plugin joins for the same call (every
tensor argument; a Python scalar only in the arithmetic ops the plugin counts), so
``typing_rules.join(OPS[op], operands)`` and spmd_types' verdict for the call can be
compared one to one.

``kinds``: one letter per tensor operand, the kind of tensor it is:
``f`` float [4, 4], ``b`` bool [4, 4], ``i`` int64 index [4, 4] with values in [0, 4),
``j`` int64 index [4], ``g`` float [2, 4, 4] (batched), ``n`` int64 counts [4] (>= 0),
``s`` a Python scalar (2.0): the operand letter "S".
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

Case = tuple[str, str, Callable[..., Any]]  # (op name in OPS, kinds, call)

_UNARY_METHODS = (
    # view
    "contiguous", "clone", "detach", "t", "float", "double", "half", "bfloat16", "neg",
    "__neg__", "__pos__", "flatten", "cpu",
    # linear
    "sum", "mean",
    # nonlinear
    "exp", "log", "sqrt", "rsqrt", "tanh", "abs", "square", "amax", "amin", "argmax",
    "argmin", "sign", "round", "prod", "long", "int", "bool", "isfinite", "isnan",
    "sigmoid", "relu", "nonzero", "any", "all", "norm",
)

# Ops of the table with no case here, and why.
NO_CASE = {"cuda": "needs a CUDA device (the gloo test runs on CPU); the same rule as 'cpu'"}

CASES: list[Case] = [(name, "f", (lambda n: lambda x: getattr(x, n)())(name)) for name in _UNARY_METHODS]
CASES += [
    # ---------------------------------------------------------------- view
    ("view", "f", lambda x: x.view(16)),
    ("view_as", "f", lambda x: x.view_as(x)),
    ("reshape", "f", lambda x: x.reshape(2, 8)),
    ("reshape_as", "f", lambda x: x.reshape_as(x)),
    ("unflatten", "f", lambda x: x.unflatten(0, (2, 2))),
    ("squeeze", "f", lambda x: x.squeeze(0)),
    ("unsqueeze", "f", lambda x: x.unsqueeze(0)),
    ("transpose", "f", lambda x: x.transpose(0, 1)),
    ("T", "f", lambda x: x.T),
    ("mT", "f", lambda x: x.mT),
    ("permute", "f", lambda x: x.permute(1, 0)),
    ("expand", "f", lambda x: x.expand(2, 4, 4)),
    ("narrow", "f", lambda x: x.narrow(0, 0, 2)),
    ("to", "f", lambda x: x.to(torch.float32)),
    ("__getitem__", "f", lambda x: x[:2]),
    ("__getitem__", "fj", lambda x, j: x[j]),
    ("movedim", "f", lambda x: x.movedim(0, 1)),
    ("select", "f", lambda x: x.select(0, 1)),
    ("repeat", "f", lambda x: x.repeat(2, 1)),
    ("unbind", "f", lambda x: x.unbind(0)[0]),
    ("pad", "f", lambda x: F.pad(x, (0, 1))),
    ("expand_as", "ff", lambda x, y: x.expand_as(y)),
    ("type_as", "ff", lambda x, y: x.type_as(y)),
    ("requires_grad_", "f", lambda x: x.requires_grad_(False)),
    # ---------------------------------------------------------------- linear
    ("cumsum", "f", lambda x: x.cumsum(0)),
    ("diff", "f", lambda x: x.diff(dim=0)),
    ("cat", "ff", lambda x, y: torch.cat([x, y])),
    ("stack", "ff", lambda x, y: torch.stack([x, y])),
    *[(op, "ff", (lambda n: lambda x, y: getattr(x, n)(y))(op))
      for op in ("__add__", "__radd__", "__sub__", "__rsub__", "add", "sub", "__iadd__", "__isub__")],
    *[(op, "fs", (lambda n: lambda x, s: getattr(x, n)(s))(op))
      for op in ("__add__", "__radd__", "__sub__", "__rsub__", "add", "sub", "__iadd__", "__isub__")],
    # ---------------------------------------------------------------- multilinear
    *[(op, "ff", (lambda n: lambda x, y: getattr(x, n)(y))(op))
      for op in ("__mul__", "__rmul__", "mul", "__matmul__", "__rmatmul__", "matmul", "mm",
                 "__truediv__", "div", "__imul__")],
    *[(op, "fs", (lambda n: lambda x, s: getattr(x, n)(s))(op))
      for op in ("__mul__", "__rmul__", "mul", "__truediv__", "div", "__imul__")],
    ("bmm", "gg", lambda x, y: x.bmm(y)),
    ("linear", "ff", lambda x, w: F.linear(x, w)),
    ("einsum", "ff", lambda x, y: torch.einsum("td,ed->te", x, y)),
    ("outer", "ff", lambda x, y: torch.outer(x[0], y[0])),
    ("gather", "fi", lambda x, i: x.gather(1, i)),
    ("take_along_dim", "fi", lambda x, i: torch.take_along_dim(x, i, dim=1)),
    ("index_select", "fj", lambda x, j: x.index_select(0, j)),
    ("repeat_interleave", "fn", lambda x, n: x.repeat_interleave(n, dim=0)),
    ("masked_fill", "fb", lambda x, m: x.masked_fill(m, 0.0)),
    ("where", "bff", lambda c, x, y: torch.where(c, x, y)),
    ("where", "bfs", lambda c, x, s: torch.where(c, x, s)),
    # ---------------------------------------------------------------- nonlinear
    ("__rtruediv__", "fs", lambda x, s: x.__rtruediv__(s)),
    ("__pow__", "fs", lambda x, s: x.__pow__(s)),
    ("pow", "fs", lambda x, s: x.pow(s)),
    ("clamp", "fs", lambda x, s: x.clamp(min=s)),
    ("clip", "fs", lambda x, s: x.clip(min=s)),
    ("silu", "f", lambda x: F.silu(x)),
    ("gelu", "f", lambda x: F.gelu(x)),
    ("softmax", "f", lambda x: F.softmax(x, dim=-1)),
    ("log_softmax", "f", lambda x: F.log_softmax(x, dim=-1)),
    ("max", "f", lambda x: x.max(dim=-1)[0]),
    ("min", "f", lambda x: x.min(dim=-1)[0]),
    ("topk", "f", lambda x: x.topk(2, dim=-1)[0]),
    ("sort", "f", lambda x: x.sort(dim=-1)[0]),
    ("argsort", "f", lambda x: x.argsort(dim=-1)),
    ("cumprod", "f", lambda x: x.cumprod(0)),
    ("rms_norm", "f", lambda x: F.rms_norm(x, (4,))),
    ("layer_norm", "f", lambda x: F.layer_norm(x, (4,))),
    ("one_hot", "i", lambda i: F.one_hot(i, 4)),
    ("bincount", "j", lambda j: torch.bincount(j)),
    *[(op, "ff", (lambda n: lambda x, y: getattr(x, n)(y))(op))
      for op in ("__lt__", "__le__", "__gt__", "__ge__", "__eq__", "__ne__", "lt", "le", "gt",
                 "ge", "eq", "ne", "__floordiv__", "__mod__", "floor_divide", "remainder")],
    *[(op, "bb", (lambda n: lambda x, y: getattr(x, n)(y))(op))
      for op in ("__and__", "__or__", "logical_and", "logical_or")],
    ("__invert__", "b", lambda b: ~b),
    ("logical_not", "b", lambda b: b.logical_not()),
]


def plugin_join(op: str, operands: str) -> str:
    """typing_rules' verdict for a case as the mypy plugin computes it:
    ``typing_rules.calls.join_call`` with the operands in call order (a view op joins its
    first operand only; a divisor, an index, a mask, a ``where`` condition may not be
    Partial; ``where``'s branches add). The output letter, "untyped", or
    "error: <FORBIDDEN name>"."""
    import typing_rules
    from typing_rules.calls import join_call

    try:
        out = join_call(op, list(operands), "ep")  # type: ignore[arg-type]
    except typing_rules.RuleViolation as e:
        return "error: " + e.rule.name
    return out or "untyped"


def table_join(op: str, operands: str) -> str:
    """``typing_rules.ops.join`` with the op's table linearity alone (every tensor operand
    in the same role; a view op's first operand only): what the plugin did before
    typing_rules.calls, kept to show why operand roles are needed."""
    import typing_rules

    lin = typing_rules.OPS[op]
    if lin == "view":
        operands = operands[:1]
    try:
        out = typing_rules.join(lin, list(operands), "ep")  # type: ignore[arg-type]
    except typing_rules.RuleViolation as e:
        return "error: " + e.rule.name
    return out or "untyped"


def make_operand(kind: str, seed: int) -> Any:
    """A fresh operand of this kind (the same on every rank: values do not matter here)."""
    g = torch.Generator().manual_seed(seed)
    if kind == "f":
        return torch.rand(4, 4, generator=g, dtype=torch.float64) + 0.5
    if kind == "g":
        return torch.rand(2, 4, 4, generator=g, dtype=torch.float64) + 0.5
    if kind == "b":
        return torch.rand(4, 4, generator=g) > 0.5
    if kind == "i":
        return torch.randint(0, 4, (4, 4), generator=g)
    if kind == "j":
        return torch.randint(0, 4, (4,), generator=g)
    if kind == "n":
        return torch.randint(0, 3, (4,), generator=g)
    if kind == "s":
        return 2.0
    raise ValueError(kind)
