"""BCP (Bidirectional Copy-Paste, CVPR 2023): labelled-only copy-paste pre-training, then self-training in
which labelled and unlabelled images are mixed in both directions with one box mask and an EMA teacher gives
the pseudo-labels of the unlabelled parts (methods.md "BCP").

The reusable pieces (ABD, M3HL and CAD build on them): `split_pairs`, `pseudo_labels` (teacher argmax +
per-class largest connected component), `largest_component_per_class`, `mix_loss` (region-weighted masked
Dice + CE), `pretrain_step` and `mixed_step` (one network's BCP self-training forward and loss).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from ssmis.data.mixing import bidirectional_mix, box_mask, mix
from ssmis.engine.ema import EMA
from ssmis.eval.postprocess import largest_component_per_class as largest_component
from ssmis.errors import UserError
from ssmis.losses import dice_loss
from ssmis.methods.base import LABELED_INPUTS, Batch, Method, MethodConfig, StepOutput
from ssmis.plugins.base import reduce_pixels
from ssmis.registry import METHODS

MASKED_DICE_SMOOTH = 1e-10   # BCP code/utils/losses.py `_dice_mask_loss` (methods.md "Losses")


# ---- pieces ---------------------------------------------------------------------------------------------


def halves(x: Tensor, where: str = "train.labeled_bs") -> tuple[Tensor, Tensor]:
    """The a/b sub-batches of BCP (first and second half); the batch must have an even size."""
    n = x.shape[0]
    if n % 2 or n == 0:
        raise UserError(where, f"BCP splits each batch into two equal halves, got {n} images",
                        "Use an even batch size.")
    return x[: n // 2], x[n // 2:]


def split_pairs(lb: Batch, ub: Batch) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(l_a, l_b, y_a, y_b, u_a, u_b): labelled and unlabelled halves, which are mixed pairwise."""
    if ub is None or lb.image.shape[0] != ub.image.shape[0]:
        got = "none" if ub is None else ub.image.shape[0]
        raise UserError("train.unlabeled_bs", f"BCP mixes labelled and unlabelled images pairwise: "
                        f"{lb.image.shape[0]} labelled but {got} unlabelled per step",
                        "Set train.unlabeled_bs equal to train.labeled_bs.")
    l_a, l_b = halves(lb.image)
    y_a, y_b = halves(lb.label)
    u_a, u_b = halves(ub.image, "train.unlabeled_bs")
    return l_a, l_b, y_a, y_b, u_a, u_b


def largest_component_per_class(labels: Tensor, num_classes: int) -> Tensor:
    """Per sample and per foreground class keep only the largest connected component (full connectivity:
    8 in 2D as skimage's default, 26 in 3D); removed pixels become background, an absent class stays absent.
    labels: B×spatial integer map; each sample is processed on its own (ACDC: per slice)."""
    arr = labels.detach().cpu().numpy()
    out = np.stack([largest_component(a, num_classes) for a in arr])     # ties: first in raster order
    return torch.from_numpy(out).to(labels.device)


@torch.no_grad()
def pseudo_labels(teacher: nn.Module, image: Tensor, lcc: bool = True,
                  refine: Callable[[Tensor], Tensor] | None = None, with_probs: bool = False):
    """Teacher argmax of softmax (one forward per call, as the reference), then per-class LCC (ACDC). `refine`
    (probabilities -> probabilities, the targets slot) acts before the argmax. with_probs: return
    (labels, the probabilities the argmax was taken of)."""
    logits = teacher(image).logits.float()
    probs = None if refine is None and not with_probs else logits.softmax(1)
    if refine is not None:
        probs = refine(probs)
    pred = logits.argmax(1) if refine is None else probs.argmax(1)
    labels = largest_component_per_class(pred, logits.shape[1]) if lcc else pred
    return (labels, probs) if with_probs else labels


