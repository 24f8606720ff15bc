"""Mutation testing of spmd_moe's placements: ``python -m tests.mutate``.

Mutants are generated automatically from the AST of ``spmd_moe/`` (no hand list):

* ``drop``    each call of a collective of ``spmd_moe.collectives`` replaced by its
              tensor argument;
* ``swap``    each such call swapped for every other collective with a compatible call
              shape (``(x, pctx)``; ``all_to_all``'s split arguments dropped when it is
              swapped for a two-argument collective);
* ``axis``    each collective / ``as_*`` call moved to another ParallelContext in scope
              (only where a function has more than one; on the library and on the
              two-axis example files given with ``--example``);
* ``state``   each stated placement flipped: ``as_rep`` <-> ``as_inv`` <-> ``as_var``
              <-> ``as_par`` and the type argument of ``unchecked_cast(Placed[...], ...)``;
* ``sig``     each placement letter in a ``Placed[...]`` annotation of a function
              signature (parameters and return) flipped to each other letter;
* ``input``   each typed entry point (every method of a spmd_moe class with a
              ``Placed`` parameter: the layer per layout, the router, the dispatchers,
              the experts) fed each wrong placement: statically a generated user snippet
              passing a tensor of that type, at runtime plain tensors realising it
              (different tokens per rank for V, the same tokens on every rank for R,
              tracked I / P tensors for I / P) with debug mode on.

Source mutants are applied to a copy of the repo (one per worker under
``/tmp/mutants/w<i>``, with a warm ``.mypy_cache``), never in place. Each is

* killed statically if mypy (the repo's ``mypy.ini``, with its plugin) reports an error
  the unmutated baseline does not (multiset of (file, message), line numbers ignored);
* killed at runtime if the debug-mode driver (``--drive layer``: every layout x
  dispatcher, training forward+backward and no_grad in debug mode, plus a debug-off
  forward and a batch-invariant pass, on real gloo groups of world 2 and 4, against the
  single-process layer) raises, crashes, hangs (timeout) or gives a wrong output,
  gradient or global expert count in a case that passes on the baseline.

``--fast`` runs a small deterministic subset (tests/test_mutate.py runs it in CI).
"""

from __future__ import annotations

import argparse
import ast
import collections
import concurrent.futures
import configparser
import datetime
import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COLLECTIVES = (
    "split_tokens", "all_gather", "reduce_scatter", "all_reduce", "all_to_all",
    "partial_from_shards", "rank_view", "invariant_to_replicate", "replicate_to_invariant",
)
ARITY = {c: (4 if c == "all_to_all" else 2) for c in COLLECTIVES}
STATE_FNS = ("as_rep", "as_inv", "as_var", "as_par")
LETTERS = ("Rep", "Inv", "Var", "Par")
CODE = {"Rep": "R", "Inv": "I", "Var": "V", "Par": "P"}
COPY = ("spmd_moe", "typing_rules", "tests", "examples", "docs", "mypy.ini", "pyproject.toml")
SKIP_FILES = ("spmd_moe/mypy_plugin.py",)  # the checker itself is not a mutation target
WORK = os.environ.get("SPMD_MOE_MUTANTS", "/tmp/mutants")
PY = sys.executable
_ERR = re.compile(r"^(?P<path>[^:]+\.py):(?P<line>\d+)(?::\d+)?: error: (?P<msg>.*)$")


# ============================================================================ mutants


@dataclass
class Mutant:
    id: str
    category: str
    file: str
    line: int
    desc: str
    # source mutants: byte-offset edits of `file`; input mutants: `spec`
    edits: list[tuple[int, int, str]] = field(default_factory=list)
    spec: dict[str, Any] = field(default_factory=dict)
    func: str = ""
    # results
    static: bool | None = None
    static_errors: list[str] = field(default_factory=list)
    runtime: bool | None = None
    runtime_reason: str = ""
    equivalent: str = ""

    @property
    def killed(self) -> bool:
        return bool(self.static) or bool(self.runtime)


class _Src:
    """A file's bytes with (line, col) <-> byte offset (ast columns are utf-8 bytes)."""

    def __init__(self, rel: str, root: str) -> None:
        self.rel = rel
        with open(os.path.join(root, rel), "rb") as f:
            self.data = f.read()
        self.starts = [0]
        for i, b in enumerate(self.data):
            if b == 10:
                self.starts.append(i + 1)
        self.tree = ast.parse(self.data, rel)

    def off(self, line: int, col: int) -> int:
        return self.starts[line - 1] + col

    def span(self, node: ast.AST) -> tuple[int, int]:
        return (self.off(node.lineno, node.col_offset),  # type: ignore[attr-defined]
                self.off(node.end_lineno, node.end_col_offset))  # type: ignore[attr-defined]

    def text(self, node: ast.AST) -> str:
        a, b = self.span(node)
        return self.data[a:b].decode()


def _keep_lines(old: str, new: str) -> str:
    """Pad `new` (a parenthesised expression) with newlines so line numbers stay put."""
    k = old.count("\n") - new.count("\n")
    if k > 0 and new.endswith(")"):
        return new[:-1] + "\n" * k + ")"
    return new


def _aliases(tree: ast.Module) -> tuple[set[str], dict[str, str]]:
    """Names bound to the collectives module, and names imported from it (local -> real)."""
    mods: set[str] = set()
    funcs: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module == "spmd_moe":
            for a in node.names:
                if a.name == "collectives":
                    mods.add(a.asname or a.name)
        elif isinstance(node, ast.ImportFrom) and node.module == "spmd_moe.collectives":
            for a in node.names:
                if a.name in COLLECTIVES:
                    funcs[a.asname or a.name] = a.name
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name == "spmd_moe.collectives" and a.asname:
                    mods.add(a.asname)
    return mods, funcs


def _collective_of(call: ast.Call, mods: set[str], funcs: dict[str, str]) -> str | None:
    f = call.func
    if isinstance(f, ast.Attribute) and f.attr in COLLECTIVES and isinstance(f.value, ast.Name) and f.value.id in mods:
        return f.attr
    if isinstance(f, ast.Name) and f.id in funcs:
        return funcs[f.id]
    return None


def _state_of(call: ast.Call) -> str | None:
    f = call.func
    name = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else None
    return name if name in STATE_FNS else None


def _pctx_arg(call: ast.Call, pos: int) -> ast.expr | None:
    for kw in call.keywords:
        if kw.arg == "pctx":
            return kw.value
    return call.args[pos] if len(call.args) > pos else None


def _placed_letters(ann: ast.expr) -> list[ast.Name]:
    """The Rep/Inv/Var/Par names inside every Placed[...] of an annotation."""
    out: list[ast.Name] = []
    for node in ast.walk(ann):
        if isinstance(node, ast.Subscript) and isinstance(node.value, ast.Name) and node.value.id == "Placed":
            elts = node.slice.elts if isinstance(node.slice, ast.Tuple) else [node.slice]
            for e in elts:
                if isinstance(e, ast.Subscript) and isinstance(e.value, ast.Name) and e.value.id in LETTERS:
                    out.append(e.value)
    return out


def _funcs(tree: ast.Module) -> list[tuple[ast.FunctionDef | ast.AsyncFunctionDef, str | None]]:
    out: list[tuple[ast.FunctionDef | ast.AsyncFunctionDef, str | None]] = []

    def visit(node: ast.AST, cls: str | None) -> None:
        for ch in ast.iter_child_nodes(node):
            if isinstance(ch, ast.ClassDef):
                visit(ch, ch.name)
            elif isinstance(ch, (ast.FunctionDef, ast.AsyncFunctionDef)):
                out.append((ch, cls))
                visit(ch, cls)
            else:
                visit(ch, cls)

    visit(tree, None)
    return out


def _own_calls(fn: ast.AST) -> list[ast.Call]:
    """Calls in fn's body, not in nested defs (lambdas count as the function's)."""
    out: list[ast.Call] = []

    def visit(node: ast.AST) -> None:
        for ch in ast.iter_child_nodes(node):
            if isinstance(ch, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                continue
            if isinstance(ch, ast.Call):
                out.append(ch)
            visit(ch)

    for stmt in fn.body:  # type: ignore[attr-defined]
        if isinstance(stmt, ast.Call):
            out.append(stmt)
        visit(stmt)
    return out


def _bound_names(tree: ast.Module) -> set[str]:
    """Names a module binds at top level (imports anywhere at top level, defs, classes)."""
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            for a in node.names:
                out.add((a.asname or a.name).split(".")[0])
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef)):
            out.add(node.name)
    return out


