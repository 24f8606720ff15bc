"""typing_rules is the single source of the static messages: each error mypy (with
spmd_moe.mypy_plugin) reports on tests/typing_snippets/bad_forbidden_*.py carries the
reason and the fix of the typing_rules entry it enforces, word for word.

(The runtime side reads typing_rules too: spmd_moe.collectives checks the input
placement ``typing_rules.input_placement(op)`` and PlacementError's "Fix:" comes from
``typing_rules.fix``; tests/test_rules_runtime.py and tests/test_typing_rules.py check those.)
"""

from __future__ import annotations

import os
import re
from collections import defaultdict

import pytest

import typing_rules

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SNIPPETS = os.path.join("tests", "typing_snippets")
_ERROR = re.compile(r"^(?P<path>[^:]+\.py):(?P<line>\d+): error: (?P<msg>.*?)(  \[(?P<code>[a-z-]+)\])?$")


@pytest.fixture(scope="module")
def errors() -> dict[str, list[tuple[int, str, str]]]:
    from mypy import api

    files = sorted(f for f in os.listdir(os.path.join(REPO, SNIPPETS)) if f.startswith("bad_forbidden_"))
    cwd = os.getcwd()
    os.chdir(REPO)
    try:
        stdout, stderr, status = api.run(
            ["--config-file", "mypy.ini", "--no-error-summary", "--show-error-codes",
             *[os.path.join(SNIPPETS, f) for f in files]]
        )
    finally:
        os.chdir(cwd)
    assert status in (0, 1), f"mypy crashed ({status}): {stderr}\n{stdout}"
    out: dict[str, list[tuple[int, str, str]]] = defaultdict(list)
    for line in stdout.splitlines():
        m = _ERROR.match(line)
        if m:
            out[os.path.basename(m["path"])].append((int(m["line"]), m["msg"], m["code"] or ""))
    return out


_OP_RULES = ("partial_nonlinear", "partial_times_partial", "partial_plus_nonpartial",
             "partial_with_varying", "invariant_mix", "partial_through_function")


@pytest.mark.parametrize("name", _OP_RULES)
def test_op_rule_messages_are_the_rules(name: str, errors: dict[str, list[tuple[int, str, str]]]) -> None:
    rule = typing_rules.FORBIDDEN[name]
    mine = [msg for _, msg, code in errors[f"bad_forbidden_{name}.py"] if code == "spmd-placement"]
    assert len(mine) >= 2, errors[f"bad_forbidden_{name}.py"]
    for msg in mine:
        assert f"placement rule '{name}'" in msg, msg
        assert rule.why in msg and f"Fix: {rule.fix}" in msg, (msg, rule)


def test_restate_messages_are_the_rule(errors: dict[str, list[tuple[int, str, str]]]) -> None:
    rule = typing_rules.FORBIDDEN["restate"]
    mine = [msg for _, msg, code in errors["bad_forbidden_restate.py"] if code == "spmd-placement"]
    assert len(mine) == 4, errors["bad_forbidden_restate.py"]
    for msg in mine:
        assert rule.why in msg and f"Fix: {rule.fix}" in msg, msg


def test_collective_messages_are_the_rules(errors: dict[str, list[tuple[int, str, str]]]) -> None:
    """A collective's forbidden pair says that rule's own reason; any other wrong input
    says collective_input's; the fix names the converting collective from the rules."""
    generic = typing_rules.FORBIDDEN["collective_input"].why
    mine = [msg for _, msg, code in errors["bad_forbidden_collective_input.py"] if code == "spmd-placement"]
    assert len(mine) >= 10, mine
    seen_pairs = set()
    for msg in mine:
        m = re.match(r"(\w+)\(\w+\) on axis \w+: expected \w+ \((\w)\), got (\w+)", msg)
        assert m, msg
        fname, want = m.group(1), m.group(2)
        rule = typing_rules.COLLECTIVE_FUNCS[fname]
        assert want == rule.inputs[0][1], msg
        got = {"Replicate": "R", "Invariant": "I", "Varying": "V", "Partial": "P"}[m.group(3)]
        if got in dict(rule.forbidden).values():
            assert rule.why in msg, msg
            seen_pairs.add((fname, got))
        else:
            assert generic in msg, msg
        fix = typing_rules.fix(want, got)
        if fix is not None:
            assert f"Fix: {fix}" in msg, msg
    every_pair = {(f, p) for f, r in typing_rules.COLLECTIVE_FUNCS.items() for _, p in r.forbidden}
    assert seen_pairs == every_pair, (seen_pairs, every_pair)
