"""mypy plugin: placements that follow tensors through torch ops and calls.

Enable it with one line in your mypy config (``plugins = spmd_moe.mypy_plugin``). It

* orders the axes of ``Placed[...]`` canonically, so ``Placed[Var[EP], Rep[DP]]`` and
  ``Placed[Rep[DP], Var[EP]]`` are one type, and rejects an axis named twice;
* infers the placements of torch ops on ``Placed`` tensors (Tensor methods and
  operators, ``torch.*``, ``torch.nn.functional.*``) per axis from ``typing_rules.ops``,
  reporting forbidden combinations (Partial into a non-linear op, Partial x Partial,
  Partial + Replicate, Invariant mixed, ...) with the rule's reason and fix;
* types spmd_moe's collectives by ``typing_rules.RULES``: the input placement on the
  axis of the ``ParallelContext[A]`` argument is checked, the output changes only there;
* checks ``as_rep`` / ``as_var`` / ... : stating a placement on an axis where the tensor
  already has one is an error (they are for untyped tensors);
* lets calls pass axes their callee does not name (R / I / V pass through, P is an
  error), so single-axis layers work inside multi-axis models;
* checks ``module(x)`` against the module's typed ``forward``.

Errors carry the code ``spmd-placement``. What is not checked is listed in
docs/placements.md.
"""

from __future__ import annotations

from collections.abc import Callable

import typing_rules
from mypy.argmap import map_actuals_to_formals
from mypy.errorcodes import ErrorCode
from mypy.nodes import CallExpr, Context, Expression, ListExpr, MypyFile, TupleExpr, TypeInfo
from mypy.plugin import (
    AnalyzeTypeContext,
    AttributeContext,
    CheckerPluginInterface,
    FunctionContext,
    FunctionSigContext,
    MethodContext,
    MethodSigContext,
    Plugin,
    ReportConfigContext,
)
from mypy.typeops import bind_self
from mypy.types import (
    AnyType,
    CallableType,
    FunctionLike,
    Instance,
    LiteralType,
    Overloaded,
    ProperType,
    TupleType,
    Type,
    TypeOfAny,
    UnboundType,
    UnionType,
    get_proper_type,
)
from typing_rules.calls import join_call
from typing_rules.ops import OPS, PAIR_OPS, SEQUENCE_OPS, TUPLE_OPS, RuleViolation, join, through_function

PLACEMENT = ErrorCode("spmd-placement", "SPMD placement rules (spmd_moe)", "General")

_MOD = "spmd_moe.placement"
PLACED = f"{_MOD}.Placed"
_CODE_OF = {f"{_MOD}.Rep": "R", f"{_MOD}.Inv": "I", f"{_MOD}.Var": "V", f"{_MOD}.Par": "P"}
_CLASS_OF = {v: k for k, v in _CODE_OF.items()}
_NAME_OF = {"R": "Replicate", "I": "Invariant", "V": "Varying", "P": "Partial"}
_PCTX = "spmd_moe.parallel.ParallelContext"
_COLLECTIVES = "spmd_moe.collectives."
_STATING = {f"{_MOD}.as_rep": "R", f"{_MOD}.as_inv": "I", f"{_MOD}.as_var": "V", f"{_MOD}.as_par": "P"}
_MODULE = "torch.nn.modules.module.Module"
_TORCH_FUNC_PREFIXES = (
    "torch._C._VariableFunctions.", "torch.nn.functional.", "torch._C._nn.", "torch.functional.",
    "torch._tensor.", "torch._C._special.",
)
# Scalars count as operands only for arithmetic (elsewhere they are dims, sizes, ...).
_SCALAR_OPERAND_OPS = frozenset({
    "__add__", "__radd__", "__sub__", "__rsub__", "__mul__", "__rmul__", "__truediv__",
    "__rtruediv__", "__iadd__", "__isub__", "__imul__", "add", "sub", "mul", "div", "where",
    "__pow__", "pow", "clamp", "clip",
})

# One axis: (axis class Instance, placement letter). A placement: {axis fullname: that}.
Axes = dict[str, tuple[Instance, str]]