def _importing(muts: list[Mutant], src: _Src, bound: set[str]) -> None:
    """A mutant that writes a placement name the module does not import gets the import
    (at the end of the file, so no line moves): a NameError is not a placement kill."""
    if src.rel.endswith("spmd_moe/placement.py") or src.rel == "spmd_moe/placement.py":
        return
    for m in muts:
        names = {new for _, _, new in m.edits if new in LETTERS or new in STATE_FNS}
        names |= {new.rsplit(".", 1)[-1] for _, _, new in m.edits if new.rsplit(".", 1)[-1] in STATE_FNS and "." not in new}
        missing = sorted(n for n in names if n not in bound)
        if missing:
            imp = ", ".join(f"{n} as {n}" for n in missing)
            end = len(src.data)
            sep = "" if src.data.endswith(b"\n") else "\n"
            m.edits.append((end, end, f"{sep}from spmd_moe.placement import {imp}  # added by the mutant\n"))


def source_mutants(root: str, files: list[str], only_axis: tuple[str, ...] = ()) -> list[Mutant]:
    muts: list[Mutant] = []
    for rel in files:
        src = _Src(rel, root)
        bound = _bound_names(src.tree)
        first = len(muts)
        mods, funcs = _aliases(src.tree)
        seen_calls: set[int] = set()
        for fn, cls in _funcs(src.tree):
            n_before = len(muts)
            calls = _own_calls(fn)
            # ParallelContexts in scope: parameters typed ParallelContext, and every
            # expression passed as the axis of a collective / as_* in this function.
            ctxs: list[str] = []
            for a in fn.args.args + fn.args.kwonlyargs:
                if a.annotation is not None and "ParallelContext" in src.text(a.annotation):
                    ctxs.append(a.arg)
            for c in calls:
                coll, st = _collective_of(c, mods, funcs), _state_of(c)
                arg = _pctx_arg(c, 1) if (coll or st) else None
                if arg is not None and src.text(arg) not in ctxs:
                    ctxs.append(src.text(arg))
            for c in calls:
                if id(c) in seen_calls:
                    continue
                seen_calls.add(id(c))
                a, b = src.span(c)
                old = src.data[a:b].decode()
                where = f"{rel}:{c.lineno}"
                coll = _collective_of(c, mods, funcs)
                st = _state_of(c)
                if coll and c.args:
                    x = src.text(c.args[0])
                    muts.append(Mutant("", "drop", rel, c.lineno, f"{coll}({x}, ...) -> {x}",
                                       [(a, b, _keep_lines(old, f"({x})"))]))
                    fa, fb = src.span(c.func)
                    ftext = src.text(c.func)
                    for other in COLLECTIVES:
                        if other == coll:
                            continue
                        new_f = ftext[: -len(coll)] + other if ftext.endswith(coll) else other
                        if ARITY[other] == ARITY[coll]:
                            muts.append(Mutant("", "swap", rel, c.lineno, f"{coll} -> {other}", [(fa, fb, new_f)]))
                        elif ARITY[other] == 2 and len(c.args) >= 2:
                            new = f"{new_f}({x}, {src.text(c.args[1])})"
                            muts.append(Mutant("", "swap", rel, c.lineno, f"{coll} -> {other} (splits dropped)",
                                               [(a, b, _keep_lines(old, new))]))
                if (coll or st) and len(ctxs) > 1:
                    arg = _pctx_arg(c, 1)
                    if arg is not None:
                        pa, pb = src.span(arg)
                        for other_ctx in ctxs:
                            if other_ctx != src.text(arg):
                                muts.append(Mutant("", "axis", rel, c.lineno,
                                                   f"{coll or st}(..., {src.text(arg)}) -> axis {other_ctx}",
                                                   [(pa, pb, other_ctx)]))
                if st:
                    fa, fb = src.span(c.func)
                    ftext = src.text(c.func)
                    for other in STATE_FNS:
                        if other != st:
                            muts.append(Mutant("", "state", rel, c.lineno, f"{st} -> {other}",
                                               [(fa, fb, ftext[: -len(st)] + other)]))
                f = c.func
                if (isinstance(f, ast.Name) and f.id == "unchecked_cast") or (
                    isinstance(f, ast.Attribute) and f.attr == "unchecked_cast"
                ):
                    if c.args:
                        for nm in _placed_letters(c.args[0]):
                            na, nb = src.span(nm)
                            for other in LETTERS:
                                if other != nm.id:
                                    muts.append(Mutant("", "state", rel, nm.lineno,
                                                       f"unchecked_cast({src.text(c.args[0])}): {nm.id} -> {other}",
                                                       [(na, nb, other)]))
            # signature letters
            anns: list[tuple[str, ast.expr]] = []
            allargs = fn.args.posonlyargs + fn.args.args + fn.args.kwonlyargs
            allargs += [x for x in (fn.args.vararg, fn.args.kwarg) if x is not None]
            for a in allargs:
                if a.annotation is not None:
                    anns.append((a.arg, a.annotation))
            if fn.returns is not None:
                anns.append(("return", fn.returns))
            qual = f"{cls}.{fn.name}" if cls else fn.name
            for pname, ann in anns:
                letters = _placed_letters(ann)
                for j, nm in enumerate(letters):
                    na, nb = src.span(nm)
                    at = f"{pname}#{j}" if len(letters) > 1 else pname
                    for other in LETTERS:
                        if other != nm.id:
                            muts.append(Mutant("", "sig", rel, nm.lineno,
                                               f"{qual}({at}): {nm.id} -> {other}", [(na, nb, other)]))
            for m in muts[n_before:]:
                m.func = qual
        if rel in only_axis:  # a user example: only its axis mutants (c)
            muts[first:] = [m for m in muts[first:] if m.category == "axis"]
        _importing(muts[first:], src, bound)
    return muts


# ------------------------------------------------------------------ input mutants

LAYOUT_LETTER = {"replicated": "R", "invariant": "I", "sequence": "V"}


def _module_of(rel: str) -> str:
    return rel[:-3].replace("/", ".").removesuffix(".__init__")


def entry_points(root: str) -> list[dict[str, Any]]:
    """Methods of spmd_moe classes with a Placed-typed parameter (AST): the layer's
    public entry points and what each expects on the expert axis."""
    out: list[dict[str, Any]] = []
    for rel in _lib_files(root):
        src = _Src(rel, root)
        top_names = set()
        imports: list[str] = []
        for node in src.tree.body:
            if isinstance(node, (ast.Import, ast.ImportFrom)) and not (isinstance(node, ast.ImportFrom) and node.level):
                imports.append(src.text(node))
            elif isinstance(node, (ast.ClassDef, ast.FunctionDef)):
                top_names.add(node.name)
            elif isinstance(node, (ast.Assign, ast.AnnAssign)):
                for t in node.targets if isinstance(node, ast.Assign) else [node.target]:
                    if isinstance(t, ast.Name):
                        top_names.add(t.id)
        for cls in [n for n in src.tree.body if isinstance(n, ast.ClassDef)]:
            for fn in [n for n in cls.body if isinstance(n, ast.FunctionDef)]:
                if fn.name.startswith("_") and fn.name != "__call__":
                    continue
                params = []
                for a in fn.args.args[1:] + fn.args.kwonlyargs:
                    ann = src.text(a.annotation) if a.annotation is not None else None
                    letters = _placed_letters(a.annotation) if a.annotation is not None else []
                    params.append({"name": a.arg, "ann": ann, "letters": [l.id for l in letters],
                                   "kwonly": a in fn.args.kwonlyargs})
                if not any(p["letters"] for p in params):
                    continue
                self_ann = fn.args.args[0].annotation if fn.args.args else None
                used = {n.id for p in fn.args.args + fn.args.kwonlyargs if p.annotation is not None
                        for n in ast.walk(p.annotation) if isinstance(n, ast.Name)}
                out.append({
                    "file": rel, "line": fn.lineno, "module": _module_of(rel), "cls": cls.name,
                    "self_ann": src.text(self_ann) if self_ann is not None else cls.name,
                    "method": fn.name, "params": params, "imports": imports,
                    "local_names": sorted((used | {cls.name}) & top_names),
                    "defaults": len(fn.args.defaults),
                })
    return out


