"""Supervised loss (methods.md "Losses"), sigmoid ramp / consistency weight and poly lr ("Optimiser, schedules")."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import small_config
from ssmis.losses.seg import ce_dice_loss, dice_loss
from ssmis.methods.base import StepOutput
from ssmis.methods.mean_teacher import MeanTeacher, consistency_weight
from ssmis.schedules import lr_factor, sigmoid_ramp


def worked_example():
    """One image, C=2, two pixels: p=(0.8,0.2) y=0 and p=(0.4,0.6) y=1; logits = log p (softmax gives p exactly)."""
    p = torch.tensor([[0.8, 0.4], [0.2, 0.6]], dtype=torch.float64)        # C×W
    logits = p.log()[None, :, None, :]                                   # 1×2×1×2
    target = torch.tensor([[[0, 1]]])                                    # 1×1×2
    return logits, target


def test_worked_example_values():
    logits, target = worked_example()
    assert torch.allclose(logits.softmax(1)[0, :, 0], torch.tensor([[0.8, 0.4], [0.2, 0.6]], dtype=torch.float64))
    ce = F.cross_entropy(logits.float(), target)
    dice = dice_loss(logits.float().softmax(1), target)
    loss = ce_dice_loss(logits.float(), target)
    assert ce.item() == pytest.approx(0.366985, abs=1e-5)
    assert dice.item() == pytest.approx(0.126983, abs=1e-5)
    assert loss.item() == pytest.approx(0.246984, abs=1e-5)
    # each class term by hand: D_0 = 0.111110, D_1 = 0.142856
    probs = logits.softmax(1)
    per_class = [1 - (2 * probs[0, c, 0, c] + 1e-5) / ((probs[0, c] ** 2).sum() + 1 + 1e-5) for c in (0, 1)]
    assert per_class[0].item() == pytest.approx(0.111110, abs=1e-5)
    assert per_class[1].item() == pytest.approx(0.142856, abs=1e-5)


def test_ce_dice_loss_casts_to_float32_and_is_differentiable():
    logits, target = worked_example()
    z = logits.to(torch.bfloat16).requires_grad_(True)
    loss = ce_dice_loss(z, target)
    assert loss.dtype == torch.float32
    loss.backward()
    assert z.grad is not None and torch.isfinite(z.grad.float()).all() and z.grad.abs().sum() > 0


def test_dice_pools_over_the_whole_batch():
    """SSL4MIS sums over the batch before the ratio; a per-image Dice gives a different value."""
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 4, 4)
    target = torch.randint(0, 3, (2, 4, 4))
    target[1] = 0                                      # image 1 has no foreground: per-image pooling differs strongly
    probs = logits.softmax(1)
    pooled = dice_loss(probs, target)
    onehot = F.one_hot(target, 3).permute(0, 3, 1, 2).float()
    inter = (probs * onehot).sum((0, 2, 3))
    ref = (1 - (2 * inter + 1e-5) / ((probs ** 2).sum((0, 2, 3)) + (onehot ** 2).sum((0, 2, 3)) + 1e-5)).mean()
    assert pooled.item() == pytest.approx(ref.item(), abs=1e-6)
    per_image = torch.stack([dice_loss(probs[i:i + 1], target[i:i + 1]) for i in range(2)]).mean()
    assert abs(per_image.item() - pooled.item()) > 0.05
    # and the loss is the batch-pooled one too
    ce = F.cross_entropy(logits, target)
    assert ce_dice_loss(logits, target).item() == pytest.approx(0.5 * (ce.item() + ref.item()), abs=1e-6)


def test_masked_dice_multiplies_mask_into_all_sums():
    """BCP's masked Dice: pixels outside the mask count nowhere (a mask of ones = the plain Dice)."""
    torch.manual_seed(1)
    probs = torch.randn(2, 3, 5, 5).softmax(1)
    target = torch.randint(0, 3, (2, 5, 5))
    assert dice_loss(probs, target, torch.ones(2, 5, 5)).item() == pytest.approx(dice_loss(probs, target).item(), abs=1e-7)
    mask = torch.zeros(2, 5, 5)
    mask[:, :2] = 1
    assert dice_loss(probs, target, mask).item() == pytest.approx(
        dice_loss(probs[:, :, :2], target[:, :2]).item(), abs=1e-6)


# ---- ramps and consistency weight ------------------------------------------------------------------

