"""Placement rules of the ops spmd_moe layers perform, as data (see ``rules``)."""

from typing_rules.rules import (
    PLACEMENT_NAMES,
    RULES,
    OpRule,
    Placement,
    converting_collectives,
    fix,
    input_placement,
    rule,
)

__all__ = [
    "PLACEMENT_NAMES", "RULES", "OpRule", "Placement", "converting_collectives", "fix",
    "input_placement", "rule",
]