def input_mutants(root: str, layouts: list[str]) -> list[Mutant]:
    muts: list[Mutant] = []
    for ep in entry_points(root):
        for p in ep["params"]:
            if len(p["letters"]) != 1:
                continue  # multi-axis parameter: flipped one axis at a time below
            have = p["letters"][0]
            lay = None
            if ep["cls"] == "MoE":
                # the layout: MoE[Replicated]-style self type, or a forward_<layout> method
                mk = re.search(r"MoE\[(\w+)\]", ep["self_ann"])
                lay = mk.group(1).lower() if mk else ep["method"].removeprefix("forward_")
                if lay not in layouts:
                    continue
            for wrong in LETTERS:
                if wrong == have:
                    continue
                name = f"{ep['self_ann']}.{ep['method']}" + (f"[layout {lay!r}]" if lay else "")
                muts.append(Mutant(
                    "", "input", ep["file"], ep["line"],
                    f"{name}({p['name']}) fed {wrong} (expects {have})",
                    func=f"{ep['cls']}.{ep['method']}",
                    spec={"ep": ep, "param": p["name"], "wrong": wrong, "have": have, "layout": lay},
                ))
    return muts


def _snippet(ep: dict[str, Any], param: str | None, wrong: str | None) -> str:
    """A user function calling the entry point; `param` re-typed with `wrong`."""
    lines = ["from __future__ import annotations", *ep["imports"]]
    lines.append(f"from {ep['module']} import {', '.join(ep['local_names'])}")
    lines.append("from spmd_moe.placement import EP, DP, Inv, Par, Placed, Rep, Var")
    sig, call = [f"m: {ep['self_ann']}"], []
    for p in ep["params"]:
        ann = p["ann"] or "object"
        if p["name"] == param and wrong is not None:
            ann = re.sub(r"\b(Rep|Inv|Var|Par)\[", f"{wrong}[", ann, count=1)
        sig.append(f"{p['name']}: {ann}")
        call.append(f"{p['name']}={p['name']}" if p["kwonly"] else p["name"])
    fn = "m" if ep["method"] in ("forward", "__call__") else f"m.{ep['method']}"
    lines.append(f"def user_code({', '.join(sig)}) -> None:")
    lines.append(f"    {fn}({', '.join(call)})")
    return "\n".join(lines) + "\n"


def _lib_files(root: str) -> list[str]:
    out = []
    for d, _, fs in os.walk(os.path.join(root, "spmd_moe")):
        for f in fs:
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(d, f), root)
                if rel not in SKIP_FILES:
                    out.append(rel)
    return sorted(out)


def generate(root: str, examples: list[str], layouts: list[str]) -> list[Mutant]:
    muts = source_mutants(root, _lib_files(root) + examples, tuple(examples))
    muts += input_mutants(root, layouts)
    seen: dict[str, int] = {}
    for m in muts:
        base = f"{m.category}:{m.file}:{m.func or '-'}:{hashlib.sha1(m.desc.encode()).hexdigest()[:6]}"
        seen[base] = seen.get(base, 0) + 1
        m.id = base if seen[base] == 1 else f"{base}.{seen[base]}"
    return muts


# The layer's data path: what the runtime driver runs (the fast subset is drawn from it).
NOT_CORE = ("spmd_moe/integrations/", "spmd_moe/apps/", "spmd_moe/checkpoint.py")


def fast_subset(muts: list[Mutant], per_cat: int = 3) -> list[Mutant]:
    """A deterministic few per category from the layer's data path, spread over files
    (ordered by a hash of the mutant id: file, function and mutation, no line numbers)."""
    out: list[Mutant] = []
    by_cat: dict[str, list[Mutant]] = collections.defaultdict(list)
    for m in muts:
        if not m.file.startswith(NOT_CORE):
            by_cat[m.category].append(m)
    for cat in sorted(by_cat):
        ms = sorted(by_cat[cat], key=lambda m: hashlib.sha1(m.id.encode()).hexdigest())
        files: set[str] = set()
        pick: list[Mutant] = []
        for m in ms:  # first pass: distinct files
            if len(pick) < per_cat and m.file not in files:
                pick.append(m)
                files.add(m.file)
        for m in ms:
            if len(pick) < per_cat and m not in pick:
                pick.append(m)
        out += pick
    return out


# ============================================================================ workspaces


class Workspace:
    """A copy of the repo under WORK/<name>; mutants are applied and reverted in it."""

    def __init__(self, name: str, examples: list[str], mypy_cache: bool = True) -> None:
        self.path = os.path.join(WORK, name)
        self.examples = examples
        if os.path.exists(self.path):
            shutil.rmtree(self.path)
        os.makedirs(self.path)
        for item in COPY:
            s = os.path.join(REPO, item)
            if os.path.isdir(s):
                shutil.copytree(s, os.path.join(self.path, item), symlinks=True,
                                ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
            elif os.path.exists(s):
                shutil.copy2(s, os.path.join(self.path, item))
        cache = os.path.join(REPO, ".mypy_cache")
        if mypy_cache and os.path.isdir(cache):
            shutil.copytree(cache, os.path.join(self.path, ".mypy_cache"))
        self._orig: dict[str, bytes] = {}

    _stamp = [1_500_000_000]
    _stamp_lock = threading.Lock()

    def _write(self, p: str, data: bytes) -> None:
        # A fresh whole-second mtime per write: mypy trusts (mtime, size) and a flipped
        # letter keeps the size.
        with open(p, "wb") as f:
            f.write(data)
        with Workspace._stamp_lock:
            Workspace._stamp[0] += 1
            t = Workspace._stamp[0]
        os.utime(p, (t, t))

    def apply(self, m: Mutant) -> None:
        assert m.edits, f"mutant {m.id} has no edits"
        p = os.path.join(self.path, m.file)
        with open(p, "rb") as f:
            data = f.read()
        self._orig[p] = data
        for a, b, new in sorted(m.edits, reverse=True):
            data = data[:a] + new.encode() + data[b:]
        self._write(p, data)

    def restore(self) -> None:
        for p, data in self._orig.items():
            self._write(p, data)
        self._orig.clear()

    def mypy_targets(self) -> list[str]:
        cp = configparser.ConfigParser()
        cp.read(os.path.join(self.path, "mypy.ini"))
        files = [f.strip() for f in cp.get("mypy", "files", fallback="spmd_moe").split(",") if f.strip()]
        return files + [e for e in self.examples if e not in files]

    def mypy(self, extra: list[str] | None = None) -> tuple[list[str], str]:
        cmd = [PY, "-m", "mypy", "--config-file", "mypy.ini", "--no-error-summary",
               "--show-error-codes", "--hide-error-context", *self.mypy_targets(), *(extra or [])]
        env = dict(os.environ, PYTHONPATH=self.path)
        r = subprocess.run(cmd, cwd=self.path, env=env, capture_output=True, text=True, timeout=900)
        if r.returncode not in (0, 1):
            return [f"<mypy crashed rc={r.returncode}: {r.stderr.strip()[-300:]}>"], r.stdout + r.stderr
        errs = []
        for ln in r.stdout.splitlines():
            mm = _ERR.match(ln)
            if mm:
                errs.append(f"{mm['path']}:{mm['line']}: {mm['msg']}")
        return errs, r.stdout

    def drive(self, what: str, world: int, args: list[str], timeout: float) -> dict[str, Any]:
        out = os.path.join(self.path, f".drive_{what}_{world}.json")
        if os.path.exists(out):
            os.remove(out)
        cmd = [PY, "-m", "tests.mutate", "--drive", what, "--world", str(world), "--out", out, *args]
        env = dict(os.environ, PYTHONPATH=self.path, OMP_NUM_THREADS="1", SPMD_MOE_DEBUG="0")
        t0 = time.monotonic()
        try:
            r = subprocess.run(cmd, cwd=self.path, env=env, capture_output=True, text=True,
                               timeout=timeout, start_new_session=True)
        except subprocess.TimeoutExpired:
            return {"status": "hang", "reason": f"driver exceeded {timeout:.0f} s", "cases": {}}
        dt = time.monotonic() - t0
        if not os.path.exists(out):
            return {"status": "crash", "reason": f"driver rc={r.returncode}: {(r.stderr or r.stdout).strip()[-400:]}",
                    "cases": {}, "seconds": dt}
        with open(out) as f:
            res: dict[str, Any] = json.load(f)
        res["seconds"] = dt
        return res


def _key(err: str) -> str:
    """(file, message) of 'path:line: msg' (line numbers move under some mutants)."""
    path, _, rest = err.partition(":")
    return f"{path}: {rest.partition(': ')[2]}"


def new_errors(errs: list[str], base: list[str]) -> list[str]:
    left = collections.Counter(_key(e) for e in base)
    out = []
    for e in errs:
        k = _key(e)
        if left[k] > 0:
            left[k] -= 1
        else:
            out.append(e)
    return out


# ============================================================================ runtime driver
# `python -m tests.mutate --drive layer|input --world N --out F` runs in the mutant copy.

D, F_HID, E, K, S_HID = 8, 12, 8, 2, 8
TOL = 1e-4


def _cfg(**kw: Any) -> Any:
    from spmd_moe import MoEConfig

    # shared_gate: the gated shared experts run too (their gate weight is stated Replicate).
    base: dict[str, Any] = dict(dim=D, hidden_dim=F_HID, num_experts=E, top_k=K, shared_hidden_dim=S_HID,
                                shared_gate=True, load_balance_coeff=1e-3, padding="pad")
    base.update(kw)
    return MoEConfig(**base)


def supported_layouts() -> list[str]:
    from spmd_moe import MoE
    from spmd_moe.errors import ConfigError

    out = []
    for lay in ("replicated", "invariant", "sequence"):
        try:
            MoE(_cfg(), layout=lay)  # type: ignore[arg-type]
            out.append(lay)
        except (ConfigError, TypeError, ValueError):
            pass
    return out


def _rel(a: Any, b: Any) -> float:
    import torch

    if a is None:
        a = torch.zeros_like(b)
    if b is None:
        b = torch.zeros_like(a)
    if tuple(a.shape) != tuple(b.shape):
        return float("inf")
    if b.numel() == 0:
        return 0.0
    den = float(b.abs().max())
    num = float((a.double() - b.double()).abs().max())
    if num != num:
        return float("inf")
    return num / den if den else num


def _gather_cat(t: Any, dim: int, grp: Any) -> Any:
    import torch
    import torch.distributed as dist

    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(grp))]
    dist.all_gather(parts, t.contiguous(), group=grp)
    return torch.cat(parts, dim=dim)


