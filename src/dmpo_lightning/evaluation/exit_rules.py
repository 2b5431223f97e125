"""Re-export of :mod:`dmpo_lightning.models.exit_rules` (the exit rules live beside the model that uses them).

Kept so that ``from dmpo_lightning.evaluation.exit_rules import exit_scores`` keeps working.
"""

from dmpo_lightning.models.exit_rules import (
    EXIT_RULE_REGISTRY,
    EXIT_RULES,
    ExitRule,
    ExitRuleSpec,
    exit_score_step,
    exit_scores,
    is_local_rule,
    register_exit_rule,
    stack_exit_logits,
)

__all__ = [
    "EXIT_RULES",
    "EXIT_RULE_REGISTRY",
    "ExitRule",
    "ExitRuleSpec",
    "exit_score_step",
    "exit_scores",
    "is_local_rule",
    "register_exit_rule",
    "stack_exit_logits",
]
