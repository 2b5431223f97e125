"""Re-export of :mod:`dmpo_lightning.models.exit_rules` (the exit rules live beside the model that uses them).

Kept so that ``from dmpo_lightning.evaluation.exit_rules import exit_scores`` keeps working.
"""

from dmpo_lightning.models.exit_rules import (
    EXIT_RULES,
    ExitRule,
    exit_score_step,
    exit_scores,
    stack_exit_logits,
)

__all__ = ["EXIT_RULES", "ExitRule", "exit_score_step", "exit_scores", "stack_exit_logits"]