# ----------------------------------------------------------------------------- reading types


def placements(t: Type) -> Axes | None:
    """The axes of a ``Placed[...]`` instance, or None for any other type."""
    p = get_proper_type(t)
    if not (isinstance(p, Instance) and p.type.fullname == PLACED):
        return None
    out: Axes = {}
    for a in p.args:
        a = get_proper_type(a)
        if not (isinstance(a, Instance) and a.type.fullname in _CODE_OF and a.args):
            return None
        ax = get_proper_type(a.args[0])
        if not isinstance(ax, Instance):
            return None  # an axis that is Any or a type variable: nothing to infer from
        out[ax.type.fullname] = (ax, _CODE_OF[a.type.fullname])
    return out or None


def _is_tensor(t: Type) -> bool:
    p = get_proper_type(t)
    return isinstance(p, Instance) and p.type.has_base("torch._tensor.Tensor")


def _is_scalar(t: Type) -> bool:
    p = get_proper_type(t)
    if isinstance(p, LiteralType):
        p = p.fallback
    return isinstance(p, Instance) and p.type.fullname in ("builtins.int", "builtins.float", "builtins.bool", "builtins.complex")


def axis_label(ax: Instance) -> str:
    return ax.type.name


def show(axes: Axes) -> str:
    if not axes:
        return "no placement"
    return "Placed[" + ", ".join(
        f"{_CLASS_OF[c].rsplit('.', 1)[1]}[{axis_label(ax)}]" for _, (ax, c) in sorted(axes.items())
    ) + "]"


# ----------------------------------------------------------------------------- making types


def make_placed(template: Instance, axes: Axes) -> Instance:
    """A ``Placed[...]`` with these axes, canonically ordered (by axis fullname)."""
    markers = _markers(template)
    return Instance(template.type, [Instance(markers[code], [ax]) for _, (ax, code) in sorted(axes.items())])


def _markers(template: Instance) -> dict[str, TypeInfo]:
    """Rep / Inv / Var / Par's TypeInfos, from the module that defines ``Placed``. Looked
    up on every use: mypy may reload a module (incremental runs, several runs in one
    process), and a type built from a stale TypeInfo would not equal the fresh one."""
    names = _module_names(template)
    return {code: names[full.rsplit(".", 1)[1]] for full, code in _CODE_OF.items()}


def _module_names(template: Instance) -> dict[str, TypeInfo]:
    out: dict[str, TypeInfo] = {}
    module = _MODULES.get(template.type.module_name)
    if module is not None:
        for name, sym in module.names.items():
            if isinstance(sym.node, TypeInfo):
                out[name] = sym.node
    return out


_MODULES: dict[str, MypyFile] = {}


def _placed_template(api: object) -> Instance | None:
    """``Placed`` (no args) from spmd_moe.placement as currently loaded, or None."""
    modules = getattr(api, "modules", {})
    module = modules.get(_MOD)
    if module is None:
        return None
    _MODULES[_MOD] = module
    placed = module.names.get("Placed")
    if placed is None or not isinstance(placed.node, TypeInfo):
        return None
    return Instance(placed.node, [])


def _with_axes(t: Type, extra: Axes) -> Type:
    """``t`` with ``extra`` axes added to every Placed inside (tuples and unions too)."""
    p = get_proper_type(t)
    own = placements(p)
    if own is not None and isinstance(p, Instance):
        merged = dict(extra)
        merged.update(own)
        return make_placed(p, merged)
    if isinstance(p, TupleType):
        return p.copy_modified(items=[_with_axes(i, extra) for i in p.items])
    if isinstance(p, UnionType):
        return UnionType.make_union([_with_axes(i, extra) for i in p.items], p.line, p.column)
    return t


def _has_placed(t: Type) -> bool:
    p = get_proper_type(t)
    if placements(p) is not None:
        return True
    if isinstance(p, TupleType):
        return any(_has_placed(i) for i in p.items)
    if isinstance(p, UnionType):
        return any(_has_placed(i) for i in p.items)
    return False


