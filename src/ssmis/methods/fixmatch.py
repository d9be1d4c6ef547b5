"""FixMatch for segmentation: confident weak-view pseudo-labels supervise a strong, CutMix-ed view of the same
image (methods.md "FixMatch": the UniMatch medical code with one strong view and no feature perturbation)."""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field, field_validator
from torch import Tensor

from ssmis.data.strong import cutmix_box, paste, strong_view
from ssmis.losses import ce_dice_loss
from ssmis.losses.pseudo import pseudo_label, pseudo_label_loss
from ssmis.methods.base import Batch, Method, MethodConfig, StepOutput
from ssmis.registry import METHODS


class WeakStrongConfig(MethodConfig):
    threshold: float = Field(0.95, ge=0, le=1, description="Confidence threshold τ: only pixels whose weak-view "
                             "max softmax is ≥ τ are supervised (conf_thresh).")
    unsup_loss: Literal["dice", "ce"] = Field("dice", description="Unlabelled loss: Dice over the confident pixels "
                                              "(medical UniMatch) or CE masked by the confidence (natural-image code).")
    jitter_p: float = Field(0.8, ge=0, le=1, description="Probability of ColorJitter in the strong view.")
    brightness: float = Field(0.5, ge=0, le=1, description="ColorJitter brightness: factor ~ U(1-b, 1+b).")
    contrast: float = Field(0.5, ge=0, le=1, description="ColorJitter contrast: factor ~ U(1-c, 1+c).")
    clip: tuple[float, float] | None = Field((0.0, 1.0), description="Range the jittered image is clipped to "
                                             "(the reference clips to [0, 255] = [0, 1] of its min-max-normalised "
                                             "images); null = no clipping.")
    blur_p: float = Field(0.5, ge=0, le=1, description="Probability of Gaussian blur in the strong view.")
    blur_sigma: tuple[float, float] = Field((0.1, 2.0), description="Blur σ range in pixels at blur_ref_size.")
    blur_ref_size: int | None = Field(256, ge=1, description="Image side at which blur_sigma holds (the reference "
                                      "crop, 256); σ scales with side/blur_ref_size (×½ at 128, the ACDC-lite rule "
                                      "for pixel sizes); null = no scaling.")
    cutmix_p: float = Field(0.5, ge=0, le=1, description="Probability that a strong view gets a CutMix box.")
    cutmix_area: tuple[float, float] = Field((0.02, 0.4), description="Box area range as a fraction of H·W.")
    cutmix_ratio: float = Field(0.3, gt=0, le=1, description="Box aspect h/w ~ U(r, 1/r).")

    @field_validator("blur_sigma", "cutmix_area", "clip")
    @classmethod
    def _ordered(cls, v, info):
        if v is None:
            return v
        if not v[0] <= v[1]:
            raise ValueError(f"expected [low, high] with low <= high, got {list(v)}")
        if info.field_name == "blur_sigma" and v[0] <= 0:
            raise ValueError("blur σ must be positive")
        if info.field_name == "cutmix_area" and not (0 < v[0] and v[1] <= 1):
            raise ValueError("box areas are fractions of the image, in (0, 1]")
        return v


class WeakToStrong(Method):
    """Shared part of FixMatch and UniMatch: one network, strong views with CutMix from a mix partner whose
    pseudo-labels come from a no-grad eval-mode forward."""

    default_augment = "bcp"                # the BCP-variant RandomGenerator (methods.md, Augmentation)

    spatial_dims = frozenset({2})

    def build(self, ctx):
        self.net = ctx.add("student", ctx.build_model(), trainable=True)

    def eval_model(self):
        return self.ctx.modules["student"]

    @staticmethod
    def partner(t: Tensor) -> Tensor:
        """The mix partner of sample i is unlabelled sample i-1 of the same batch (the engine draws one
        unlabelled batch; the reference draws a second one from the same pool)."""
        return t.roll(1, 0)

    def strong(self, x: Tensor) -> Tensor:
        """The configured strong view of x, with the blur σ scaled to the image size."""
        c = self.cfg
        scale = math.sqrt(math.prod(x.shape[2:])) / c.blur_ref_size if c.blur_ref_size else 1.0
        sigma = (c.blur_sigma[0] * scale, c.blur_sigma[1] * scale)
        return strong_view(x, c.brightness, c.contrast, c.jitter_p, sigma, c.blur_p, c.clip)

    @torch.no_grad()
    def partner_targets(self, x_w: Tensor) -> tuple[Tensor, Tensor]:
        """Pseudo-labels and confidence mask of each sample's mix partner, from an eval-mode forward (as the
        reference: BN running statistics, no dropout), then the train/eval flag restored."""
        net = self.ctx.modules["student"]
        was_training = net.training
        net.eval()
        try:
            probs = net(x_w).logits.float().softmax(1)
        finally:
            net.train(was_training)
        labels, keep = pseudo_label(probs, self.cfg.threshold)
        return self.partner(labels), self.partner(keep)

    def mixed_strong_view(self, x_w: Tensor) -> tuple[Tensor, Tensor]:
        """Strong view of each sample with a CutMix box (probability cutmix_p) holding the strong view of its
        mix partner (drawn independently). Returns (image, bool box B×H×W)."""
        c = self.cfg
        own = self.strong(x_w)
        other = self.strong(self.partner(x_w))
        box = cutmix_box(x_w.shape[0], tuple(x_w.shape[2:]), c.cutmix_p, c.cutmix_area,
                         (c.cutmix_ratio, 1 / c.cutmix_ratio), x_w.device)
        return paste(own, other, box), box

    def unsup(self, logits: Tensor, labels: Tensor, keep: Tensor) -> Tensor:
        """The configured unlabelled loss (ignore-Dice or masked CE) against confident pseudo-labels."""
        return pseudo_label_loss(logits, labels, keep, self.cfg.unsup_loss)


@METHODS.register("fixmatch")
class FixMatch(WeakToStrong):
    """FixMatch: confident weak-view pseudo-labels (τ 0.95) supervise a ColorJitter/blur/CutMix strong view."""

    class Config(WeakStrongConfig):
        name: Literal["fixmatch"] = "fixmatch"

    def train_step(self, lb: Batch, ub: Batch, step: int) -> StepOutput:
        x_w, n = ub.image, lb.image.shape[0]
        mix_labels, mix_keep = self.partner_targets(x_w)
        x_s, box = self.mixed_strong_view(x_w)
        logits = self.net(torch.cat([lb.image, x_w])).logits
        z_l, z_w = logits[:n], logits[n:]
        z_s = self.net(x_s).logits
        labels, keep = pseudo_label(z_w.detach().float().softmax(1), self.cfg.threshold)
        loss_x = ce_dice_loss(z_l, lb.label)
        loss_u = self.unsup(z_s, paste(labels, mix_labels, box), paste(keep, mix_keep, box))
        return StepOutput((loss_x + loss_u) / 2, {"sup": loss_x.detach(), "unsup": loss_u.detach(),
                                                  "mask": keep.float().mean()})
