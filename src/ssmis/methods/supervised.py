"""Supervised (labels only): the lower bound every table needs; the unlabelled stream is never drawn."""

from __future__ import annotations

from typing import Literal

from ssmis.losses import ce_dice_loss
from ssmis.methods.base import Batch, Method, MethodConfig, StepOutput
from ssmis.registry import METHODS


@METHODS.register("supervised")
class Supervised(Method):
    """Labels only: 0.5·(CE + Dice) on the labelled stream; no unlabelled image is used."""

    class Config(MethodConfig):
        name: Literal["supervised"] = "supervised"

    uses_unlabeled = False

    def build(self, ctx):
        self.net = ctx.add("student", ctx.build_model(), trainable=True)

    def train_step(self, lb: Batch, ub: Batch | None, step: int) -> StepOutput:
        loss = ce_dice_loss(self.net(lb.image).logits, lb.label)
        return StepOutput(loss, {"sup": loss.detach()})

    def eval_model(self):
        return self.ctx.modules["student"]