def mix_loss(logits: Tensor, y_out: Tensor, y_in: Tensor, mask: Tensor, w_out: float,
             w_in: float, maps: bool = False):
    """BCP's region-weighted loss on one mixed batch: target y_out where M = 1 (outside the box, weight w_out)
    and y_in where M = 0 (inside, weight w_in). Returns (Dice, CE):

    Dice = w_out·Dice_M(p, y_out) + w_in·Dice_{1−M}(p, y_in)          (BCP masked Dice, smooth 1e-10)
    CE   = w_out·Σ CE(z, y_out)·M / ΣM + w_in·Σ CE(z, y_in)·(1 − M) / Σ(1 − M)
    maps: also return the per-pixel CE maps (CE(z, y_out), CE(z, y_in)) over the whole image."""
    logits = logits.float()
    probs = logits.softmax(1)
    m_out = mask.to(logits.device, torch.float32).expand(y_out.shape)
    m_in = 1 - m_out
    dice = (w_out * dice_loss(probs, y_out, m_out, smooth=MASKED_DICE_SMOOTH)
            + w_in * dice_loss(probs, y_in, m_in, smooth=MASKED_DICE_SMOOTH))
    ce_out = F.cross_entropy(logits, y_out.long(), reduction="none")
    ce_in = F.cross_entropy(logits, y_in.long(), reduction="none")
    ce = (w_out * (ce_out * m_out).sum() / (m_out.sum() + 1e-16)
          + w_in * (ce_in * m_in).sum() / (m_in.sum() + 1e-16))
    return (dice, ce, (ce_out, ce_in)) if maps else (dice, ce)


def pretrain_step(net: nn.Module, lb: Batch, mask_ratio: float) -> StepOutput:
    """Stage 1: copy-paste between the two labelled halves, x = x_a⊙M + x_b⊙(1 − M), both regions weight 1,
    L = (Dice + CE)/2. No unlabelled image is used."""
    l_a, l_b = halves(lb.image)
    y_a, y_b = halves(lb.label)
    mask = box_mask(l_a.shape[2:], mask_ratio, l_a.device)
    dice, ce = mix_loss(net(mix(l_a, l_b, mask)).logits, y_a, y_b, mask, 1.0, 1.0)
    loss = (dice + ce) / 2
    return StepOutput(loss, {"mix_dice": dice.detach(), "mix_ce": ce.detach()})


@dataclass
class MixedStep:
    """One network's BCP self-training forward: the two mixed inputs, their logits and the loss."""
    loss: Tensor        # (Dice_in + Dice_out + CE_in + CE_out) / 2
    dice: Tensor
    ce: Tensor
    x_in: Tensor        # u_a outside, l_a inside the box
    x_out: Tensor       # l_b outside, u_b inside
    z_in: Tensor        # logits (as the network returned them)
    z_out: Tensor
    ce_u: Tensor        # per-pixel CE against the pseudo-labels, X_in then X_out (2B×spatial, whole images)
    ce_l: Tensor        # per-pixel CE against the labels, X_in then X_out


def mixed_step(net: nn.Module, l_a: Tensor, l_b: Tensor, u_a: Tensor, u_b: Tensor, y_a: Tensor, y_b: Tensor,
               p_a: Tensor, p_b: Tensor, mask: Tensor, u_weight: float = 0.5) -> MixedStep:
    """Stage 2 for one network: X_in (target p̂_a outside with weight u_weight, y_a inside with weight 1) and
    X_out (y_b outside with weight 1, p̂_b inside with weight u_weight), one forward each as the reference."""
    x_in, x_out = bidirectional_mix(l_a, l_b, u_a, u_b, mask)
    z_in, z_out = net(x_in).logits, net(x_out).logits
    d_in, c_in, (in_u, in_l) = mix_loss(z_in, p_a, y_a, mask, u_weight, 1.0, maps=True)
    d_out, c_out, (out_l, out_u) = mix_loss(z_out, y_b, p_b, mask, 1.0, u_weight, maps=True)
    dice, ce = d_in + d_out, c_in + c_out
    return MixedStep((dice + ce) / 2, dice, ce, x_in, x_out, z_in, z_out, torch.cat([in_u, out_u]),
                     torch.cat([in_l, out_l]))


def per_half_region_weights(region: Tensor) -> Tensor:
    """region / (its pixel count in each half of the batch): Σ weights·ℓ = mean over the first half's region + mean
    over the second half's (BCP's two mixed batches X_in and X_out, each reduced over its own region)."""
    return torch.cat([h / (h.sum() + 1e-16) for h in region.chunk(2)])


def copy_weights(dst: nn.Module, src: nn.Module) -> None:
    """dst <- src, parameters and buffers (BN statistics included)."""
    with torch.no_grad():
        dst.load_state_dict(src.state_dict())


# ---- method ---------------------------------------------------------------------------------------------


