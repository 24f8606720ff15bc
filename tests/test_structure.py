"""The package's layering, read from the source (AST), not from what happens to be imported:

* applications (spmd_moe/apps) are imported by nothing outside spmd_moe/apps;
* the core (everything but integrations/ and apps/) imports neither vLLM, torchtitan nor
  transformers, not even lazily inside a function;
* the modules' import-time imports (module level, outside functions) have no cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "spmd_moe"
FRAMEWORKS = ("vllm", "torchtitan", "transformers")


def _module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path, *, module_level_only: bool) -> list[tuple[str, int]]:
    """(imported module, line) for each import; relative imports resolved."""
    tree = ast.parse(path.read_text(), filename=str(path))
    me = _module_name(path)
    package = me if path.name == "__init__.py" else me.rsplit(".", 1)[0]
    out: list[tuple[str, int]] = []
    nodes: list[ast.AST] = list(ast.walk(tree))
    if module_level_only:  # module level includes `if`/`try` blocks, not function bodies
        stack, nodes = list(tree.body), []
        while stack:
            n = stack.pop()
            nodes.append(n)
            if isinstance(n, ast.If) and "TYPE_CHECKING" in ast.unparse(n.test):
                stack.extend(n.orelse)  # for the type checker only: not imported at run time
            elif isinstance(n, (ast.If, ast.Try)):
                stack.extend(n.body + n.orelse + getattr(n, "finalbody", []) + [h for x in getattr(n, "handlers", []) for h in x.body])
    for n in nodes:
        if isinstance(n, ast.Import):
            out += [(a.name, n.lineno) for a in n.names]
        elif isinstance(n, ast.ImportFrom):
            base = n.module or ""
            if n.level:
                pkg_parts = package.split(".")
                base = ".".join(pkg_parts[: len(pkg_parts) - (n.level - 1)] + ([base] if base else []))
            out.append((base, n.lineno))
            out += [(f"{base}.{a.name}", n.lineno) for a in n.names]  # `from pkg import module`
    return out


def _files() -> list[Path]:
    return sorted(p for p in PKG.rglob("*.py") if "__pycache__" not in p.parts)


def test_only_apps_import_apps() -> None:
    bad = []
    for f in _files():
        if "apps" in f.relative_to(PKG).parts:
            continue
        bad += [f"{f.relative_to(PKG.parent)}:{line} imports {m}" for m, line in _imports(f, module_level_only=False)
                if m == "spmd_moe.apps" or m.startswith("spmd_moe.apps.")]
    assert not bad, "layers must not import applications:\n" + "\n".join(bad)


def test_core_imports_no_framework() -> None:
    bad = []
    for f in _files():
        parts = f.relative_to(PKG).parts
        if parts[0] in ("apps", "integrations"):
            continue
        bad += [f"{f.relative_to(PKG.parent)}:{line} imports {m}" for m, line in _imports(f, module_level_only=False)
                if m.split(".")[0] in FRAMEWORKS]
    assert not bad, "the core must not import vLLM/torchtitan/transformers:\n" + "\n".join(bad)


def test_no_import_cycles_at_import_time() -> None:
    modules = {_module_name(f): f for f in _files()}
    graph: dict[str, set[str]] = {}
    for name, f in modules.items():
        deps = {m for m, _ in _imports(f, module_level_only=True) if m in modules and m != name}
        graph[name] = deps
    # A package's __init__ importing its own submodules is how packages work, not a cycle
    # worth reporting: drop edges from a submodule back up to its own package.
    for name in graph:
        graph[name] = {d for d in graph[name] if not name.startswith(d + ".")}
    cycles: list[list[str]] = []
    state: dict[str, int] = {}

    def visit(n: str, path: list[str]) -> None:
        state[n] = 1
        for d in sorted(graph[n]):
            if state.get(d) == 1:
                cycles.append(path[path.index(d):] + [d] if d in path else [n, d])
            elif d not in state:
                visit(d, path + [d])
        state[n] = 2

    for n in sorted(graph):
        if n not in state:
            visit(n, [n])
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_the_checks_see_the_package() -> None:
    """The checks above read real files: the apps, the core and a lazy import are there."""
    names = {_module_name(f) for f in _files()}
    assert {"spmd_moe.apps.cli", "spmd_moe.moe", "spmd_moe.integrations.vllm"} <= names
    cli = dict(_imports(PKG / "apps" / "cli.py", module_level_only=False))
    assert "spmd_moe.apps.demo" in cli  # imported inside main(): seen by the full walk
    assert "spmd_moe.apps.demo" not in dict(_imports(PKG / "apps" / "cli.py", module_level_only=True))
