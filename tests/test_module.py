"""module.py: ``DMPOModule`` (losses, constructor checks, fingerprint, the README's examples)."""

import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from support.builders import TINY_MODULE

from dmpo_lightning import DMPOModule, constants
from dmpo_lightning.constants import IMAGE_KEY, INDEX_KEY, LABEL_KEY
from dmpo_lightning.losses import weighted_sum

ROOT = Path(__file__).resolve().parents[1]
TINY = TINY_MODULE


def batch(n=6):
    return {
        IMAGE_KEY: torch.randn(n, 3, 32, 32),
        LABEL_KEY: torch.randint(0, 4, (n,)),
        INDEX_KEY: torch.arange(n),
    }


def test_loss_is_the_weighted_sum_of_exit_cross_entropies():
    module = DMPOModule(**TINY)
    b = batch()
    logits = module(b[IMAGE_KEY])
    loss, parts = module.compute_loss(logits, b[LABEL_KEY])
    expected = sum(
        w * F.cross_entropy(z, b[LABEL_KEY]) for w, z in zip([0.25, 0.5, 0.75, 1.0], logits, strict=False)
    )
    torch.testing.assert_close(loss, expected)
    assert set(parts) == {f"ce_exit{k}" for k in range(4)}


def test_all_weight_on_the_last_exit_trains_only_the_final_head_and_trunk():
    module = DMPOModule(**{**TINY, "peft": {"method": "linear"}}, schedule={"weight_phase1": [0, 0, 0, 1]})
    loss, _ = module.compute_loss(module(batch()[IMAGE_KEY]), batch()[LABEL_KEY])
    loss.backward()
    early = [
        p.grad
        for n, p in module.model.named_parameters()
        if n.startswith(("exits.0.", "exits.1.", "exits.2."))
    ]
    assert all(g is None or torch.count_nonzero(g) == 0 for g in early)
    assert module.model.exits[3].predictor.fc.weight.grad.abs().sum() > 0


def test_distillation_adds_a_term_for_early_exits():
    module = DMPOModule(**TINY, distill="last", distill_weight=0.5)
    loss, parts = module.compute_loss(module(batch()[IMAGE_KEY]), batch()[LABEL_KEY])
    assert {"kd_exit0", "kd_exit1", "kd_exit2"} <= set(parts)
    assert math.isfinite(loss.item())


def test_subclass_overrides_the_loss():
    class FocalDMPO(DMPOModule):
        def compute_loss(self, logits, target):
            per_exit = torch.stack(
                [
                    (
                        (1 - F.softmax(z, -1).gather(1, target[:, None]).squeeze(1)) ** 2
                        * F.cross_entropy(z, target, reduction="none")
                    ).mean()
                    for z in logits
                ]
            )
            return weighted_sum(per_exit, self.loss_weights), {}

    module = FocalDMPO(**TINY)
    b = batch()
    loss, _ = module.compute_loss(module(b[IMAGE_KEY]), b[LABEL_KEY])
    base = DMPOModule(**TINY)
    base.load_state_dict(module.state_dict())
    base_loss, _ = base.compute_loss(base(b[IMAGE_KEY]), b[LABEL_KEY])
    assert loss < base_loss  # the focal factor (1 - p)^2 < 1 shrinks every term


def test_readme_python_example_runs():
    module = DMPOModule(
        num_classes=10,
        backbone="vit_tiny_patch16_224",
        img_size=32,
        backbone_kwargs={"patch_size": 8, "embed_dim": 64, "depth": 4, "num_heads": 2},
    )
    logits = module(torch.randn(2, 3, 32, 32))
    assert len(logits) == 4 and logits[0].shape == (2, 10)
    out = module.model.forward_early_exit(torch.randn(8, 3, 32, 32), thresholds=[0.9, 0.8, 0.7, 0.0])
    assert out.prediction.shape == out.exit_index.shape == out.score.shape == (8,)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(schedule={"weight_phase1": [1, 1]}), "weight_phase1 has 2 entries but the model has 4 exits"),
        (dict(schedule={"weight_phase2": [1, -1, 1, 1]}), "weight_phase2 must be finite and >= 0"),
        (dict(exits={"blocks": [2, 1, 4]}), "must be sorted"),
        (dict(warmup_fraction=1.5), "warmup_fraction must be in"),
    ],
)
def test_constructor_validates(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DMPOModule(**{**TINY, **kwargs})


def test_readme_focal_loss_example_runs_as_printed():
    text = (ROOT / "README.md").read_text()
    (block,) = [b for b in re.findall(r"```python\n(.*?)```", text, flags=re.S) if "FocalDMPO" in b]
    namespace: dict = {}
    exec(block, namespace)  # a missing import fails here with NameError
    module = namespace["FocalDMPO"](
        num_classes=3,
        backbone="vit_tiny_patch16_224",
        img_size=32,
        backbone_kwargs={"patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2},
        exits={"blocks": [1, 2]},
        peft={"method": "full"},
    )
    loss, parts = module.compute_loss(module(torch.randn(2, 3, 32, 32)), torch.tensor([0, 2]))
    assert loss.ndim == 0 and torch.isfinite(loss) and parts == {}


def test_the_module_fingerprint_has_exactly_the_fingerprint_keys():
    module = DMPOModule(
        backbone="vit_tiny_patch16_224",
        pretrained=False,
        img_size=32,
        backbone_kwargs={"patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2},
        num_classes=3,
        exits={"blocks": 2, "early_head": "linear"},
        peft={"method": "full"},
    )
    fingerprint = module.model_fingerprint()
    assert tuple(fingerprint) == constants.THRESHOLDS_FINGERPRINT_KEYS
    assert fingerprint["exits.blocks"] == list(module.model.exit_blocks)
    assert fingerprint["peft.method"] == "full" and fingerprint["exits.early_head"] == "linear"
    assert set(constants.ARCHITECTURE_KEYS) < set(fingerprint)  # the backbone too, named as users write it
    assert not any("rule" in key for key in fingerprint)  # the exit rule is not part of the model