def _has_type_vars(t: Type) -> bool:
    from mypy.types import TypeVarType

    p = get_proper_type(t)
    if isinstance(p, TypeVarType):
        return True
    if isinstance(p, Instance):
        return any(_has_type_vars(a) for a in p.args)
    if isinstance(p, (TupleType, UnionType)):
        return any(_has_type_vars(i) for i in p.items)
    return False


def _fail(api: CheckerPluginInterface, msg: str, ctx: Context) -> None:
    api.fail(msg, ctx, code=PLACEMENT)


# ----------------------------------------------------------------------------- the plugin


def _rules_fingerprint() -> str:
    """A hash of this plugin's and typing_rules' source: mypy's cache key includes it
    (report_config_data), so a changed rule re-checks every module instead of reusing
    types inferred under the old one."""
    import hashlib
    import os

    h = hashlib.sha256()
    here = os.path.dirname(os.path.abspath(__file__))
    rules = os.path.dirname(os.path.abspath(typing_rules.__file__))
    for folder, names in ((here, ["mypy_plugin.py"]), (rules, sorted(os.listdir(rules)))):
        for name in names:
            if name.endswith(".py"):
                with open(os.path.join(folder, name), "rb") as f:
                    h.update(name.encode() + f.read())
    return h.hexdigest()


class SpmdPlugin(Plugin):
    _fingerprint = _rules_fingerprint()

    def report_config_data(self, ctx: ReportConfigContext) -> str:
        return self._fingerprint

    def get_type_analyze_hook(self, fullname: str) -> Callable[[AnalyzeTypeContext], Type] | None:
        return _analyze_placed if fullname == PLACED else None

    def get_method_hook(self, fullname: str) -> Callable[[MethodContext], Type] | None:
        if fullname.startswith(PLACED + "."):
            op = fullname[len(PLACED) + 1:]
            if op in OPS or op in PAIR_OPS or op in TUPLE_OPS:
                return lambda ctx: _infer_op(op, ctx, receiver=ctx.type)
        return None

    def get_function_hook(self, fullname: str) -> Callable[[FunctionContext], Type] | None:
        for prefix in _TORCH_FUNC_PREFIXES:
            if fullname.startswith(prefix):
                op = fullname[len(prefix):]
                if op in OPS or op in PAIR_OPS or op in TUPLE_OPS:
                    label = ("F." if prefix == "torch.nn.functional." else "torch.") + op
                    return lambda ctx: _infer_op(op, ctx, receiver=None, label=label)
        return None

    def get_attribute_hook(self, fullname: str) -> Callable[[AttributeContext], Type] | None:
        if fullname.startswith("torch.return_types.") and fullname.rsplit(".", 1)[1] in ("values", "indices"):
            index = 0 if fullname.endswith(".values") else 1
            return lambda ctx: _pair_field(ctx, index)
        return None

    def get_function_signature_hook(self, fullname: str) -> Callable[[FunctionSigContext], FunctionLike] | None:
        if fullname in _STATING:
            return lambda ctx: _stating(ctx, _STATING[fullname])
        if fullname.startswith(_COLLECTIVES):
            name = fullname[len(_COLLECTIVES):]
            if name in typing_rules.COLLECTIVE_FUNCS:
                return lambda ctx: _collective(ctx, name)
        if fullname in _SEQUENCE_FUNCS:
            return _sequence_of_tensors
        return _polymorphic

    def get_method_signature_hook(self, fullname: str) -> Callable[[MethodSigContext], FunctionLike] | None:
        if fullname.endswith(".__call__"):
            return _module_call
        return _polymorphic


