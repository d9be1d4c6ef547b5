"""Mean Teacher: consistency between the student and an EMA teacher on noisy unlabelled images."""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field
from torch import Tensor

from ssmis.engine.ema import EMA
from ssmis.losses import ce_dice_loss, softmax_mse
from ssmis.methods.base import (LABELED_INPUTS, Batch, Method, MethodConfig, StepOutput, require_feature_perturbation,
                                teacher_noise)
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
    teacher_noise: bool = Field(True, description="Teacher input = unlabelled images + clip(N(0, 0.1²), ±0.2) "
                                "(SSL4MIS); false = the same images as the student (MetaSSL's MT script).")


def consistency_weight(cfg: ConsistencyConfig, step: int, total: int, spatial_dims: int) -> float:
    """λ(t) = λ_max·r(⌊t/150⌋, L) with L scaled to the run, times the 2D gate."""
    gate = cfg.gate if cfg.gate is not None else (1000 / LIT_ITERATIONS if spatial_dims == 2 else 0.0)
    if step < math.ceil(gate * total):
        return 0.0
    return cfg.lambda_u * sigmoid_ramp(step // cfg.epoch_len, cfg.rampup * total / cfg.epoch_len)


SLOT_INPUTS = frozenset({"teacher_probs", "student_logits", "student_probs", "image", "step", "network"})


class TeacherStudent(Method):
    """Shared part of MT and UA-MT: student + EMA teacher, one forward on labelled + unlabelled images.

    Plug-in slots: `inputs` (the student's unlabelled images), `features` (the student's encoder maps of the
    unlabelled images), `targets` (the teacher's probabilities), `mask` (per-pixel weights of the consistency)
    and `unsup_loss` (the per-pixel consistency), all with network = 1 (the teacher is the reference); and
    `labeled_loss` (an extra labelled term weighted like the consistency; reference = the teacher's prediction of
    the labelled images, network = 0)."""

    provides = {"inputs": frozenset({"image", "step"}), "features": frozenset({"step"}), "targets": SLOT_INPUTS,
                "mask": SLOT_INPUTS, "unsup_loss": SLOT_INPUTS, "labeled_loss": LABELED_INPUTS}

    def build(self, ctx):
        self.student = ctx.add("student", ctx.build_model(), trainable=True)
        self.teacher = ctx.add("teacher", EMA(ctx.modules["student"], self.cfg.ema_decay), trainable=False)
        if self.slot_active("features"):
            require_feature_perturbation(ctx.modules["student"], "A `features` plug-in", "plugins")

    def forward_both(self, lb: Batch, ub: Batch, step: int):
        """Supervised loss, the student's labelled and unlabelled logits from one forward (after the inputs and
        features slots)."""
        n = lb.image.shape[0]
        x_u = self.slot("inputs", ub.image, image=ub.image, step=step)
        x = torch.cat([lb.image, x_u])
        if self.slot_active("features"):
            def perturb(feats):      # the unlabelled part of every encoder map through the features slot
                out = self.slot("features", [f[n:] for f in feats], step=step)
                return [torch.cat([f[:n], g]) for f, g in zip(feats, out)]
            logits = self.student(x, perturb_features=perturb).logits
        else:
            logits = self.student(x).logits
        return ce_dice_loss(logits[:n], lb.label), logits[:n], logits[n:]

    def teacher_input(self, image: Tensor) -> Tensor:
        return teacher_noise(image) if self.cfg.teacher_noise else image

    @torch.no_grad()
    def teacher_probs(self, lb: Batch, ub: Batch) -> tuple[Tensor | None, Tensor]:
        """Teacher probabilities of the labelled images (only when the labeled_loss slot needs them: one forward
        over labelled + unlabelled, as MetaSSL's MT script) and of the unlabelled images."""
        if not self.slot_active("labeled_loss"):
            return None, self.teacher(self.teacher_input(ub.image)).logits.float().softmax(1)
        probs = self.teacher(torch.cat([lb.image, self.teacher_input(ub.image)])).logits.float().softmax(1)
        return probs[:lb.image.shape[0]], probs[lb.image.shape[0]:]

    def consistency_terms(self, z_u: Tensor, t_probs: Tensor, image: Tensor, step: int) -> tuple[Tensor, Tensor]:
        """(per-pixel squared probability difference averaged over classes B×S, per-pixel weights B×S or a
        scalar 1), after the targets, unsup_loss and mask slots."""
        inp = {}
        if len(self.ctx.plugins):
            inp = dict(teacher_probs=t_probs, student_logits=z_u, student_probs=z_u.float().softmax(1).detach(),
                       image=image, step=step, network=1)
        targets = self.slot("targets", t_probs, **inp)
        if inp:
            inp["teacher_probs"] = targets
        per_pixel = self.slot("unsup_loss", softmax_mse(z_u, targets).mean(1), **inp)
        mask = self.slot("mask", torch.ones_like(per_pixel), **inp) if self.slot_active("mask") else per_pixel.new_ones(())
        return per_pixel, mask

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
        sup, z_l, z_u = self.forward_both(lb, ub, step)
        t_l, t_u = self.teacher_probs(lb, ub)
        per_pixel, mask = self.consistency_terms(z_u, t_u, ub.image, step)
        cons = (mask * per_pixel).mean()          # a mask plug-in zeroes pixels; they still count (FixMatch's CE)
        cons = cons + self.labeled_term(z_l, t_l, lb.label, step)
        w = self.weight(step)
        return StepOutput(sup + w * cons, {"sup": sup.detach(), "cons": cons.detach(), "w": w})
