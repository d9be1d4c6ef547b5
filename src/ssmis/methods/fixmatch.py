"""FixMatch for segmentation: confident weak-view pseudo-labels supervise a strong, CutMix-ed view of the same
image (methods.md "FixMatch": the UniMatch medical code with one strong view and no feature perturbation)."""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator
from torch import Tensor

from ssmis.data.strong import cutmix_box, paste, strong_view
from ssmis.losses import ce_dice_loss
from ssmis.losses.pseudo import pseudo_label, pseudo_label_loss
from ssmis.methods.base import LABELED_INPUTS, Batch, Method, MethodConfig, StepOutput
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


TARGET_INPUTS = frozenset({"teacher_probs", "image", "step"})


class WeakToStrong(Method):
    """Shared part of FixMatch and UniMatch: one network, strong views with CutMix from an independent mix batch
    whose pseudo-labels come from a no-grad eval-mode forward.

    Plug-in slots: `inputs` (each strong view), `targets` (the weak-view probabilities, before the pseudo-label),
    `mask` (the confidence mask as weights; the built-in τ still applies, method.threshold=0 turns it off) and,
    with method.unsup_loss=ce, `unsup_loss` (the per-pixel CE against the pseudo-labels; network = 0, the weak
    view of the same network is the reference)."""

    default_augment = "bcp"                # the BCP-variant RandomGenerator (methods.md, Augmentation)
    mix_batch = True                       # CutMix partners from an independent unlabelled batch (ub.mix)

    spatial_dims = frozenset({2})
    provides = {"inputs": frozenset({"image", "step"}), "targets": TARGET_INPUTS, "mask": TARGET_INPUTS,
                "unsup_loss": TARGET_INPUTS | {"student_logits", "student_probs", "network", "pseudo_labels"}}

    def slots(self) -> dict[str, frozenset[str]]:
        out = super().slots()
        if self.cfg.unsup_loss != "ce":          # the Dice term has no per-pixel loss to hand over
            out.pop("unsup_loss")
        return out

    def build(self, ctx):
        self.net = ctx.add("student", ctx.build_model(), trainable=True)

    def eval_model(self):
        return self.ctx.modules["student"]

    @staticmethod
    def mix_images(ub: Batch) -> Tensor:
        """The CutMix partners: an unlabelled batch drawn independently of ub (its own stream, augmentation
        and strong views), as UniMatch's second unlabelled loader; the engine hands it over as ub.mix."""
        if ub.mix is None:
            raise ValueError("FixMatch/UniMatch need the independent mix batch (ub.mix) that the trainer draws "
                             "for methods with mix_batch = True")
        return ub.mix.image

    def strong(self, x: Tensor) -> Tensor:
        """The configured strong view of x, with the blur σ scaled to the image size."""
        c = self.cfg
        scale = math.sqrt(math.prod(x.shape[2:])) / c.blur_ref_size if c.blur_ref_size else 1.0
        sigma = (c.blur_sigma[0] * scale, c.blur_sigma[1] * scale)
        return strong_view(x, c.brightness, c.contrast, c.jitter_p, sigma, c.blur_p, c.clip)

    @torch.no_grad()
    def pseudo_targets(self, probs: Tensor, x_w: Tensor, step: int) -> tuple[Tensor, Tensor, Tensor]:
        """(hard pseudo-labels, confidence mask, probabilities) from weak-view probabilities, through the targets
        and mask slots (the mask is bool without mask plug-ins, weights with them)."""
        inp = dict(image=x_w, step=step) if len(self.ctx.plugins) else {}
        probs = self.slot("targets", probs, teacher_probs=probs, **inp) if inp else probs
        labels, keep = pseudo_label(probs, self.cfg.threshold)
        if self.slot_active("mask"):
            keep = self.slot("mask", keep.float(), teacher_probs=probs, **inp)
        return labels, keep, probs

    @torch.no_grad()
    def partner_targets(self, x_mix: Tensor, step: int) -> tuple[Tensor, Tensor, Tensor]:
        """Pseudo-labels, confidence mask and probabilities of the mix partners, from an eval-mode forward (as
        the reference: BN running statistics, no dropout), then the train/eval flag restored."""
        net = self.ctx.modules["student"]
        was_training = net.training
        net.eval()
        try:
            probs = net(x_mix).logits.float().softmax(1)
        finally:
            net.train(was_training)
        return self.pseudo_targets(probs, x_mix, step)

    def mixed_strong_view(self, x_w: Tensor, x_mix: Tensor, step: int) -> tuple[Tensor, Tensor]:
        """Strong view of each sample with a CutMix box (probability cutmix_p) holding a strong view of its mix
        partner (drawn independently for every call), then the inputs slot. Returns (image, bool box B×H×W)."""
        c = self.cfg
        own = self.strong(x_w)
        other = self.strong(x_mix)
        box = cutmix_box(x_w.shape[0], tuple(x_w.shape[2:]), c.cutmix_p, c.cutmix_area,
                         (c.cutmix_ratio, 1 / c.cutmix_ratio), x_w.device)
        return self.slot("inputs", paste(own, other, box), image=x_w, step=step), box

    def unsup(self, logits: Tensor, targets: tuple[Tensor, Tensor, Tensor], x_w: Tensor, step: int) -> Tensor:
        """The configured unlabelled loss (ignore-Dice or masked CE) against confident pseudo-labels; targets =
        (labels, mask, probabilities). With unsup_loss plug-ins the per-pixel CE goes through that slot."""
        labels, keep, probs = targets
        if not self.slot_active("unsup_loss"):
            return pseudo_label_loss(logits, labels, keep, self.cfg.unsup_loss)
        ce = F.cross_entropy(logits.float(), labels.long(), reduction="none")
        ce = self.slot("unsup_loss", ce, teacher_probs=probs, student_logits=logits,
                       student_probs=logits.detach().float().softmax(1), image=x_w, step=step, network=0,
                       pseudo_labels=labels)
        return (ce * keep.to(ce.dtype)).sum() / ce.numel()