def _analyze_placed(ctx: AnalyzeTypeContext) -> Type:
    """``Placed[X[A], ...]`` in an annotation: canonical axis order, one placement per axis."""
    t: UnboundType = ctx.type
    args = [get_proper_type(ctx.api.analyze_type(a)) for a in t.args]
    keyed: dict[str, Instance] = {}
    for a in args:
        if isinstance(a, AnyType):
            return a
        ok = isinstance(a, Instance) and a.type.fullname in _CODE_OF and len(a.args) == 1
        ax = get_proper_type(a.args[0]) if ok and isinstance(a, Instance) else None
        if not ok or not isinstance(a, Instance):
            ctx.api.fail(
                f'Placed[...]: expected Rep[AX] / Inv[AX] / Var[AX] / Par[AX], got "{a}". '
                "Fix: e.g. Placed[Var[EP], Rep[DP]]",
                ctx.context, code=PLACEMENT,
            )
            return AnyType(TypeOfAny.from_error)
        key = ax.type.fullname if isinstance(ax, Instance) else str(ax)
        if key in keyed:
            ctx.api.fail(
                f'Placed[...]: axis "{key.rsplit(".", 1)[-1]}" named twice. Fix: one placement per axis',
                ctx.context, code=PLACEMENT,
            )
            return AnyType(TypeOfAny.from_error)
        keyed[key] = a
    return ctx.api.named_type(PLACED, [keyed[k] for k in sorted(keyed)])


# ----------------------------------------------------------------------------- torch ops


def _operand_axes(t: Type, op: str) -> list[Axes | str] | None:
    """The placement operands a value contributes: a Placed tensor's axes, "S" for an
    untyped tensor or an arithmetic scalar; None if it is no operand (a dim, a dtype)."""
    p = get_proper_type(t)
    axes = placements(p)
    if axes is not None:
        return [axes]
    if _is_tensor(p):
        return ["S"]
    if _is_scalar(p) and op in _SCALAR_OPERAND_OPS:
        return ["S"]
    if isinstance(p, UnionType):  # Tensor | None, Placed | float, ...
        found: list[Axes | str] = []
        for item in p.items:
            sub = _operand_axes(item, op)
            if sub:
                found.extend(x for x in sub if x != "S" or not found)
        return found or None
    return None


def _sequence_items(ctx: FunctionContext | MethodContext) -> list[Type]:
    """The element types of a cat/stack's first argument, item by item when written
    as a list/tuple display (mypy's join of mixed Placed types would lose them)."""
    out: list[Type] = []
    for group in ctx.args[:1]:
        for expr in group:
            if isinstance(expr, (ListExpr, TupleExpr)):
                out.extend(ctx.api.get_expression_type(e) for e in expr.items)
            else:
                t = get_proper_type(ctx.api.get_expression_type(expr))
                if isinstance(t, TupleType):
                    out.extend(t.items)
                elif isinstance(t, Instance) and t.args:
                    out.append(t.args[0])
    return out


def _infer_op(op: str, ctx: FunctionContext | MethodContext, receiver: Type | None, label: str = "") -> Type:
    default = get_proper_type(ctx.default_return_type)
    operands: list[Axes | str] = []
    if receiver is not None:
        operands += _operand_axes(receiver, op) or []
    if op in SEQUENCE_OPS and receiver is None:
        for item in _sequence_items(ctx):
            operands += _operand_axes(item, op) or []
        rest = ctx.arg_types[1:]
    else:
        rest = ctx.arg_types
    for group in rest:
        for t in group:
            operands += _operand_axes(t, op) or []
    linearity = OPS.get(op, "view")
    if linearity == "view":
        operands = operands[:1]  # other tensors only lend a shape or a dtype
    placed = [o for o in operands if isinstance(o, dict)]
    if not placed:
        return ctx.default_return_type
    all_axes: dict[str, Instance] = {}
    for o in placed:
        for k, (ax, _) in o.items():
            all_axes[k] = ax
    out: Axes = {}
    for k in sorted(all_axes):
        # In call order: typing_rules.calls gives some positions roles (a divisor, an index).
        letters = [o[k][1] if isinstance(o, dict) and k in o else "S" for o in operands]
        try:
            if op in OPS:
                code = join_call(op, letters, axis_label(all_axes[k]), op)  # type: ignore[arg-type]
            else:  # chunk / split: pieces of one tensor
                code = join("view", letters[:1], axis_label(all_axes[k]), op)  # type: ignore[arg-type]
        except RuleViolation as e:
            _fail(ctx.api, f'{label or "Tensor." + op}: {e}', ctx.context)
            return AnyType(TypeOfAny.from_error)
        if code is not None:
            out[k] = (all_axes[k], code)
    template = _placed_template(ctx.api)
    if template is None or not out:
        return ctx.default_return_type
    result = make_placed(template, out)
    if op in PAIR_OPS and isinstance(default, TupleType):
        return default.copy_modified(items=[result for _ in default.items])
    if op in TUPLE_OPS:
        if isinstance(default, TupleType):
            return default.copy_modified(items=[result for _ in default.items])
        if isinstance(default, Instance) and default.type.fullname == "builtins.tuple":
            return default.copy_modified(args=[result])
        return ctx.default_return_type
    if _is_tensor(default):
        return result
    return ctx.default_return_type