class BCPConfig(MethodConfig):
    pretrain: float = Field(0.25, gt=0, lt=1, description="Share of the run spent in labelled-only pre-training "
                            "(reference ACDC: 10 000 of 10 000 + 30 000 it; ACDC-lite: 500 of 2000).")
    mask_ratio: float = Field(2 / 3, gt=0, lt=1, description="Side of the zero box per axis as a fraction of the "
                              "image side (⌊⅔·256⌋ = 170, ⌊⅔·128⌋ = 85).")
    u_weight: float = Field(0.5, ge=0, description="Weight of the pseudo-labelled (unlabelled) region in the "
                            "mixed loss.")
    ema_decay: float = Field(0.99, ge=0, lt=1, description="Fixed EMA decay of the teacher, over the whole state "
                             "dict (BN statistics included), from the pre-trained student.")
    lcc: bool = Field(True, description="Keep only the largest connected component per class of the teacher's "
                      "pseudo-labels (per slice in 2D), as the ACDC code.")
    fresh_optimizer: bool = Field(False, description="Start self-training with empty optimiser state (BCP-LA); "
                                  "the ACDC code restores the pre-training optimiser state (default).")
    selftrain_from: Literal["best", "last"] = Field(
        "best", description="Self-training starts from the best-validated pre-training state (networks and "
        "optimiser, as the ACDC code loads its best pre-training checkpoint; the pre-training stage is also "
        "validated at its last step) or from the last pre-training step. With 'best' the best checkpoint of the run "
        "is chosen among the self-training validations only, as the reference.")