def _slices(T: int, n: int) -> list[slice]:
    sizes = [T // n + (1 if r < T % n else 0) for r in range(n)]
    st = [sum(sizes[:r]) for r in range(n)]
    return [slice(st[r], st[r] + sizes[r]) for r in range(n)]


def _layer_case(layout: str, disp: str, mode: str, n: int, rank: int, grp: Any) -> str | None:
    """One case; None if right, else what was wrong."""
    import torch
    import torch.distributed as dist

    import spmd_moe as sm
    from spmd_moe import MoE, ParallelContext
    from spmd_moe.checkpoint import shard_state_dict

    pctx = ParallelContext.from_group(grp, "ep")
    # "all_to_all@2": the chunked (overlapped) all-to-all path; "auto": at these T the
    # replicated inference decode takes the one-all-reduce path (replicated_decode).
    disp_name, _, chunks = disp.partition("@")
    cfg = _cfg(dispatcher=disp_name, ep_chunks=int(chunks or 1))
    torch.manual_seed(0)
    full = MoE(cfg, layout=layout)  # type: ignore[arg-type]
    full.init_states(7)
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        assert full.expert_bias_E is not None
        full.expert_bias_E.copy_(torch.rand(E, generator=g) * 0.05)
    moe = MoE(cfg, pctx, layout=layout)  # type: ignore[arg-type]
    moe.load_state_dict(shard_state_dict(full.state_dict(), cfg, pctx))
    T = 2 * n + 1  # not a multiple of n: the padding paths run too
    x = torch.randn(T, D, generator=g)
    gy = torch.randn(T, D, generator=g)
    x_ref = x.clone().requires_grad_(True)
    full.tokens_per_expert_E.zero_()
    y_ref = full(x_ref)
    (y_ref * gy).sum().backward()
    ref_counts = full.tokens_per_expert_E.clone()
    sl = _slices(T, n)[rank] if layout == "sequence" else slice(0, T)
    x_in = x[sl].clone()
    moe.tokens_per_expert_E.zero_()
    if mode == "diverged":
        # A negative case: a replicated parameter (the shared experts' gate) that differs on
        # the last rank must be stopped by debug mode; accepting it is the failure.
        assert moe.shared_experts is not None and moe.shared_experts.gate is not None
        if rank == n - 1:
            with torch.no_grad():
                moe.shared_experts.gate.weight.add_(1e-3)
        try:
            with sm.debug(), torch.no_grad():
                moe(x_in)
        except sm.PlacementError as e:
            return None if "gate.weight" in str(e) else f"raised, not naming the gate: {str(e)[:200]}"
        return "accepted a shared gate weight that differs across ranks"
    dbg = mode not in ("nodebug", "partial")
    bi = mode == "bi"
    errs: list[str] = []
    # "partial": the all-to-all's fp32 partial-sum return (kernels='fast' inference; CUDA
    # only outside tests), switched on for the CPU as tests/test_ep_overlap.py does.
    import spmd_moe.dispatch.all_to_all as a2a

    a2a.PARTIAL_ON_CPU = mode == "partial"
    with sm.debug(dbg), sm.batch_invariant_mode(bi):
        if mode in ("grad", "bi"):
            x_in.requires_grad_(True)
            y = moe(x_in)
            scale = n if layout == "replicated" else 1
            ((y * gy[sl]).sum() / scale).backward()
        else:
            with torch.no_grad():
                y = moe(x_in)
        counts = moe.global_tokens_per_expert()
    if _rel(y.detach(), y_ref.detach()[sl]) > TOL:
        errs.append(f"output rel err {_rel(y.detach(), y_ref.detach()[sl]):.2e}")
    if layout != "sequence":
        ys = _gather_cat(y.detach().unsqueeze(0), 0, grp)
        if not bool((ys == ys[0]).all()):
            errs.append("replicated output differs between ranks")
    if not torch.equal(counts.double().reshape(-1), ref_counts.double().reshape(-1)):
        errs.append(f"global counts {counts.tolist()} != {ref_counts.tolist()}")
    if mode in ("grad", "bi"):
        gx = x_in.grad.detach().clone() if x_in.grad is not None else torch.zeros_like(x_in)
        if layout == "replicated":
            dist.all_reduce(gx, group=grp)  # Partial gradient: summands over ranks
        assert x_ref.grad is not None
        if _rel(gx, x_ref.grad[sl]) > TOL:
            errs.append(f"grad x rel err {_rel(gx, x_ref.grad[sl]):.2e}")
        gw = moe.router.gate.weight.grad
        gate = gw.detach().clone() if gw is not None else torch.zeros_like(moe.router.gate.weight)
        dist.all_reduce(gate, group=grp)
        if _rel(gate, full.router.gate.weight.grad) > TOL:
            errs.append(f"grad gate rel err {_rel(gate, full.router.gate.weight.grad):.2e}")
        for pname in ("w1_EFD", "w2_EDF", "w3_EFD"):
            p = getattr(moe.experts, pname)
            gp = _gather_cat(p.grad if p.grad is not None else torch.zeros_like(p), 0, grp)
            if _rel(gp, getattr(full.experts, pname).grad) > TOL:
                errs.append(f"grad {pname} rel err {_rel(gp, getattr(full.experts, pname).grad):.2e}")
        assert moe.shared_experts is not None and full.shared_experts is not None
        for pname, dim in (("w1", 0), ("w2", 1), ("w3", 0)):
            p = getattr(moe.shared_experts, pname).weight
            gp = _gather_cat(p.grad if p.grad is not None else torch.zeros_like(p), dim, grp)
            ref = getattr(full.shared_experts, pname).weight.grad
            if _rel(gp, ref) > TOL:
                errs.append(f"grad shared {pname} rel err {_rel(gp, ref):.2e}")
    return "; ".join(errs) or None


def _fresh_group(world: int, pg_timeout: float) -> Any:
    """A new gloo group per case: an op left unmatched by a mutant that failed on one
    rank only cannot pair with the next case's ops."""
    import torch.distributed as dist

    return dist.new_group(list(range(world)), timeout=datetime.timedelta(seconds=pg_timeout), backend="gloo")


def _layer_rank(rank: int, world: int, cases: list[tuple[str, str, str]], pg_timeout: float = 10.0) -> dict[str, str]:
    import spmd_moe

    res: dict[str, str] = {"__file__": spmd_moe.__file__ or ""}
    for layout, disp, mode in cases:
        name = f"{layout}/{disp}/{mode}"
        try:
            bad = _layer_case(layout, disp, mode, world, rank, _fresh_group(world, pg_timeout))
            res[name] = "ok" if bad is None else f"wrong: {bad}"
        except Exception as e:  # noqa: BLE001 - every failure is a verdict
            res[name] = f"error: {type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
    return res


def layer_cases(layouts: list[str]) -> list[tuple[str, str, str]]:
    cases = []
    for lay in layouts:
        for disp in ("all_to_all", "all_gather"):
            for mode in ("grad", "nograd", "nodebug"):
                cases.append((lay, disp, mode))
        cases.append((lay, "all_to_all", "bi"))
        cases += [(lay, "all_to_all@2", "grad"), (lay, "all_to_all@2", "nograd"), (lay, "auto", "nodebug")]
        cases.append((lay, "all_to_all", "diverged"))
        cases.append((lay, "all_to_all", "partial"))
    return cases


# ------------------------------------------------------------------ input driver


def _realise(shape: tuple[int, ...], letter: str, rank: int, kind: str, hi: int = 0, grp: Any = None) -> Any:
    """A plain tensor whose values realise `letter` on the expert axis."""
    import spmd_types as spmd
    import torch

    seed = 100 if letter in ("R", "I") else 200 + rank
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(0, hi, shape, generator=g) if kind == "int" else torch.randn(*shape, generator=g)
    if letter in ("I", "P"):  # only a tracked type tells I from R and P from V
        spmd.assert_type(t, {grp: spmd.I if letter == "I" else spmd.P})
    return t


def _input_rank(rank: int, world: int, spec: dict[str, Any], pg_timeout: float = 10.0) -> dict[str, Any]:
    import torch

    import spmd_moe as sm
    from spmd_moe import MoE, ParallelContext
    from spmd_moe.checkpoint import shard_state_dict

    cls, meth, param, wrong, layout = spec["cls"], spec["method"], spec["param"], spec["wrong"], spec["layout"]
    grp = _fresh_group(world, pg_timeout)
    pctx = ParallelContext.from_group(grp, "ep")
    cfg = _cfg()
    T = 2 * world
    try:
        with sm.debug():
            if cls == "MoE" and layout:
                full = MoE(cfg, layout=layout)  # type: ignore[arg-type]
                full.init_states(3)
                moe = MoE(cfg, pctx, layout=layout)  # type: ignore[arg-type]
                moe.load_state_dict(shard_state_dict(full.state_dict(), cfg, pctx))
                x = _realise((T, D), CODE[wrong], rank, "float", grp=grp)
                moe(x)
            elif cls == "TopKRouter" and meth in ("forward", "__call__"):
                from spmd_moe.router import TopKRouter

                r = TopKRouter(cfg, pctx)
                x = _realise((T, D), "V", rank, "float", grp=grp)
                bias = _realise((E,), "R", rank, "float", grp=grp)
                if param == "x_TD":
                    x = _realise((T, D), CODE[wrong], rank, "float", grp=grp)
                else:
                    bias = _realise((E,), CODE[wrong], rank, "float", grp=grp)
                r(x, bias)
            elif cls in ("AllToAllDispatcher", "AllGatherDispatcher") and meth == "dispatch":
                import spmd_moe.dispatch as dd

                d = getattr(dd, cls)(E, pctx)
                x = _realise((T, D), "V", rank, "float", grp=grp)
                ids = _realise((T, K), "V", rank, "int", E, grp=grp)
                if param == "x_TD":
                    x = _realise((T, D), CODE[wrong], rank, "float", grp=grp)
                else:
                    ids = _realise((T, K), CODE[wrong], rank, "int", E, grp=grp)
                d.dispatch(x, ids, 0)
            elif cls == "SharedExperts" and meth == "forward":
                from spmd_moe.experts import SharedExperts

                se = SharedExperts(cfg, pctx)
                se(_realise((T, D), CODE[wrong], rank, "float", grp=grp))
            elif cls == "GroupedExperts" and meth == "forward":
                from spmd_moe.experts import GroupedExperts

                ge = GroupedExperts(cfg, pctx, None)
                e = E // world
                rows = _realise((T, D), "V", rank, "float", grp=grp)
                counts = torch.tensor([T // e] * (e - 1) + [T - (T // e) * (e - 1)])
                if param in ("routed_RD", "x_RD"):
                    rows = _realise((T, D), CODE[wrong], rank, "float", grp=grp)
                else:
                    import spmd_types as spmd

                    if CODE[wrong] in ("I", "P"):
                        spmd.assert_type(counts, {grp: spmd.I if CODE[wrong] == "I" else spmd.P})
                    elif CODE[wrong] == "V" and rank == 0 and e > 1:
                        counts = torch.tensor([0] * (e - 1) + [T])
                ge(rows, counts)
            else:
                return {"status": "n/a"}
    except Exception as e:  # noqa: BLE001
        return {"status": "raised", "type": type(e).__name__, "msg": str(e).splitlines()[0][:300] if str(e) else "",
                "spmd": isinstance(e, sm.SpmdMoeError)}
    return {"status": "accepted"}



# ------------------------------------------------------------------ rank servers
# Spawning ranks costs seconds (torch import) where a case costs milliseconds: each
# worker keeps one set of rank processes per world alive, with torch, spmd_types,
# jaxtyping and beartype imported but never spmd_moe. Per request every rank forks a
# child that imports spmd_moe from the workspace (where the mutant is applied; bytecode
# caching off), joins a fresh gloo group (a new port per request) and runs the cases.
# (Dropping spmd_moe from sys.modules and importing it again is not equivalent:
# beartype's caches keep the first import's hints.)


def _write_json(path: str, obj: Any) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f)
    os.replace(tmp, path)


def _serve_child(rank: int, world: int, req: dict[str, Any], pg_timeout: float, out: str) -> None:
    t0 = time.monotonic()
    res: dict[str, Any]
    try:
        import torch.distributed as dist

        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{req['port']}", rank=rank,
                                world_size=world, timeout=datetime.timedelta(seconds=pg_timeout))
        if req["what"] == "layer":
            res = {"cases": _layer_rank(rank, world, [tuple(c) for c in req["cases"]], pg_timeout)}
        else:
            res = _input_rank(rank, world, req["spec"], pg_timeout)
    except BaseException as e:  # noqa: BLE001
        res = {"status": "crash", "msg": f"{type(e).__name__}: {e}"[:400]}
    res["seconds"] = time.monotonic() - t0
    _write_json(out, res)


_WARM = (
    "numpy", "torch.distributed.tensor", "torch.distributed.tensor.parallel", "torch.distributed.nn",
    "torch.distributed.fsdp", "torch.distributed.algorithms", "torch._dynamo", "torch._inductor",
    "torch._functorch._aot_autograd", "torch.testing._internal.distributed", "torch.onnx", "triton",
    "torch.distributed._shard.sharded_tensor",
)


def _serve_rank(rank: int, world: int, ctrl: str, pg_timeout: float) -> None:
    sys.dont_write_bytecode = True
    import beartype  # noqa: F401 - imported once here, inherited by every fork
    import jaxtyping  # noqa: F401
    import spmd_types  # noqa: F401
    import spmd_types.checker  # noqa: F401
    import torch
    import torch.distributed  # noqa: F401

    torch.set_num_threads(1)
    # What the first debug-mode multi-rank call imports lazily (seconds): once, here.
    import importlib

    for mod in _WARM:
        try:
            importlib.import_module(mod)
        except Exception:  # noqa: BLE001 - warming only
            pass
    _write_json(os.path.join(ctrl, f"ready_r{rank}.json"), {"pid": os.getpid()})
    k = 0
    while True:
        req_path = os.path.join(ctrl, f"req{k}.json")
        while not os.path.exists(req_path):
            time.sleep(0.05)
        with open(req_path) as f:
            req = json.load(f)
        if req["what"] == "stop":
            return
        out = os.path.join(ctrl, f"res{k}_r{rank}.json")
        pid = os.fork()
        if pid == 0:
            try:
                _serve_child(rank, world, req, pg_timeout, out)
            finally:
                os._exit(0)
        os.waitpid(pid, 0)
        if not os.path.exists(out):
            _write_json(out, {"status": "crash", "msg": "forked rank died"})
        k += 1


def _serve_main(world: int, ctrl: str, pg_timeout: float) -> None:
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_serve_rank, args=(r, world, ctrl, pg_timeout)) for r in range(world)]
    for pr in procs:
        pr.start()
    for pr in procs:
        pr.join()