@torch.no_grad()
def confidence_logs(labels: Tensor, keep: Tensor, num_classes: int) -> dict[str, Tensor]:
    """What the weak view's pseudo-labels look like this step (for diagnosing a collapse towards background):
    `pred_fg` = share of pixels predicted foreground, `conf_c<k>` = share of pixels confidently labelled k
    (the mask as weights), `conf_fg` = their sum over the foreground classes."""
    keep = keep.float()
    out = {"pred_fg": (labels != 0).float().mean()}
    for k in range(num_classes):
        out[f"conf_c{k}"] = (keep * (labels == k)).mean()
    out["conf_fg"] = sum(out[f"conf_c{k}"] for k in range(1, num_classes))
    return out


def mix_targets(own: tuple[Tensor, ...], other: tuple[Tensor, ...], box: Tensor) -> tuple[Tensor, ...]:
    """Each of (labels, mask, probabilities) of the partner inside the CutMix box, the sample's own outside."""
    return tuple(paste(a, b, box) for a, b in zip(own, other))


@METHODS.register("fixmatch")
class FixMatch(WeakToStrong):
    """FixMatch: confident weak-view pseudo-labels (τ 0.95) supervise a ColorJitter/blur/CutMix strong view."""

    class Config(WeakStrongConfig):
        name: Literal["fixmatch"] = "fixmatch"

    # labeled_loss: an extra labelled term added to the unlabelled loss; reference = the network's own prediction
    # of the labelled images (one network, one view of them: every labelled pixel is "unanimous")
    provides = {**WeakToStrong.provides, "labeled_loss": LABELED_INPUTS}

    def train_step(self, lb: Batch, ub: Batch, step: int) -> StepOutput:
        x_w, n = ub.image, lb.image.shape[0]
        x_mix = self.mix_images(ub)
        mix = self.partner_targets(x_mix, step)
        x_s, box = self.mixed_strong_view(x_w, x_mix, step)
        logits = self.net(torch.cat([lb.image, x_w])).logits
        z_l, z_w = logits[:n], logits[n:]
        z_s = self.net(x_s).logits
        own = self.pseudo_targets(z_w.detach().float().softmax(1), x_w, step)
        loss_x = ce_dice_loss(z_l, lb.label)
        loss_u = self.unsup(z_s, mix_targets(own, mix, box), x_w, step)
        loss_u = loss_u + self.labeled_term(z_l, z_l.detach().float().softmax(1), lb.label, step)
        return StepOutput((loss_x + loss_u) / 2, {"sup": loss_x.detach(), "unsup": loss_u.detach(),
                                                  "mask": own[1].float().mean(),
                                                  **confidence_logs(own[0], own[1], self.ctx.num_classes)})
