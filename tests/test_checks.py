"""models/checks.py: the argument checks every model part shares say the same sentence wherever they run."""

from __future__ import annotations

import pytest
import torch

from dmpo_lightning.models import adapters, heads
from dmpo_lightning.models.multi_exit import ExitOptions


def test_dropout_and_positive_int_are_refused_with_the_same_sentence_everywhere():
    for bad in (1.0, -0.1, float("nan")):
        with pytest.raises(ValueError, match=rf"^head_dropout must be in \[0, 1\), got {bad}$"):
            heads.build_predictor("linear", 8, 2, 1, head_dropout=bad)
        with pytest.raises(ValueError, match=rf"^exits.head_dropout must be in \[0, 1\), got {bad}$"):
            ExitOptions(head_dropout=bad)
        with pytest.raises(ValueError, match=rf"^dropout must be in \[0, 1\), got {bad}$"):
            adapters.LoRALinear(torch.nn.Linear(4, 4), dropout=bad)
    with pytest.raises(ValueError, match=r"^cov_dim must be a positive integer, got 0$"):
        heads.ISqrtCovHead(8, 2, 1, cov_dim=0)
    with pytest.raises(ValueError, match=r"^exits.cov_dim must be a positive integer, got 0$"):
        ExitOptions(cov_dim=0)
    with pytest.raises(ValueError, match=r"^lora_rank must be a positive integer, got 0$"):
        adapters.LoRALinear(torch.nn.Linear(4, 4), rank=0)