class Server:
    """One persistent group of `world` rank processes in a workspace."""

    _n = 0

    def __init__(self, ws: Workspace, world: int, pg_timeout: float, startup: float = 240.0) -> None:
        self.ws, self.world, self.pg_timeout, self.startup = ws, world, pg_timeout, startup
        self.proc: subprocess.Popen[bytes] | None = None
        self.restarts = -1
        self.start()

    def start(self) -> None:
        Server._n += 1
        self.restarts += 1
        self.ctrl = os.path.join(self.ws.path, f".serve_w{self.world}_{Server._n}")
        os.makedirs(self.ctrl)
        env = dict(os.environ, PYTHONPATH=self.ws.path, OMP_NUM_THREADS="1", SPMD_MOE_DEBUG="0",
                   PYTHONDONTWRITEBYTECODE="1", PYTHONWARNINGS="ignore")
        self.log = open(os.path.join(self.ctrl, "log.txt"), "wb")
        self.proc = subprocess.Popen(
            [PY, "-B", "-m", "tests.mutate", "--serve", "--world", str(self.world), "--ctrl", self.ctrl,
             "--pg-timeout", str(self.pg_timeout)],
            cwd=self.ws.path, env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        self.k = 0
        self.ready = False

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, 9)  # the server and the ranks it spawned
            except ProcessLookupError:
                pass
            self.proc.wait()
        self.proc = None
        self.log.close()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            _write_json(os.path.join(self.ctrl, f"req{self.k}.json"), {"what": "stop"})
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        self.kill()

    def request(self, req: dict[str, Any], timeout: float) -> dict[str, Any]:
        """{'status': 'done', 'ranks': [...]} or {'status': 'hang'|'crash', 'reason'}."""
        from tests.dist_utils import _free_port

        _write_json(os.path.join(self.ctrl, f"req{self.k}.json"), req | {"port": _free_port()})
        deadline = time.monotonic() + timeout + (0 if self.ready else self.startup)
        paths = [os.path.join(self.ctrl, f"res{self.k}_r{r}.json") for r in range(self.world)]
        while not all(os.path.exists(p) for p in paths):
            assert self.proc is not None
            if self.proc.poll() is not None:
                with open(os.path.join(self.ctrl, "log.txt"), "rb") as f:
                    tail = f.read()[-400:].decode(errors="replace")
                self.kill()
                self.start()
                return {"status": "crash", "reason": f"rank server exited: {tail}"}
            if time.monotonic() > deadline:
                missing = [r for r, p in enumerate(paths) if not os.path.exists(p)]
                self.kill()
                self.start()
                return {"status": "hang", "reason": f"ranks {missing} gave no result in {timeout:.0f} s"}
            time.sleep(0.05)
        ranks = []
        for p in paths:
            with open(p) as f:
                ranks.append(json.load(f))
        self.k += 1
        self.ready = True
        return {"status": "done", "ranks": ranks}

    def layer(self, cases: list[tuple[str, str, str]], timeout: float) -> dict[str, Any]:
        res = self.request({"what": "layer", "cases": cases}, timeout)
        if res["status"] != "done":
            return res | {"cases": {}}
        merged: dict[str, str] = {}
        problems = []
        for r, rr in enumerate(res["ranks"]):
            if "cases" not in rr:
                problems.append(f"rank {r}: {rr.get('msg', '')}")
                continue
            if not rr["cases"].pop("__file__", "").startswith(self.ws.path):
                problems.append(f"rank {r}: spmd_moe imported from outside the workspace")
            for k, v in rr["cases"].items():
                if v != "ok" and merged.get(k, "ok") == "ok":
                    merged[k] = f"rank {r}: {v}"
                merged.setdefault(k, v)
        return {"status": "crash" if problems else "done", "reason": "; ".join(problems), "cases": merged,
                "seconds": max(rr.get("seconds", 0) for rr in res["ranks"])}


