"""UA-MT: Mean Teacher whose consistency counts only where the teacher's MC uncertainty is low."""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field
from torch import Tensor

from ssmis.losses.seg import entropy
from ssmis.methods.base import Batch, StepOutput, teacher_noise
from ssmis.methods.mean_teacher import ConsistencyConfig, TeacherStudent
from ssmis.registry import METHODS
from ssmis.schedules import sigmoid_ramp


def uncertainty(teacher, x: Tensor, passes: int = 8) -> Tensor:
    """Entropy of the mean softmax of `passes` stochastic teacher predictions (B×spatial).

    As the reference code: the batch is duplicated and run passes/2 times with fresh noise each time,
    so dropout (teacher in train mode) and input noise both vary between the predictions."""
    reps = 2
    stacked = x.repeat(reps, *([1] * (x.ndim - 1)))
    probs = 0
    with torch.no_grad():
        for _ in range(passes // reps):
            p = teacher(teacher_noise(stacked)).logits.float().softmax(1)
            probs = probs + p.view(reps, x.shape[0], *p.shape[1:]).sum(0)
    return entropy(probs / passes)


def threshold(step: int, total: int, num_classes: int, compat_ln2: bool) -> float:
    """H(t) = (0.75 + 0.25·r(t, T))·ln C (the reference code uses ln 2 whatever C: compat_ln2)."""
    top = math.log(2) if compat_ln2 else math.log(num_classes)
    return (0.75 + 0.25 * sigmoid_ramp(step, total)) * top


def masked_consistency(d: Tensor, mask: Tensor, num_classes: int, compat_ln2: bool) -> Tensor:
    """Σ M·d / (C·ΣM + 1e-16) for d B×K×S; the reference code hard-codes C = 2 (compat_ln2)."""
    return masked_mean(d.mean(1), mask, num_classes, compat_ln2)


def masked_mean(per_pixel: Tensor, mask: Tensor, num_classes: int, compat_ln2: bool) -> Tensor:
    """K·Σ M·ℓ / (C·ΣM + 1e-16) with ℓ = the class mean of d (B×S) and K classes: `masked_consistency` from
    per-pixel values (C = K, or the reference's fixed C = 2 with compat_ln2)."""
    c = 2 if compat_ln2 else num_classes
    m = mask.to(per_pixel.dtype)
    return (m * per_pixel).sum() * num_classes / (c * m.sum() + 1e-16)


@METHODS.register("ua_mt")
class UAMT(TeacherStudent):
    """UA-MT: uncertainty-masked Mean Teacher (8 MC teacher passes, entropy threshold ramped to ln C)."""

    class Config(ConsistencyConfig):
        name: Literal["ua_mt"] = "ua_mt"
        passes: int = Field(8, ge=2, multiple_of=2, description="Stochastic teacher predictions for the uncertainty.")
        compat_ln2: bool = Field(False, description="Reference-code form: ln 2 threshold and 2·ΣM denominator.")

    def train_step(self, lb: Batch, ub: Batch, step: int) -> StepOutput:
        sup, z_l, z_u = self.forward_both(lb, ub, step)
        t_l, t_probs = self.teacher_probs(lb, ub)
        with torch.no_grad():
            u = uncertainty(self.teacher, ub.image, self.cfg.passes)
            mask = u < threshold(step, self.ctx.total_steps, self.ctx.num_classes, self.cfg.compat_ln2)
        per_pixel, extra = self.consistency_terms(z_u, t_probs, ub.image, step)   # plug-in weights multiply M
        mask = mask.to(per_pixel.dtype) * extra
        cons = masked_mean(per_pixel, mask, self.ctx.num_classes, self.cfg.compat_ln2)
        cons = cons + self.labeled_term(z_l, t_l, lb.label, step)
        w = self.weight(step)
        return StepOutput(sup + w * cons, {"sup": sup.detach(), "cons": cons.detach(), "w": w,
                                           "mask": mask.float().mean()})