def test_sigmoid_ramp_values():
    assert sigmoid_ramp(0, 200) == pytest.approx(math.exp(-5))
    assert sigmoid_ramp(100, 200) == pytest.approx(math.exp(-5 * 0.25))
    assert sigmoid_ramp(200, 200) == 1.0
    assert sigmoid_ramp(500, 200) == 1.0          # clipped
    assert sigmoid_ramp(-3, 200) == pytest.approx(math.exp(-5))
    assert sigmoid_ramp(3, 0) == 1.0


def test_consistency_weight_at_the_literature_budget():
    """λ(t) = 0.1·r(⌊t/150⌋, 200) with T = 30 000: λ(0) = 0.1·e^-5, λ(15 000) = 0.02865, λ(30 000) = 0.1."""
    cfg = MeanTeacher.Config()
    T = 30000
    lam = lambda t, dims=3: consistency_weight(cfg, t, T, dims)  # noqa: E731
    assert lam(0) == pytest.approx(0.1 * math.exp(-5), rel=1e-9)
    assert lam(15000) == pytest.approx(0.02865, abs=5e-6)
    assert lam(30000) == pytest.approx(0.1, rel=1e-12)
    # counted in epochs of 150 iterations: constant inside an epoch, steps at its boundary
    assert lam(149) == lam(0)
    assert lam(150) > lam(149)
    assert lam(15000 + 149) == lam(15000)
    # 2D: the consistency is gated to 0 before iteration 1000 (= ceil(T/30)); 3D has no gate
    assert lam(999, 2) == 0.0
    assert lam(999, 3) > 0.0
    assert lam(1000, 2) == lam(1000, 3) > 0.0
    assert lam(15000, 2) == pytest.approx(0.02865, abs=5e-6)


def test_consistency_schedule_scales_with_the_budget():
    """At T = 300 the gate is at ceil(300/30) = 10 and the ramp is 2 'epochs' of 150 (budget-scaled)."""
    cfg = MeanTeacher.Config()
    assert consistency_weight(cfg, 9, 300, 2) == 0.0
    assert consistency_weight(cfg, 10, 300, 2) == pytest.approx(0.1 * math.exp(-5))
    assert consistency_weight(cfg, 150, 300, 2) == pytest.approx(0.1 * math.exp(-5 * 0.25))
    assert consistency_weight(cfg, 300, 300, 2) == pytest.approx(0.1)


# ---- learning-rate schedule --------------------------------------------------------------------------

def test_lr_factor_poly_and_step():
    for t in (0, 50, 99):
        assert lr_factor("poly", t, 100) == pytest.approx((1 - t / 100) ** 0.9, rel=1e-12)
    assert lr_factor("constant", 77, 100) == 1.0
    assert lr_factor("step", 2499, 6000, step_fraction=2500 / 6000) == 1.0
    assert lr_factor("step", 2500, 6000, step_fraction=2500 / 6000) == pytest.approx(0.1)
    assert lr_factor("step", 5000, 6000, step_fraction=2500 / 6000) == pytest.approx(0.01)


def test_trainer_uses_poly_lr_at_each_optimiser_step():
    """The lr in force when optimiser step t runs is 0.01·(1 − t/T)^0.9 (T = 100; t = 0, 50, 99)."""
    from ssmis.engine.run import setup

    cfg = small_config("supervised", 100)
    trainer = setup(cfg, None, log=lambda m: None)
    trainer.val_cases = []
    net = trainer.ctx.modules["student"]

    def cheap_step(lb, ub, step):                  # the loop, not the network, is under test here
        return StepOutput(sum((p * 0).sum() for p in net.parameters()) + 1.0, {})

    trainer.method.train_step = cheap_step
    seen = []
    real_step = trainer.opt.step

    def recording_step(*a, **k):
        seen.append(trainer.opt.param_groups[0]["lr"])
        return real_step(*a, **k)

    trainer.opt.step = recording_step
    trainer.fit(None, progress=False)
    assert len(seen) == 100
    for t in (0, 50, 99):
        assert seen[t] == pytest.approx(0.01 * (1 - t / 100) ** 0.9, rel=1e-12)
    assert seen[0] == 0.01
    # _set_lr itself
    assert trainer._set_lr(50) == pytest.approx(0.01 * 0.5 ** 0.9)
    assert trainer.opt.param_groups[0]["lr"] == pytest.approx(0.01 * 0.5 ** 0.9)