def _drive_main(a: argparse.Namespace) -> None:
    from tests.dist_utils import run_ranks

    out: dict[str, Any]
    if a.drive == "layer":
        cases = layer_cases(supported_layouts())
        if a.cases:
            cases = [c for c in cases if "/".join(c) in a.cases.split(",")]
        rs = run_ranks(_layer_rank, a.world, cases, timeout=a.timeout, pg_timeout=a.pg_timeout)
        merged: dict[str, str] = {}
        problems = []
        for r, res in enumerate(rs):
            if not res["ok"]:
                problems.append(f"rank {r}: {res['error'][:300]}")
                continue
            val = res["value"]
            if not val.pop("__file__", "").startswith(os.getcwd()):
                problems.append(f"rank {r}: spmd_moe imported from outside the copy")
            for k, v in val.items():
                if v != "ok" and merged.get(k, "ok") == "ok":
                    merged[k] = f"rank {r}: {v}"
                merged.setdefault(k, v)
        for c in cases:
            merged.setdefault("/".join(c), "error: no result (rank gone)")
        out = {"status": "crash" if problems else "done", "reason": "; ".join(problems), "cases": merged}
    else:
        spec = json.loads(a.spec)
        rs = run_ranks(_input_rank, a.world, spec, timeout=a.timeout, pg_timeout=a.pg_timeout)
        out = {"status": "done", "ranks": [r.get("value", {"status": "crash", "msg": r.get("error", "")[:300]}) for r in rs]}
    with open(a.out, "w") as f:
        json.dump(out, f, indent=1)


# ============================================================================ runner


