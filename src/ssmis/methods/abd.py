"""ABD (Adaptive Bidirectional Displacement, CVPR 2024): two networks on a weak and a strong view; the least
confident patch of each view is replaced by a confident patch of the other (ABD-R, unlabelled), and for
labelled images a confident patch is replaced by the other view's least confident one, labels moved along
(ABD-I); cross pseudo-supervision on the displaced images (methods.md "ABD").

Two hosts, both as a UNet/UNet pair (the Swin-UNet of the cross-teaching code needs a pretrained checkpoint;
runs are "ABD (UNet/UNet)"): `bcp` (default, "ABD (BCP)": BCP pre-training, then BCP mixing for both
networks with one EMA teacher, ABD-R on the mixed stacks, cross terms with weight 1) and `cross_teaching`
(one stage: supervised + ABD-I + ABD-R + ramped cross pseudo-supervision).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import Tensor

from ssmis.data.mixing import abd_i, abd_r, box_mask
from ssmis.data.strong import brightness_contrast, cutmix_box, paste
from ssmis.losses import ce_dice_loss, dice_loss
from ssmis.methods.base import Batch, StepOutput
from ssmis.methods.bcp import BCP, BCPConfig, copy_weights, halves, mixed_step, pseudo_labels, split_pairs
from ssmis.registry import METHODS
from ssmis.schedules import sigmoid_ramp

# ---- strong view (ABD code/dataloaders/dataset.py: cutout_gray, then ColorJitter(0.8, 0.8, 0.8, 0.2)) ----


def cutout(image: Tensor, label: Tensor | None = None, p: float = 0.5, area: tuple[float, float] = (0.02, 0.4),
           ratio: tuple[float, float] = (0.3, 1 / 0.3)) -> tuple[Tensor, Tensor | None, Tensor]:
    """ABD's Cutout per sample with probability p: a rectangle of area U(area)·HW and aspect h/w ~ U(ratio)
    (sides truncated to integers, redrawn until it fits: the same box as UniMatch's CutMix) filled per pixel
    with random integers in {0, 1}; the label is 0 (background) on it. Returns (image, label, box B×H×W)."""
    box = cutmix_box(image.shape[0], tuple(image.shape[-2:]), p, area, ratio, device=image.device)
    fill = torch.randint(0, 2, image.shape, device=image.device).to(image.dtype)
    image = paste(image, fill, box)
    if label is not None:
        label = paste(label, torch.zeros_like(label), box)
    return image, label, box


def strong_view(image: Tensor, label: Tensor | None = None, cutout_p: float = 0.5,
                jitter: float = 0.8) -> tuple[Tensor, Tensor | None]:
    """ABD's strong view of an (already geometrically augmented) weak view: ColorJitter ∘ Cutout. The jitter
    is torchvision's ColorJitter(0.8, 0.8, 0.8, 0.2) on grey images in [0, 1], always applied: brightness and
    contrast factors ~ U(0.2, 1.8) in random order, clipped to [0, 1] (saturation and hue are no-ops on one
    channel). The strong label is the weak label with the cut-out rectangle set to background."""
    img, lab, _ = cutout(image, label, p=cutout_p)
    return brightness_contrast(img, jitter, jitter, p=1.0, clip=(0.0, 1.0)), lab


# ---- method ---------------------------------------------------------------------------------------------


class ABDConfig(BCPConfig):
    host: Literal["bcp", "cross_teaching"] = Field("bcp", description="bcp: BCP pre-training + BCP mixing for both "
                                                   "networks (default, 'ABD (BCP)'); cross_teaching: one stage, "
                                                   "ABD-I + ABD-R with ramped cross pseudo-supervision.")
    grid: int = Field(4, ge=1, description="Patches per image axis (4×4 grid: 64-pixel patches at 256, 32 at 128); "
                      "the patch side follows the image size.")
    top_k: int = Field(4, ge=1, description="Confident patches among which ABD-R's KL-matched choice picks (top_num).")
    kl_prob: float | None = Field(None, ge=0, le=1, description="Probability per sample that ABD-R uses the "
                                  "KL-matched choice, else the most confident patch; default 0.5 in the BCP host, "
                                  "1 in the cross-teaching host (as the code).")
    cutout_p: float = Field(0.5, ge=0, le=1, description="Probability of Cutout in the strong view.")
    cross_weight: float = Field(1.0, ge=0, description="BCP host: weight of the cross pseudo-supervision terms "
                                "(1 from the first self-training step, no ramp-up, as the code).")
    lambda_u: float = Field(0.1, ge=0, description="Cross-teaching host: maximum weight of the cross terms.")
    rampup: float = Field(1.0, ge=0, le=1, description="Cross-teaching host: sigmoid ramp length as a fraction of "
                          "the run (200 epochs of 150 it = 30 000 of 30 000 it).")
    epoch_len: int = Field(150, ge=1, description="Cross-teaching host: iterations per ramp 'epoch'.")
    abd_i_prob: float = Field(0.5, ge=0, le=1, description="Cross-teaching host: probability per labelled sample "
                              "that ABD-I displaces a patch.")
    abd_i_weight: float = Field(2.0, ge=0, description="Cross-teaching host: weight of the ABD-I supervised terms.")
    abd_i_until: float = Field(2 / 3, ge=0, le=1, description="Cross-teaching host: ABD-I is switched off from this "
                               "fraction of the run on (20 000 of 30 000 it).")


@METHODS.register("abd")
class ABD(BCP):
    """ABD: weak/strong UNet pair with adaptive bidirectional patch displacement (BCP host by default)."""

    provides = {}          # no plug-in slots yet (BCP's targets slot is not wired into ABD's two-network steps)

    class Config(ABDConfig):
        name: Literal["abd"] = "abd"

    spatial_dims = frozenset({2})
    find_unused_parameters = True        # DDP: f2 gets no gradient during BCP pre-training

    def build(self, ctx):
        if self.cfg.host == "bcp":
            super().build(ctx)                                     # student (f1) + EMA teacher, two stages
        else:
            self.stages = ("train",)
            self.fresh_optimizer_per_stage = False
            self.student = ctx.add("student", ctx.build_model(), trainable=True)
            self.teacher = None
            self.stage, self._entered = "train", None
        self.student2 = ctx.add("student2", ctx.build_model(), trainable=True)

    @property
    def kl_prob(self) -> float:
        if self.cfg.kl_prob is not None:
            return self.cfg.kl_prob
        return 0.5 if self.cfg.host == "bcp" else 1.0

    def stage_fractions(self) -> tuple[float, ...]:
        return super().stage_fractions() if self.cfg.host == "bcp" else (1.0,)

    def handover_stages(self) -> frozenset[str]:
        return super().handover_stages() if self.cfg.host == "bcp" else frozenset()

    def start_selftrain(self) -> None:
        """f1, f2 and the teacher all continue from the pre-trained f1, f2 with f1's optimiser state too (ABD's
        train_ACDC_BCP.py loads the pre-training checkpoint, optimiser included, into both students)."""
        super().start_selftrain()
        copy_weights(self.ctx.modules["student2"], self.ctx.modules["student"])
        self.ctx.copy_optimizer_state("student", "student2")

    def train_step(self, lb: Batch, ub: Batch | None, step: int) -> StepOutput:
        if self.stage == "pretrain":
            return super().train_step(lb, ub, step)
        if self.cfg.host == "bcp":
            return self._bcp_step(lb, ub, step)
        return self._cross_teaching_step(lb, ub, step)

    # -- BCP host --------------------------------------------------------------------------------------
    def _bcp_step(self, lb: Batch, ub: Batch, step: int) -> StepOutput:
        cfg = self.cfg
        l_a, l_b, y_a, y_b, u_a, u_b = split_pairs(lb, ub)
        ls, ys = strong_view(lb.image, lb.label, cfg.cutout_p)
        us, _ = strong_view(ub.image, None, cfg.cutout_p)
        (ls_a, ls_b), (ys_a, ys_b), (us_a, us_b) = halves(ls), halves(ys), halves(us)
        p_a, p_b = pseudo_labels(self.teacher, u_a, cfg.lcc), pseudo_labels(self.teacher, u_b, cfg.lcc)
        ps_a, ps_b = pseudo_labels(self.teacher, us_a, cfg.lcc), pseudo_labels(self.teacher, us_b, cfg.lcc)
        mask = box_mask(l_a.shape[2:], cfg.mask_ratio, l_a.device)          # one box for both views
        m1 = mixed_step(self.student, l_a, l_b, u_a, u_b, y_a, y_b, p_a, p_b, mask, cfg.u_weight)
        m2 = mixed_step(self.student2, ls_a, ls_b, us_a, us_b, ys_a, ys_b, ps_a, ps_b, mask, cfg.u_weight)
        z1 = torch.cat([m1.z_in, m1.z_out]).float()
        z2 = torch.cat([m2.z_in, m2.z_out]).float()
        ps1, ps2 = cross_dice(z1, z2)
        # ABD-R on the two mixed stacks (weak for f1, strong for f2); both networks see all displaced images
        d1, d2 = self.displace(torch.cat([m1.x_in, m1.x_out]), torch.cat([m2.x_in, m2.x_out]), z1, z2, step)
        xr = torch.cat([d1, d2])
        ps3, ps4 = cross_dice(self.student(xr).logits.float(), self.student2(xr).logits.float())
        cross = ps1 + ps2 + ps3 + ps4
        loss = m1.loss + m2.loss + cfg.cross_weight * cross
        return StepOutput(loss, {"mix1": m1.loss.detach(), "mix2": m2.loss.detach(), "cross": cross.detach()})

    def displace(self, x1: Tensor, x2: Tensor, z1: Tensor, z2: Tensor, step: int) -> tuple[Tensor, Tensor]:
        """BCP host: the displaced unlabelled images of the weak (x1, f1's logits z1) and strong (x2, f2's logits z2)
        mixed stacks: ABD-R (CAD replaces it)."""
        return abd_r(x1, x2, z1, z2, self.cfg.grid, self.cfg.top_k, self.kl_prob)

    # -- cross-teaching host ---------------------------------------------------------------------------
    def _cross_teaching_step(self, lb: Batch, ub: Batch, step: int) -> StepOutput:
        cfg, n = self.cfg, lb.image.shape[0]
        xs_l, ys = strong_view(lb.image, lb.label, cfg.cutout_p)
        xs_u, _ = strong_view(ub.image, None, cfg.cutout_p)
        z1 = self.student(torch.cat([lb.image, ub.image])).logits.float()
        z2 = self.student2(torch.cat([xs_l, xs_u])).logits.float()
        sup = ce_dice_loss(z1[:n], lb.label) + ce_dice_loss(z2[:n], ys)
        ps12 = sum(cross_dice(z1[n:], z2[n:]))
        logs = {}
        abd_i_loss = z1.new_zeros(())
        if self.abd_i_active(step):
            xi1, xi2, yi1, yi2 = abd_i(lb.image, xs_l, lb.label, ys, z1[:n], z2[:n], cfg.grid, cfg.abd_i_prob)
            xi, yi = torch.cat([xi1, xi2]), torch.cat([yi1, yi2])
            abd_i_loss = ce_dice_loss(self.student(xi).logits, yi) + ce_dice_loss(self.student2(xi).logits, yi)
            logs["abd_i"] = abd_i_loss.detach()
        d1, d2 = abd_r(ub.image, xs_u, z1[n:], z2[n:], cfg.grid, cfg.top_k, self.kl_prob)
        xr = torch.cat([d1, d2])
        ps34 = sum(cross_dice(self.student(xr).logits.float(), self.student2(xr).logits.float()))
        w = self.cross_teaching_weight(step)
        loss = sup + cfg.abd_i_weight * abd_i_loss + w * (ps12 + ps34)
        return StepOutput(loss, {"sup": sup.detach(), "cross": (ps12 + ps34).detach(), "w": w, **logs})

    def abd_i_active(self, step: int) -> bool:
        """ABD-I runs before `abd_i_until` of the run (the code: L3 = L4 = 0 after iteration 20 000 of 30 000)."""
        return step < round(self.cfg.abd_i_until * self.ctx.total_steps)

    def cross_teaching_weight(self, step: int) -> float:
        """λ(t) = λ_max·r(⌊t/150⌋, L), L = rampup·T/150."""
        cfg = self.cfg
        return cfg.lambda_u * sigmoid_ramp(step // cfg.epoch_len, cfg.rampup * self.ctx.total_steps / cfg.epoch_len)

    def after_step(self, step: int) -> None:
        if self.teacher is not None:
            super().after_step(step)                               # the teacher follows f1 only

    def eval_model(self):
        return self.ctx.modules["student"]                         # network 1, as the reference tests f1


def cross_dice(z1: Tensor, z2: Tensor) -> tuple[Tensor, Tensor]:
    """Cross pseudo-supervision with Dice: (Dice(softmax z1, argmax z2), Dice(softmax z2, argmax z1))."""
    z1, z2 = z1.float(), z2.float()
    return (dice_loss(z1.softmax(1), z2.detach().argmax(1)), dice_loss(z2.softmax(1), z1.detach().argmax(1)))


__all__ = ["ABD", "cross_dice", "cutout", "strong_view"]