@METHODS.register("bcp")
class BCP(Method):
    """BCP: bidirectional labelled/unlabelled copy-paste with EMA-teacher pseudo-labels, after pre-training."""

    default_augment = "bcp"                # the BCP-variant RandomGenerator (methods.md, Augmentation)

    class Config(BCPConfig):
        name: Literal["bcp"] = "bcp"
        eval_net: Literal["student", "teacher"] = Field("student", description="Network validated and exported "
                                                        "(the reference code saves and tests the student).")

    stages = ("pretrain", "selftrain")
    # plug-ins (self-training): `targets` refines the teacher's probabilities on the unlabelled images before argmax
    # and LCC; `unsup_loss` gets the per-pixel CE of both mixed images against the pseudo-labels (network = 1, the
    # teacher), `pixel_weights` = 1/|region| on each image's pseudo-labelled region, so the plain reduction is BCP's
    # own sum of two region means; `labeled_loss` adds a term on the labelled regions (reference = the teacher's
    # prediction of the labelled images, network = 0).
    provides = {"targets": frozenset({"teacher_probs", "image", "step"}),
                "unsup_loss": frozenset({"teacher_probs", "student_logits", "student_probs", "image", "step", "network",
                                         "pseudo_labels", "pixel_weights"}),
                "labeled_loss": LABELED_INPUTS | {"pixel_weights"}}

    def build(self, ctx):
        self.fresh_optimizer_per_stage = self.cfg.fresh_optimizer
        self.student = ctx.add("student", ctx.build_model(), trainable=True)
        self.teacher = ctx.add("teacher", EMA(ctx.modules["student"], self.cfg.ema_decay, warmup=False, buffers=True),
                               trainable=False)
        self.stage = self.stages[0]
        self._entered: str | None = None       # last stage whose start-of-stage work was done (checkpointed)

    def stage_fractions(self) -> tuple[float, ...]:
        return (self.cfg.pretrain, 1.0 - self.cfg.pretrain)

    def handover_stages(self) -> frozenset[str]:
        return frozenset({"pretrain"}) if self.cfg.selftrain_from == "best" else frozenset()

    def on_stage_start(self, stage: str, resumed: bool) -> None:
        # A run resumed exactly at the first step of self-training has not started it yet, although the engine
        # says resumed=True: the checkpointed `_entered` tells (it falls back on `resumed` for old checkpoints).
        started = (self._entered == stage) if self._entered is not None else resumed
        self.stage = stage
        if stage == "selftrain" and not started:
            self.start_selftrain()
        self._entered = stage

    def start_selftrain(self) -> None:
        """Student and teacher both continue from the pre-trained student (the engine has restored the best
        pre-training state, optimiser included, when `selftrain_from` is 'best')."""
        copy_weights(self.teacher.module, self.ctx.modules["student"])

    def train_step(self, lb: Batch, ub: Batch | None, step: int) -> StepOutput:
        if self.stage == "pretrain":
            return pretrain_step(self.student, lb, self.cfg.mask_ratio)
        l_a, l_b, y_a, y_b, u_a, u_b = split_pairs(lb, ub)
        if self.slot_active("unsup_loss") or self.slot_active("labeled_loss"):
            return self.slotted_step(l_a, l_b, y_a, y_b, u_a, u_b, step)
        p_a = pseudo_labels(self.teacher, u_a, self.cfg.lcc, self.targets_slot(u_a, step))
        p_b = pseudo_labels(self.teacher, u_b, self.cfg.lcc, self.targets_slot(u_b, step))
        mask = box_mask(l_a.shape[2:], self.cfg.mask_ratio, l_a.device)
        m = mixed_step(self.student, l_a, l_b, u_a, u_b, y_a, y_b, p_a, p_b, mask, self.cfg.u_weight)
        return StepOutput(m.loss, {"mix_dice": m.dice.detach(), "mix_ce": m.ce.detach()})

    def slotted_step(self, l_a: Tensor, l_b: Tensor, y_a: Tensor, y_b: Tensor, u_a: Tensor, u_b: Tensor,
                     step: int) -> StepOutput:
        """The self-training step with its CE terms through the unsup_loss / labeled_loss slots: the same
        forwards and Dice terms; with identity plug-ins the loss equals `mixed_step`'s."""
        cfg = self.cfg
        p_a, probs_a = pseudo_labels(self.teacher, u_a, cfg.lcc, self.targets_slot(u_a, step), with_probs=True)
        p_b, probs_b = pseudo_labels(self.teacher, u_b, cfg.lcc, self.targets_slot(u_b, step), with_probs=True)
        p_u = torch.cat([p_a, p_b])
        mask = box_mask(l_a.shape[2:], cfg.mask_ratio, l_a.device)
        m = mixed_step(self.student, l_a, l_b, u_a, u_b, y_a, y_b, p_a, p_b, mask, cfg.u_weight)
        z = torch.cat([m.z_in, m.z_out]).float()
        m_out = mask.expand(y_a.shape).float()
        # pixels of each image's unlabelled (u_a outside the box in X_in, u_b inside in X_out) and labelled regions
        region_u = torch.cat([m_out, 1 - m_out])
        region_l = 1 - region_u
        # the slots' reduction weights carry BCP's own factors (u_weight, the final /2): without plug-ins the loss is
        # mixed_step's, and a plug-in's reduced value enters the loss as it is
        w_u = cfg.u_weight / 2 * per_half_region_weights(region_u)
        w_l = per_half_region_weights(region_l)
        ce_u = self.slot("unsup_loss", m.ce_u, teacher_probs=torch.cat([probs_a, probs_b]), student_logits=z,
                         student_probs=z.detach().softmax(1), image=torch.cat([u_a, u_b]), step=step, network=1,
                         pseudo_labels=p_u, pixel_weights=w_u)
        unsup = reduce_pixels(ce_u, w_u)
        y = torch.cat([y_a, y_b]).long()
        ce_l = (w_l * m.ce_l).sum()
        extra = z.new_zeros(())
        if self.slot_active("labeled_loss"):
            with torch.no_grad():
                t_l = torch.cat([self.teacher(x).logits.float().softmax(1) for x in (l_a, l_b)])
            extra = self.labeled_term(z, t_l, y, step, network=0, pixel_weights=w_l / 2)
        loss = (m.dice + ce_l) / 2 + unsup + extra
        return StepOutput(loss, {"mix_dice": m.dice.detach(), "mix_ce": (ce_l + 2 * unsup).detach(),
                                 "unsup": unsup.detach(), "labeled_extra": extra.detach()})

    def targets_slot(self, image: Tensor, step: int) -> Callable[[Tensor], Tensor] | None:
        if not self.slot_active("targets"):
            return None
        return lambda probs: self.slot("targets", probs, teacher_probs=probs, image=image, step=step)

    def after_step(self, step: int) -> None:
        if self.stage == "selftrain":
            self.teacher.update(self.ctx.modules["student"], step)

    def eval_model(self):
        if getattr(self.cfg, "eval_net", "student") == "teacher":
            return self.teacher.module
        return self.ctx.modules["student"]

    def extra_state(self) -> dict[str, Any]:
        return {"entered_stage": self._entered}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self._entered = state.get("entered_stage")
