"""The LR schedule is one torch LambdaLR (its state is the step count: a longer resume re-plans it).

Weight-decay groups are timm's.
"""

import math

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from dmpo_lightning.models.adapters import PeftOptions
from dmpo_lightning.models.multi_exit import ExitOptions, MultiExitViT
from dmpo_lightning.optim import default_optimizer, param_groups, warmup_cosine


def reference_factor(total_steps, warmup_fraction, min_factor, step):
    """The closed form of linear warm-up then cosine."""
    total_steps = max(int(total_steps), 1)
    warmup = round(total_steps * warmup_fraction)
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    return min_factor + (1 - min_factor) * 0.5 * (1 + math.cos(math.pi * progress))


def _lrs(scheduler, optimizer, steps):
    out = []
    for _ in range(steps):
        out.append([g["lr"] for g in optimizer.param_groups])
        optimizer.step()
        scheduler.step()
    return out


@pytest.mark.parametrize("total", [1, 2, 7, 10, 137])
@pytest.mark.parametrize("warmup_fraction", [0.0, 0.05, 0.1, 0.5, 1.0])
@pytest.mark.parametrize("min_factor", [0.0, 0.1])
def test_schedule_equals_the_hand_written_curve(total, warmup_fraction, min_factor):
    params = [nn.Parameter(torch.zeros(1)), nn.Parameter(torch.zeros(1))]
    opt = torch.optim.AdamW([{"params": params[:1]}, {"params": params[1:], "weight_decay": 0.0}], lr=3e-4)
    sched = warmup_cosine(opt, total, warmup_fraction, min_factor)
    got = _lrs(sched, opt, total + 1)
    want = [[3e-4 * reference_factor(total, warmup_fraction, min_factor, s)] * 2 for s in range(total + 1)]
    torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=1e-9, atol=1e-15)


def test_schedule_is_torch_and_resumes_from_its_state_dict():
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = warmup_cosine(opt, 20, 0.2)
    assert isinstance(sched, torch.optim.lr_scheduler.LambdaLR)
    _lrs(sched, opt, 7)
    state, opt_state = sched.state_dict(), opt.state_dict()
    expected = _lrs(sched, opt, 10)
    opt2 = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    sched2 = warmup_cosine(opt2, 20, 0.2)
    opt2.load_state_dict(opt_state)
    sched2.load_state_dict(state)
    torch.testing.assert_close(torch.tensor(_lrs(sched2, opt2, 10)), torch.tensor(expected))


def test_min_factor_applies_to_each_group_s_own_learning_rate():
    opt = torch.optim.SGD(
        [{"params": [nn.Parameter(torch.zeros(1))], "lr": 1.0}, {"params": [nn.Parameter(torch.zeros(1))]}],
        lr=0.1,
    )
    sched = warmup_cosine(opt, 10, 0.1, min_factor=0.1)
    last = _lrs(sched, opt, 12)[-1]
    torch.testing.assert_close(torch.tensor(last), torch.tensor([0.1, 0.01]))


@pytest.mark.parametrize("old_total, new_total", [(8, 20), (3, 40)])
def test_a_resume_with_more_steps_follows_the_new_length(old_total, new_total):
    """Resuming to train longer: the step count is restored, the cosine is that of the new length.

    A scheduler that restored its planned length would climb back and end un-decayed, and one whose type
    depends on the plan could not load a shorter plan's state at all.
    """
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = warmup_cosine(opt, old_total, 0.1)
    _lrs(sched, opt, old_total)
    state, opt_state = sched.state_dict(), opt.state_dict()
    opt2 = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    longer = warmup_cosine(opt2, new_total, 0.1)
    opt2.load_state_dict(opt_state)  # as Lightning restores a checkpoint: optimizer, then scheduler
    longer.load_state_dict(state)
    got = []
    for _ in range(new_total - old_total):  # every later step takes the new plan's rate
        opt2.step()
        longer.step()
        got.append(opt2.param_groups[0]["lr"])
    want = [reference_factor(new_total, 0.1, 0.0, s) for s in range(old_total + 1, new_total + 1)]
    assert want[-1] == 0.0  # decayed to the end of the new length
    torch.testing.assert_close(torch.tensor(got).flatten(), torch.tensor(want), rtol=1e-9, atol=1e-12)


def _model(peft):
    torch.manual_seed(0)
    vit = VisionTransformer(img_size=16, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=0)
    return MultiExitViT(
        vit, 3, ExitOptions(blocks=(1, 2), early_head="linear"), PeftOptions(peft, vpt_prompts=2)
    )


def _names(model, group):
    ids = {id(p) for p in group["params"]}
    return {n for n, p in model.named_parameters() if id(p) in ids}


def test_full_fine_tuning_does_not_decay_position_embedding_class_token_norms_and_biases():
    model = _model("full")
    groups = {g["name"]: g for g in param_groups(model)}
    assert set(groups) == {f"{c}{s}" for c in ("trunk", "bypass", "heads") for s in ("", "_no_decay")}
    trunk_no_decay = _names(model, groups["trunk_no_decay"])
    assert {"backbone.pos_embed", "backbone.cls_token"} <= trunk_no_decay
    assert (
        "backbone.blocks.0.norm1.weight" in trunk_no_decay
        and "backbone.blocks.0.attn.qkv.bias" in trunk_no_decay
    )
    trunk_decay = _names(model, groups["trunk"])
    assert "backbone.blocks.0.attn.qkv.weight" in trunk_decay and "backbone.pos_embed" not in trunk_decay
    assert all(p.ndim > 1 for p in groups["trunk"]["params"])
    assert "weight_decay" not in groups["trunk"] and groups["trunk_no_decay"]["weight_decay"] == 0.0
    # every trainable parameter in exactly one group
    listed = [id(p) for g in groups.values() for p in g["params"]]
    assert sorted(listed) == sorted(id(p) for p in model.parameters() if p.requires_grad)
    opt = default_optimizer(list(groups.values()))
    assert [g["weight_decay"] for g in opt.param_groups] == [0.05, 0.0] * 3


def test_vpt_prompts_get_no_weight_decay():
    model = _model("vpt")
    groups = {g["name"]: g for g in param_groups(model)}
    assert "trunk" not in groups  # prompts are the only trunk parameters, and they are not decayed
    assert _names(model, groups["trunk_no_decay"]) == {
        n for n, _ in model.named_parameters() if "peft_prompts" in n
    }
    assert model.no_weight_decay() >= {"backbone.pos_embed", "backbone.cls_token", "*.peft_prompts"}