def _pair_field(ctx: AttributeContext, index: int) -> Type:
    t = get_proper_type(ctx.type)
    if isinstance(t, TupleType) and len(t.items) > index and placements(t.items[index]) is not None:
        return t.items[index]
    return ctx.default_attr_type


# ----------------------------------------------------------------------------- calls


def _actual_types(ctx: FunctionSigContext | MethodSigContext, formal: int) -> list[ProperType]:
    return [get_proper_type(ctx.api.get_expression_type(e)) for e in ctx.args[formal]]


def _pctx_axis(t: ProperType) -> Instance | None:
    """The axis class of a ``ParallelContext[A]`` type."""
    if isinstance(t, Instance) and t.type.has_base(_PCTX) and t.args:
        for base in [t] + [b for b in t.type.bases]:
            if base.type.fullname == _PCTX and base.args:
                ax = get_proper_type(base.args[0])
                if isinstance(ax, Instance):
                    return ax
    return None


def _collective(ctx: FunctionSigContext, name: str) -> FunctionLike:
    """A collective of spmd_moe.collectives: input placement checked on the axis of its
    ParallelContext argument, output changed there only, other axes kept."""
    sig = ctx.default_signature
    rule = typing_rules.COLLECTIVE_FUNCS[name]
    names = list(sig.arg_names)
    if "pctx" not in names or not ctx.args or not ctx.args[0]:
        return sig
    _check_declared(ctx, name, rule)
    xs = _actual_types(ctx, 0)
    pctx_types = _actual_types(ctx, names.index("pctx"))
    if len(xs) != 1 or len(pctx_types) != 1:
        return sig
    x, axis = xs[0], _pctx_axis(pctx_types[0])
    axes = placements(x)
    template = _placed_template(ctx.api)
    if axes is None or axis is None or template is None:
        return sig  # untyped x or an untyped context: mypy's own check applies
    key = axis.type.fullname
    want = rule.inputs[0][1]
    have = axes[key][1] if key in axes else None
    if have != want:
        got = f"{_NAME_OF[have]} on {axis_label(axis)}" if have else f"no placement on {axis_label(axis)}"
        forbidden = dict(rule.forbidden)
        why = rule.why if have in forbidden.values() else typing_rules.ops.FORBIDDEN["collective_input"].why
        _fail(
            ctx.api,
            f'{name}({names[0]}) on axis {axis_label(axis)}: expected {_NAME_OF[want]} '
            f'({want}), got {got} ({show(axes)}): {why}. Fix: '
            + ((typing_rules.fix(want, have) if have else None) or f"make it {_NAME_OF[want]} on {axis_label(axis)} first, or use the collective for its placement")
            + (" (a collective on the wrong axis?)" if have is None else ""),
            ctx.context,
        )
    out = dict(axes)
    out[key] = (axis, rule.output)
    arg_types = list(sig.arg_types)
    arg_types[0] = x
    return sig.copy_modified(arg_types=arg_types, ret_type=make_placed(template, out))


_SEQUENCE_FUNCS = frozenset(f"torch._C._VariableFunctions.{op}" for op in SEQUENCE_OPS)


