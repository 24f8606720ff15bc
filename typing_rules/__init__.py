"""Placement rules of the ops spmd_moe layers perform, as data (see ``rules``)."""

from typing_rules.rules import (
    COLLECTIVE_FUNCS,
    PLACEMENT_NAMES,
    RULES,
    OpRule,
    Placement,
    converting_collectives,
    fix,
    input_placement,
    rule,
)
from typing_rules.ops import FORBIDDEN, OPS, Forbidden, RuleViolation, join, through_function

__all__ = [
    "COLLECTIVE_FUNCS",
    "PLACEMENT_NAMES", "RULES", "OpRule", "Placement", "converting_collectives", "fix",
    "input_placement", "rule",
    "FORBIDDEN", "OPS", "Forbidden", "RuleViolation", "join", "through_function",
]
