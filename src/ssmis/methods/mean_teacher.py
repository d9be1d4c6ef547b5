"""Mean Teacher: consistency between the student and an EMA teacher on noisy unlabelled images."""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field

from ssmis.engine.ema import EMA
from ssmis.losses import ce_dice_loss, softmax_mse
from ssmis.methods.base import Batch, Method, MethodConfig, StepOutput, teacher_noise
from ssmis.registry import METHODS
from ssmis.schedules import sigmoid_ramp

LIT_ITERATIONS = 30000   # SSL4MIS budget that the published schedule constants refer to


class ConsistencyConfig(MethodConfig):
    ema_decay: float = Field(0.99, ge=0, lt=1, description="EMA decay (with SSL4MIS warm-up min(1-1/(t+1), decay)).")
    lambda_u: float = Field(0.1, ge=0, description="Maximum weight of the consistency term.")
    rampup: float = Field(1.0, ge=0, le=1, description="Sigmoid ramp length as a fraction of the run (30k it at 30k).")
    epoch_len: int = Field(150, ge=1, description="Iterations per ramp 'epoch' (SSL4MIS counts the ramp in epochs of 150).")
    gate: float | None = Field(None, ge=0, le=1, description="Zero the consistency before this fraction of the run; "
                               "default 1000/30000 in 2D, none in 3D (as the reference code).")
    eval_net: Literal["student", "teacher"] = Field("student", description="Network validated and exported "
                                                    "(the reference code evaluates the student).")


def consistency_weight(cfg: ConsistencyConfig, step: int, total: int, spatial_dims: int) -> float:
    """λ(t) = λ_max·r(⌊t/150⌋, L) with L scaled to the run, times the 2D gate."""
    gate = cfg.gate if cfg.gate is not None else (1000 / LIT_ITERATIONS if spatial_dims == 2 else 0.0)
    if step < math.ceil(gate * total):
        return 0.0
    return cfg.lambda_u * sigmoid_ramp(step // cfg.epoch_len, cfg.rampup * total / cfg.epoch_len)


class TeacherStudent(Method):
    """Shared part of MT and UA-MT: student + EMA teacher, one forward on labelled + unlabelled images."""

    def build(self, ctx):
        self.student = ctx.add("student", ctx.build_model(), trainable=True)
        self.teacher = ctx.add("teacher", EMA(ctx.modules["student"], self.cfg.ema_decay), trainable=False)

    def forward_both(self, lb: Batch, ub: Batch):
        logits = self.student(torch.cat([lb.image, ub.image])).logits
        n = lb.image.shape[0]
        return ce_dice_loss(logits[:n], lb.label), logits[n:]

    def weight(self, step: int) -> float:
        return consistency_weight(self.cfg, step, self.ctx.total_steps, self.ctx.spatial_dims)

    def after_step(self, step: int) -> None:
        self.teacher.update(self.ctx.modules["student"], step)

    def eval_model(self):
        return self.ctx.modules["student"] if self.cfg.eval_net == "student" else self.teacher.module


@METHODS.register("mean_teacher")
class MeanTeacher(TeacherStudent):
    """Mean Teacher: MSE between student and EMA-teacher probabilities on noisy unlabelled images."""

    class Config(ConsistencyConfig):
        name: Literal["mean_teacher"] = "mean_teacher"

    def train_step(self, lb: Batch, ub: Batch, step: int) -> StepOutput:
        sup, z_u = self.forward_both(lb, ub)
        with torch.no_grad():
            t_probs = self.teacher(teacher_noise(ub.image)).logits.float().softmax(1)
        cons = softmax_mse(z_u, t_probs).mean()
        w = self.weight(step)
        return StepOutput(sup + w * cons, {"sup": sup.detach(), "cons": cons.detach(), "w": w})