def _sequence_of_tensors(ctx: FunctionSigContext) -> FunctionLike:
    """torch.cat / torch.stack take any sequence of tensors (a list[Placed[...]] variable
    included: torch's stub says list[Tensor], which list invariance would reject)."""
    sig = ctx.default_signature
    tensor = _placed_template(ctx.api)
    if tensor is None or not sig.arg_types:
        return sig
    tensor_t = tensor.type.bases[0] if tensor.type.bases else None
    if tensor_t is None:
        return sig
    seq = ctx.api.named_generic_type("typing.Sequence", [tensor_t])
    return sig.copy_modified(arg_types=[seq, *sig.arg_types[1:]])


def _declared_letter(t: Type) -> str | None:
    """The letter of a one-axis ``Placed[X[A]]`` annotation (A a type variable)."""
    p = get_proper_type(t)
    if isinstance(p, Instance) and p.type.fullname == PLACED and len(p.args) == 1:
        marker = get_proper_type(p.args[0])
        if isinstance(marker, Instance):
            return _CODE_OF.get(marker.type.fullname)
    return None


def _check_declared(ctx: FunctionSigContext, name: str, rule: typing_rules.OpRule) -> None:
    """A collective's own annotation must say what its typing_rules rule says (the plugin
    types calls from the rule, so a drifted annotation would otherwise go unnoticed)."""
    sig = ctx.default_signature
    declared = (_declared_letter(sig.arg_types[0]), _declared_letter(sig.ret_type))
    ruled = (rule.inputs[0][1], rule.output)
    if declared != ruled:
        _fail(
            ctx.api,
            f"spmd_moe.collectives.{name} is annotated {declared[0]} -> {declared[1]} but "
            f"typing_rules says {ruled[0]} -> {ruled[1]} ({rule.name}). Fix: make the "
            "annotation and the rule agree",
            ctx.context,
        )


def _stating(ctx: FunctionSigContext, code: str) -> FunctionLike:
    """as_rep / as_inv / as_var / as_par: add an axis to an untyped (or other-axis) tensor."""
    sig = ctx.default_signature
    names = list(sig.arg_names)
    if not ctx.args or not ctx.args[0] or "pctx" not in names or not ctx.args[names.index("pctx")]:
        return sig
    (t,) = _actual_types(ctx, 0)[:1]
    (pc,) = _actual_types(ctx, names.index("pctx"))[:1]
    axis = _pctx_axis(pc)
    template = _placed_template(ctx.api)
    if axis is None or template is None:
        return sig
    axes = placements(t) or {}
    key = axis.type.fullname
    if key in axes:
        rule = typing_rules.ops.FORBIDDEN["restate"]
        _fail(
            ctx.api,
            f"as_{ {'R': 'rep', 'I': 'inv', 'V': 'var', 'P': 'par'}[code]}: the tensor is already "
            f"{_NAME_OF[axes[key][1]]} on axis {axis_label(axis)} ({show(axes)}): {rule.why}. "
            f"Fix: {rule.fix}",
            ctx.context,
        )
    out = dict(axes)
    out[key] = (axis, code)
    arg_types = list(sig.arg_types)
    arg_types[0] = t
    return sig.copy_modified(arg_types=arg_types, ret_type=make_placed(template, out))


def _extend_unnamed_axes(
    sig: CallableType, formal_args: list[list[Expression]], api: CheckerPluginInterface, context: Context, what: str
) -> CallableType:
    """Axes the callee's Placed parameters do not name pass through the call: R/I/V are
    kept (joined over the arguments) and added to every Placed in the return type; P on
    such an axis is an error. Parameters with type variables are left to mypy."""
    if _placed_template(api) is None:
        return sig
    extras: dict[str, list[tuple[Instance, str]]] = {}
    arg_types = list(sig.arg_types)
    changed = False
    for i, formal in enumerate(sig.arg_types):
        fp = get_proper_type(formal)
        if i >= len(formal_args) or _has_type_vars(fp):
            continue
        named = placements(fp)
        if named is None and isinstance(fp, UnionType):
            for item in fp.items:
                named = placements(item)
                if named is not None:
                    break
        if named is None:
            continue
        for e in formal_args[i]:
            actual = placements(api.get_expression_type(e))
            if not actual:
                continue
            extra = {k: v for k, v in actual.items() if k not in named}
            for k, v in extra.items():
                extras.setdefault(k, []).append(v)
            if extra and len(formal_args[i]) == 1:
                arg_types[i] = _with_axes(formal, extra)
                changed = True
    if not changed:
        return sig
    joined: Axes = {}
    for k, vs in extras.items():
        ax = vs[0][0]
        try:
            joined[k] = (ax, through_function([c for _, c in vs], axis_label(ax), what))
        except RuleViolation as e:
            _fail(api, f"{what}: {e}", context)
            return sig.copy_modified(arg_types=arg_types, ret_type=AnyType(TypeOfAny.from_error))
    return sig.copy_modified(arg_types=arg_types, ret_type=_with_axes(sig.ret_type, joined))


