"""FORBIDDEN['partial_plus_nonpartial']: Partial plus a Replicate value or a constant
(the non-partial term is summed once per rank)."""

from spmd_moe.placement import EP, Par, Placed, Rep


def bias_added_to_a_partial(y_TD: Placed[Par[EP]], bias_D: Placed[Rep[EP]]) -> None:
    y_TD + bias_D  # E: placement rule 'partial_plus_nonpartial' on axis 'EP'
    y_TD - 1.0  # E: placement rule 'partial_plus_nonpartial' on axis 'EP'
    # A scalar on the left: mypy reports the reverse operator generically (the rule's
    # message is lost), but the expression is rejected.
    1.0 + y_TD  # E: Unsupported operand types for + ("float" and "Placed[Par[EP]]")


def augmented_assignment(r_TD: Placed[Rep[EP]], y_TD: Placed[Par[EP]]) -> None:
    r_TD *= y_TD  # E: Result type of * incompatible in assignment