class Runner:
    def __init__(self, a: argparse.Namespace) -> None:
        self.a = a
        self.worlds = [int(w) for w in a.worlds.split(",")]
        self.lock = threading.Lock()
        self.log_t0 = time.monotonic()
        self._servers: dict[int, dict[int, Server]] = {}
        self.cases: list[tuple[str, str, str]] = []

    def log(self, msg: str) -> None:
        with self.lock:
            print(f"[{time.monotonic() - self.log_t0:7.1f}s] {msg}", flush=True)

    def servers(self, i: int, ws: Workspace) -> dict[int, Server]:
        with self.lock:
            if i not in self._servers:
                self._servers[i] = {w: Server(ws, w, self.a.pg_timeout) for w in self.worlds}
            return self._servers[i]

    def layer_verdict(self, srv: dict[int, Server], base: dict[int, dict[str, str]]) -> tuple[bool, str]:
        """Run the layer driver at each world; killed if a case that passes on the
        baseline fails (or the ranks hang / crash)."""
        for w in self.worlds:
            res = srv[w].layer(self.cases, self.a.timeout)
            if res["status"] in ("hang", "crash"):
                return True, f"world {w}: {res['status']}: {res['reason'][:300]}"
            for case, v in res["cases"].items():
                if v != "ok" and base[w].get(case) == "ok":
                    return True, f"world {w}: {case}: {v[:300]}"
        return False, ""

    def input_verdict(self, srv: dict[int, Server], m: Mutant) -> tuple[bool | None, str]:
        ep = m.spec["ep"]
        spec = {"cls": ep["cls"], "method": ep["method"], "param": m.spec["param"],
                "wrong": m.spec["wrong"], "layout": m.spec["layout"]}
        reasons = []
        for w in self.worlds:
            res = srv[w].request({"what": "input", "spec": spec}, self.a.timeout)
            if res["status"] in ("hang", "crash"):
                return True, f"world {w}: {res['status']}: {res['reason'][:200]}"
            ranks = res["ranks"]
            if all(r.get("status") == "n/a" for r in ranks):
                return None, "no runtime driver for this entry point"
            raised = [r for r in ranks if r.get("status") in ("raised", "crash")]
            if raised:
                r0 = raised[0]
                kind = "SpmdMoeError" if r0.get("spmd") else "not an SpmdMoeError:"
                return True, f"world {w}: {kind} {r0.get('type', '')}: {r0.get('msg', '')[:250]}"
            reasons.append(f"world {w}: accepted")
        return False, "; ".join(reasons)

    def run(self) -> dict[str, Any]:
        a = self.a
        t_start = time.monotonic()
        # the code the workspaces are copied from: HEAD now (+ uncommitted library changes)
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "spmd_moe", "typing_rules",
                                "mypy.ini", "tests/typing_snippets"], cwd=REPO, capture_output=True, text=True).stdout.strip()
        self.commit = head + (" (+ uncommitted changes in spmd_moe/typing_rules/snippets)" if dirty else "")
        self.started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        examples = _examples(a)
        nstatic, nrt = max(1, a.jobs), (0 if a.static_only else max(1, a.rt_jobs))
        self.log(f"copying the repo into {nstatic} mypy + {nrt} runtime workspace(s) under {WORK}")
        # No copy of the repo's .mypy_cache: entries written under an older plugin would be
        # trusted (the plugin's code is not part of mypy's cache key). One cold run in the
        # first workspace, its cache copied to the others.
        wss = [Workspace(f"w{i}", examples, mypy_cache=False) for i in range(nstatic)]
        rws = [Workspace(f"r{i}", examples, mypy_cache=False) for i in range(nrt)]
        ws0 = wss[0]
        # layouts the layer accepts (in the copy)
        r = subprocess.run([PY, "-c", "import tests.mutate as m, json; print(json.dumps(m.supported_layouts()))"],
                           cwd=ws0.path, env=dict(os.environ, PYTHONPATH=ws0.path), capture_output=True, text=True)
        layouts = json.loads(r.stdout.strip().splitlines()[-1]) if r.returncode == 0 else ["replicated", "sequence"]
        muts = generate(ws0.path, examples, layouts)
        n_all = len(muts)
        if a.fast:
            muts = fast_subset(muts)
        if a.only:
            muts = [m for m in muts if re.search(a.only, f"{m.id} {m.desc}")]
        self.log(f"{n_all} mutants generated, {len(muts)} selected; layouts {layouts}; worlds {self.worlds}")
        prev_seconds = 0.0
        if a.resume:  # keep the verdicts of a previous --json report (same mutant ids)
            with open(a.resume) as f:
                prev = json.load(f)
            prev_seconds = float(prev.get("seconds", 0))
            old = {pm["id"]: pm for pm in prev["mutants"] if pm.get("static") is not None}
            kept = 0
            for m in muts:
                pm = old.get(m.id)
                if pm is not None and (pm.get("runtime") is not None or pm["static"] or a.static_only):
                    m.static, m.static_errors = pm["static"], pm["static_errors"]
                    m.runtime, m.runtime_reason = pm.get("runtime"), pm.get("runtime_reason", "")
                    m.spec["resumed"] = True
                    kept += 1
            self.log(f"resumed {kept} verdicts from {a.resume} ({prev.get('commit')})")

        # ---- baselines (mypy in every mypy workspace: warms its cache)
        cold_errs, _ = wss[0].mypy()
        for w in wss[1:]:
            shutil.copytree(os.path.join(wss[0].path, ".mypy_cache"), os.path.join(w.path, ".mypy_cache"))
        with concurrent.futures.ThreadPoolExecutor(nstatic + 1) as ex:
            base_f = [ex.submit(w.mypy) for w in wss]
            if nrt:
                for i, w_ in enumerate(rws):
                    ex.submit(self.servers, i, w_)
        base_errs = base_f[0].result()[0]
        self.log(f"baseline mypy: {len(base_errs)} error(s)")
        base_rt: dict[int, dict[str, str]] = {}
        base_problems = []
        self.cases = layer_cases(layouts)
        if nrt:
            for w in self.worlds:
                res = self.servers(0, rws[0])[w].layer(self.cases, a.timeout)
                base_rt[w] = res.get("cases", {})
                bad = {k: v for k, v in base_rt[w].items() if v != "ok"}
                if res["status"] != "done" or bad:
                    base_problems.append(f"world {w}: {res['status']} {res.get('reason', '')} {bad}")
                self.log(f"baseline runtime world {w}: {res['status']} in {res.get('seconds', 0):.0f}s, "
                         f"{len(base_rt[w]) - len(bad)}/{len(base_rt[w])} cases ok")

        # ---- input mutants: static in one mypy run (a control snippet per entry point)
        inputs = [m for m in muts if m.category == "input" and not m.spec.get("resumed")]
        if inputs:
            sdir = os.path.join(ws0.path, "tests", "_mutate_snippets")
            os.makedirs(sdir, exist_ok=True)
            files = []
            controls: dict[str, str] = {}
            for m in inputs:
                ep = m.spec["ep"]
                ckey = f"{ep['cls']}_{ep['method']}_{ep['line']}"
                if ckey not in controls:
                    controls[ckey] = f"tests/_mutate_snippets/control_{ckey}.py"
                    with open(os.path.join(ws0.path, controls[ckey]), "w") as f:
                        f.write(_snippet(ep, None, None))
                    files.append(controls[ckey])
                fname = f"tests/_mutate_snippets/m_{hashlib.sha1(m.id.encode()).hexdigest()[:10]}.py"
                m.spec["snippet"] = fname
                m.spec["control"] = controls[ckey]
                with open(os.path.join(ws0.path, fname), "w") as f:
                    f.write(_snippet(ep, m.spec["param"], m.spec["wrong"]))
                files.append(fname)
            errs, _ = ws0.mypy(files)
            per: dict[str, list[str]] = collections.defaultdict(list)
            for e in errs:
                per[e.split(":")[0]].append(e)
            for m in inputs:
                got = per.get(m.spec["snippet"], [])
                ctl = [e.replace(m.spec["control"], m.spec["snippet"]) for e in per.get(m.spec["control"], [])]
                m.static_errors = new_errors(got, ctl)
                m.static = bool(m.static_errors)
                m.spec["control_errors"] = per.get(m.spec["control"], [])
            self.log(f"input mutants: {sum(bool(m.static) for m in inputs)}/{len(inputs)} killed by mypy")

        # ---- source mutants: mypy workers feed a runtime queue (static survivors)
        src = [m for m in muts if m.category != "input" and not m.spec.get("resumed")]
        by_cat: dict[str, list[Mutant]] = collections.defaultdict(list)
        for m in src:
            by_cat[m.category].append(m)
        queue: list[Mutant] = []  # round-robin over categories: a cut-short run stays representative
        while any(by_cat.values()):
            for cat in sorted(by_cat):
                if by_cat[cat]:
                    queue.append(by_cat[cat].pop(0))
        rtq: list[Mutant] = [m for m in inputs if nrt and (a.runtime_all or not m.static)]
        static_left = [nstatic]
        done = [0]
        budget = a.budget_min * 60 if a.budget_min else None

        def over_budget() -> bool:
            return budget is not None and time.monotonic() - t_start > budget

        def work(i: int) -> None:
            ws = wss[i]
            try:
                while True:
                    with self.lock:
                        if not queue or over_budget():
                            return
                        m = queue.pop(0)
                    ws.apply(m)
                    try:
                        errs, _ = ws.mypy()
                    finally:
                        ws.restore()
                    m.static_errors = new_errors(errs, base_errs)
                    m.static = bool(m.static_errors)
                    with self.lock:
                        done[0] += 1
                        if nrt and (a.runtime_all or not m.static):
                            rtq.append(m)
                    self.log(f"mypy {done[0]}/{len(src)} {m.id} {m.desc}: static={m.static}")
            finally:
                with self.lock:
                    static_left[0] -= 1

        def rt_work(i: int) -> None:
            ws = rws[i]
            while True:
                with self.lock:
                    m = rtq.pop(0) if rtq else None
                    finished = static_left[0] == 0 and not rtq and m is None
                if finished:
                    return
                if m is None:
                    time.sleep(0.2)
                    continue
                if over_budget() and budget is not None and time.monotonic() - t_start > budget + 600:
                    continue  # far past the budget: leave the rest unrun (reported)
                if m.category == "input":
                    m.runtime, m.runtime_reason = self.input_verdict(self.servers(i, ws), m)
                else:
                    ws.apply(m)
                    try:
                        m.runtime, m.runtime_reason = self.layer_verdict(self.servers(i, ws), base_rt)
                    finally:
                        ws.restore()
                self.log(f"runtime {m.id} {m.desc}: static={m.static} runtime={m.runtime}"
                         + (f" ({m.runtime_reason[:150]})" if m.runtime_reason else ""))

        with concurrent.futures.ThreadPoolExecutor(nstatic + nrt) as ex:
            fs = [ex.submit(work, i) for i in range(nstatic)] + [ex.submit(rt_work, i) for i in range(nrt)]
            for f in fs:
                f.result()
        restarts = sum(s.restarts for d in self._servers.values() for s in d.values())
        for d in self._servers.values():
            for srv in d.values():
                srv.stop()
        self.log(f"rank servers restarted {restarts} time(s) (after hangs / crashes)")
        elapsed = time.monotonic() - t_start + prev_seconds
        return self.report(muts, n_all, layouts, base_errs, base_problems, elapsed)

    def report(self, muts: list[Mutant], n_all: int, layouts: list[str], base_errs: list[str],
               base_problems: list[str], elapsed: float) -> dict[str, Any]:
        a = self.a
        cats = sorted({m.category for m in muts})
        rows = []
        for cat in cats + ["all"]:
            ms = [m for m in muts if cat in ("all", m.category) and m.static is not None]
            n = len(ms)
            st = sum(bool(m.static) for m in ms)
            tot = sum(m.killed for m in ms)
            rt_only = sum(bool(m.runtime) and not m.static for m in ms)
            not_run = sum(1 for m in muts if cat in ("all", m.category) and m.static is None)
            rows.append({"category": cat, "mutants": n, "static": st, "overall": tot, "runtime_only": rt_only,
                         "not_run": not_run})
        spmd_errs = ("SpmdMoeError", "PlacementError", "ShapeError", "DtypeError", "PaddingError", "RoutingError",
                     "DistributedError", "ConfigError", "DeviceError", "CheckpointError")

        def kind(reason: str) -> str:
            if ": hang" in reason or "hang:" in reason:
                return "hang (timeout)"
            if "wrong:" in reason:
                return "wrong result"
            if any(f"{e}:" in reason or f"{e} " in reason for e in spmd_errs) and "not an SpmdMoeError" not in reason:
                return "SpmdMoeError"
            return "crash (other exception)"

        kinds = collections.Counter(kind(m.runtime_reason) for m in muts if m.runtime and not m.static)
        summary = {
            "runtime_only_kinds": dict(kinds),
            "date": self.started,
            "finished": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "commit": self.commit,
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.platform()}",
            "command": "python -m tests.mutate " + " ".join(sys.argv[1:]),
            "seconds": round(elapsed, 1), "generated": n_all, "selected": len(muts), "layouts": layouts,
            "worlds": self.worlds, "baseline_mypy_errors": base_errs, "baseline_runtime_problems": base_problems,
            "table": rows,
            "survivors": [{"id": m.id, "category": m.category, "where": f"{m.file}:{m.line}", "mutation": m.desc,
                           "runtime": m.runtime_reason if m.runtime is not None or m.category == "input"
                           else "runtime not run (budget)"}
                          for m in muts if m.static is not None and not m.killed],
            "mutants": [{k: v for k, v in asdict(m).items() if k not in ("edits",)} | {"killed": m.killed} for m in muts],
        }
        for mm in summary["mutants"]:
            if "ep" in mm["spec"]:
                mm["spec"] = {k: v for k, v in mm["spec"].items() if k != "ep"}
        print()
        print(f"mutation testing: {summary['date']}, commit {summary['commit']}, {summary['seconds']:.0f} s")
        print(f"  {'category':<8} {'mutants':>7} {'mypy':>12} {'mypy+runtime':>14} {'runtime only':>13} {'not run':>8}")
        for r in rows:
            n = r["mutants"] or 1
            print(f"  {r['category']:<8} {r['mutants']:>7} {r['static']:>4} {100 * r['static'] / n:5.1f}% "
                  f"{r['overall']:>5} {100 * r['overall'] / n:5.1f}% {r['runtime_only']:>8} {r['not_run']:>12}")
        if base_problems:
            print("  baseline runtime problems (those cases are not used as kills):")
            for p in base_problems:
                print("   ", p[:400])
        if summary["survivors"]:
            print("  surviving mutants:")
            for s in summary["survivors"]:
                print(f"    {s['where']:<36} {s['category']:<6} {s['mutation']}")
        if a.json:
            with open(a.json, "w") as f:
                json.dump(summary, f, indent=1)
        return summary