def _sig_has_placed(sig: CallableType) -> bool:
    return any(_has_placed(t) for t in sig.arg_types)


def _polymorphic(ctx: FunctionSigContext | MethodSigContext) -> FunctionLike:
    sig = ctx.default_signature
    if not _sig_has_placed(sig):
        return sig
    return _extend_unnamed_axes(sig, ctx.args, ctx.api, ctx.context, sig.name or "call")


def _module_call(ctx: MethodSigContext) -> FunctionLike:
    """``module(x)``: an nn.Module subclass with a typed forward is called as its forward."""
    obj = get_proper_type(ctx.type)
    sig = ctx.default_signature
    if not (isinstance(obj, Instance) and obj.type.has_base(_MODULE)):
        return _polymorphic(ctx)
    fwd = _bound_forward(obj)
    if fwd is None:
        return sig
    call = ctx.context
    if not isinstance(call, CallExpr):
        return fwd
    items: list[CallableType] = list(fwd.items) if isinstance(fwd, Overloaded) else [fwd]
    out: list[CallableType] = []
    for item in items:
        mapping = map_actuals_to_formals(
            call.arg_kinds, call.arg_names, item.arg_kinds, item.arg_names,
            lambda i: ctx.api.get_expression_type(call.args[i]),
        )
        formal_args = [[call.args[j] for j in actuals] for actuals in mapping]
        out.append(_extend_unnamed_axes(item, formal_args, ctx.api, call, f"{obj.type.name}.forward"))
    return out[0] if len(out) == 1 else Overloaded(out)


def _bound_forward(obj: Instance) -> CallableType | Overloaded | None:
    """The class's own typed ``forward`` bound to ``obj`` (None if only Module's)."""
    from mypy.expandtype import expand_type_by_instance
    from mypy.nodes import Decorator, FuncDef, OverloadedFuncDef

    for base in obj.type.mro:
        if base.fullname == _MODULE:
            return None
        node = base.names.get("forward")
        if node is None:
            continue
        n = node.node
        if isinstance(n, Decorator):
            n = n.func
        t = n.type if isinstance(n, (FuncDef, OverloadedFuncDef)) else None
        t = get_proper_type(t) if t is not None else None
        if not isinstance(t, (CallableType, Overloaded)):
            return None
        from mypy.maptype import map_instance_to_supertype

        inst = map_instance_to_supertype(obj, base)
        if isinstance(t, Overloaded):
            # Overloads on the self type (MoE[Replicated], ...): keep the ones obj matches.
            items = [i for i in t.items if not i.arg_types or _self_matches(obj, i)]
            if not items:
                return None
            t = items[0] if len(items) == 1 else Overloaded(items)
        bound = bind_self(t, obj)
        expanded = get_proper_type(expand_type_by_instance(bound, inst))
        return expanded if isinstance(expanded, (CallableType, Overloaded)) else None
    return None


def _self_matches(obj: Instance, item: CallableType) -> bool:
    from mypy.subtypes import is_subtype

    self_t = get_proper_type(item.arg_types[0])
    if isinstance(self_t, Instance):
        return is_subtype(obj, self_t)
    return True  # an unannotated or type-variable self matches anything


def plugin(version: str) -> type[Plugin]:
    return SpmdPlugin


__all__ = ["PLACEMENT", "SpmdPlugin", "placements", "plugin"]
