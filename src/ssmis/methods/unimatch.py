"""UniMatch: FixMatch with two independent strong views and a feature-perturbation stream (Dropout2d on every
encoder level before decoding), all supervised by the weak-view pseudo-label (methods.md "UniMatch")."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from ssmis.losses import ce_dice_loss
from ssmis.methods.base import Batch, StepOutput, require_feature_perturbation
from ssmis.methods.fixmatch import WeakStrongConfig, WeakToStrong, mix_targets
from ssmis.registry import METHODS


def perturbed_forward(net: nn.Module, x: Tensor, p: float) -> tuple[Tensor, Tensor]:
    """Encoder once; decoder once on the concatenation of the clean features and of the features passed
    through Dropout2d(p) at every encoder level (so BN sees both halves, as the reference `need_fp`), through
    the model's forward (`perturb_features`), so a DDP wrapper keeps its gradient bookkeeping.
    Returns (clean logits, perturbed logits), each B×K×spatial."""
    def perturb(feats: list[Tensor]) -> list[Tensor]:
        return [torch.cat([f, F.dropout2d(f, p, training=True)]) for f in feats]

    clean, perturbed = net(x, perturb_features=perturb).logits.chunk(2)
    return clean, perturbed


@METHODS.register("unimatch")
class UniMatch(WeakToStrong):
    """UniMatch: FixMatch with two strong views and a feature-perturbed (Dropout2d 0.5) weak stream."""

    class Config(WeakStrongConfig):
        name: Literal["unimatch"] = "unimatch"
        fp_dropout: float = Field(0.5, ge=0, lt=1, description="Dropout2d probability applied to every encoder "
                                  "feature map in the feature-perturbation stream.")
        strong_weight: float = Field(0.5, ge=0, description="Weight of the two strong-view losses together "
                                     "(0.25 each in L = (L_x + 0.25 L_s1 + 0.25 L_s2 + 0.5 L_fp)/2).")
        fp_weight: float = Field(0.5, ge=0, description="Weight of the feature-perturbation loss.")

    def build(self, ctx):
        super().build(ctx)
        require_feature_perturbation(ctx.modules["student"], "UniMatch's feature perturbation")

    def train_step(self, lb: Batch, ub: Batch, step: int) -> StepOutput:
        c = self.cfg
        x_w, n = ub.image, lb.image.shape[0]
        x_mix = self.mix_images(ub)
        mix = self.partner_targets(x_mix, step)
        x_s1, box1 = self.mixed_strong_view(x_w, x_mix, step)
        x_s2, box2 = self.mixed_strong_view(x_w, x_mix, step)
        clean, perturbed = perturbed_forward(self.net, torch.cat([lb.image, x_w]), c.fp_dropout)
        z_l, z_w, z_fp = clean[:n], clean[n:], perturbed[n:]
        z_s1, z_s2 = self.net(torch.cat([x_s1, x_s2])).logits.chunk(2)
        own = self.pseudo_targets(z_w.detach().float().softmax(1), x_w, step)
        loss_x = ce_dice_loss(z_l, lb.label)
        loss_s1 = self.unsup(z_s1, mix_targets(own, mix, box1), x_w, step)
        loss_s2 = self.unsup(z_s2, mix_targets(own, mix, box2), x_w, step)
        loss_fp = self.unsup(z_fp, own, x_w, step)
        loss = (loss_x + c.strong_weight / 2 * (loss_s1 + loss_s2) + c.fp_weight * loss_fp) / 2
        return StepOutput(loss, {"sup": loss_x.detach(), "unsup_s": ((loss_s1 + loss_s2) / 2).detach(),
                                 "unsup_fp": loss_fp.detach(), "mask": own[1].float().mean()})