# ============================================================================ docs


CATEGORY_TEXT = {
    "drop": "collective call dropped (replaced by its tensor argument)",
    "swap": "collective swapped for another with a compatible call shape",
    "axis": "collective / `as_*` moved to another ParallelContext in scope",
    "state": "stated placement flipped (`as_*`, `unchecked_cast(Placed[...])`)",
    "sig": "placement letter flipped in a function signature",
    "input": "entry point fed a wrong placement",
}


def render_markdown(summary: dict[str, Any]) -> str:
    """The figures part of docs/placements.md's "Mutation testing" section."""
    out = []
    out.append(f"Measured {summary['date']} on commit `{summary['commit']}`, {summary['machine']}; "
               f"command `{summary['command']}`; {summary['seconds'] / 60:.0f} min wall; worlds "
               f"{', '.join(map(str, summary['worlds']))}; layouts {', '.join(summary['layouts'])}.")
    out.append("")
    out.append("| category | mutants | killed by mypy | killed by mypy + runtime | runtime only | not run |")
    out.append("|---|---:|---:|---:|---:|---:|")
    for r in summary["table"]:
        n = r["mutants"] or 1
        name = "**all**" if r["category"] == "all" else f"{r['category']}: {CATEGORY_TEXT.get(r['category'], '')}"
        out.append(f"| {name} | {r['mutants']} | {r['static']} ({100 * r['static'] / n:.1f}%) | "
                   f"{r['overall']} ({100 * r['overall'] / n:.1f}%) | {r['runtime_only']} | {r.get('not_run', 0)} |")
    out.append("")
    if summary.get("runtime_only_kinds"):
        out.append("Runtime-only kills, by how the debug-mode run failed: "
                   + ", ".join(f"{k} {v}" for k, v in sorted(summary["runtime_only_kinds"].items())) + ".")
        out.append("")
    if summary["baseline_mypy_errors"] or summary["baseline_runtime_problems"]:
        out.append("Baseline problems (cases failing unmutated are not used as kills): "
                   + "; ".join(summary["baseline_mypy_errors"] + summary["baseline_runtime_problems"])[:1500])
        out.append("")
    surv = summary["survivors"]
    if surv:
        out.append(f"Surviving mutants ({len(surv)}):")
        out.append("")
        out.append("| where | category | mutation | runtime |")
        out.append("|---|---|---|---|")
        for sv in surv:
            rt = (sv.get("runtime") or "driver passes").replace("|", "/")[:160]
            out.append(f"| `{sv['where']}` | {sv['category']} | `{sv['mutation']}` | {rt} |")
        out.append("")
    return "\n".join(out) + "\n"

# The project's own typed examples (checked by tests/test_typing_static.py): part of
# "killed by mypy", as a changed signature that breaks them breaks the suite.
DEFAULT_EXAMPLES = tuple(sorted(
    f"tests/typing_snippets/{f}" for f in os.listdir(os.path.join(REPO, "tests", "typing_snippets"))
    if f.startswith("good_") and f.endswith(".py")
))


def _examples(a: argparse.Namespace) -> list[str]:
    """--example files, else the two-axis user example(s) that exist."""
    if a.example:
        return list(a.example)
    return [e for e in DEFAULT_EXAMPLES if os.path.exists(os.path.join(REPO, e))]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.mutate", description=__doc__.split("\n\n")[0])
    ap.add_argument("--fast", action="store_true", help="a small deterministic subset (CI)")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--only", help="regex on mutant id / description")
    ap.add_argument("--worlds", default="2,4")
    ap.add_argument("--jobs", type=int, default=4, help="parallel mypy workers (workspace copies)")
    ap.add_argument("--rt-jobs", type=int, default=2, help="parallel runtime workers (each: rank servers per world)")
    ap.add_argument("--budget-min", type=float, default=None,
                    help="stop starting mypy runs after this many minutes (the rest reported as not run)")
    ap.add_argument("--example", action="append", help="extra (two-axis) file to mutate and type-check, repo-relative")
    ap.add_argument("--static-only", action="store_true", help="mypy only")
    ap.add_argument("--runtime-all", action="store_true", help="run the runtime driver on statically killed mutants too")
    ap.add_argument("--timeout", type=float, default=120.0, help="per runtime request (s): past it, a hang")
    ap.add_argument("--pg-timeout", type=float, default=10.0)
    ap.add_argument("--list", action="store_true", help="print the mutants and exit")
    ap.add_argument("--resume", metavar="JSON", help="keep the verdicts of a previous --json report, run the rest")
    ap.add_argument("--render", metavar="JSON", help="print the docs table of a --json report and exit")
    # driver mode (internal)
    ap.add_argument("--drive", choices=("layer", "input"), help=argparse.SUPPRESS)
    ap.add_argument("--world", type=int, default=2, help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--spec", help=argparse.SUPPRESS)
    ap.add_argument("--cases", help=argparse.SUPPRESS)
    ap.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--ctrl", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.serve:
        _serve_main(a.world, a.ctrl, a.pg_timeout)
        return 0
    if a.drive:
        _drive_main(a)
        return 0
    if a.render:
        with open(a.render) as f:
            print(render_markdown(json.load(f)), end="")
        return 0
    if a.list:
        muts = generate(REPO, _examples(a), ["replicated", "invariant", "sequence"])
        if a.fast:
            muts = fast_subset(muts)
        if a.only:
            muts = [m for m in muts if re.search(a.only, f"{m.id} {m.desc}")]
        for m in muts:
            print(f"{m.id:<50} {m.desc}")
        print(len(muts), "mutants", dict(collections.Counter(m.category for m in muts)))
        return 0
    summary = Runner(a).run()
    total = summary["table"][-1]
    return 0 if total["overall"] == total["mutants"] and not total["not_run"] else 1


if __name__ == "__main__":
    sys.exit(main())
