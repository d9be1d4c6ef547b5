"""MetaSSL's heterogeneous loss as a plug-in (methods.md "MetaSSL"; HiLab-git/MetaSSL, TMI 2025).

Pixels are split by whether the supervised prediction agrees with a reference prediction (A) and whether a
confidence passes a class-wise adaptive threshold (C) into four regions, weighted in decreasing order:
Unanimous-Confident (UC, split into foreground and background terms), Unanimous-Suspicious (US),
Discrepant-Confident (DC) and Discrepant-Suspicious (DS). Each region contributes w_R·Σ_{i∈R} ℓ_i / (|R| + 1),
pooled over the batch part.

* `unsup_loss` slot (unlabelled images): ℓ = CE(student logits, reference hard label); A = [ŷ_n = ŷ_r];
  C = [c_r > τ^r_{ŷ_r}] on the reference's confidence, with the reference network's unlabelled thresholds. The
  host's own per-pixel loss is replaced (Mean Teacher's MSE becomes this CE, as in the MetaSSL scripts).
* `labeled_loss` slot (labelled images, optional): ℓ = CE(student logits, ground truth); A = agreement of the
  student with the reference on the labelled images; C on the student's own confidence against its labelled
  thresholds. The host adds this term with its unlabelled weight (λ(t) in MT and CPS).
* Thresholds: per network (the host's `network` input: 0 = student / net 1, 1 = teacher / net 2), per data part,
  per class; initialised at 0.9 and, every call, *before* the regions are built, updated with the pixels of that
  batch part: τ_k ← ½·Σ_{ŷ=k} c / (N_k + 1) + ½·τ_k (statistics summed over DDP processes), capped at 0.9 in 3D.

Where the host reduces the returned value as Σ pixel_weights·value (see ssmis.plugins.base), the plug-in returns
ℓ_i·f_i / pixel_weight_i with f_i = w_R(i) / (|R(i)| + 1), so that the host's reduction is exactly the
heterogeneous loss; regions count only pixels the host supervises (pixel weight > 0).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator
from torch import Tensor

from ssmis.plugins.base import Plugin, PluginConfig, SlotInputs, sum_over_processes
from ssmis.registry import PLUGINS
from ssmis.schedules import sigmoid_ramp

REGIONS = ("UC_fg", "UC_bg", "US", "DC", "DS")
NETWORKS = 2                 # student / net 1 and teacher / net 2
UNLABELED, LABELED = 0, 1    # the data parts that keep their own thresholds

Weights = tuple[float, float, float, float]


def exponential_weights(w0: float, rho: float, gamma: float) -> Weights:
    """w_k = w0·exp(−(k·ρ)^γ) for k = 0…3 = UC, US, DC, DS (MetaSSL's CPS-2D rule)."""
    return tuple(w0 * math.exp(-((k * rho) ** gamma)) for k in range(4))  # type: ignore[return-value]


def regions(agree: Tensor, label: Tensor, conf: Tensor, tau: Tensor, compat_2d_bug: bool = False) -> dict[str, Tensor]:
    """The five region masks (bool, shape of `agree`): C = [conf > τ_label] (strictly greater), UC = A ∧ C split
    by label ≠ 0 (UC_fg) / label = 0 (UC_bg), US = A ∧ ¬C, DC = ¬A ∧ C, DS = ¬A ∧ ¬C. `compat_2d_bug` builds UC_fg
    with label = 0 as the released 2D code does (foreground UC gets no loss, background UC counts twice)."""
    confident = conf > tau.to(conf.device)[label]
    uc = agree & confident
    background = label == 0
    return {"UC_fg": uc & (background if compat_2d_bug else ~background), "UC_bg": uc & background,
            "US": agree & ~confident, "DC": ~agree & confident, "DS": ~agree & ~confident}


def heterogeneous_factors(masks: dict[str, Tensor], weights: Weights, support: Tensor) -> Tensor:
    """Per-pixel f with Σ f·ℓ = Σ_R w_R·Σ_{i∈R} ℓ_i / (|R| + 1), regions restricted to `support` (bool)."""
    w = {"UC_fg": weights[0], "UC_bg": weights[0], "US": weights[1], "DC": weights[2], "DS": weights[3]}
    f = torch.zeros(support.shape, device=support.device)
    for name in REGIONS:
        r = masks[name] & support
        f = f + r.float() * (w[name] / (float(r.sum()) + 1.0))
    return f


def heterogeneous_loss(loss: Tensor, masks: dict[str, Tensor], weights: Weights,
                       support: Tensor | None = None) -> Tensor:
    """Σ_R w_R·mean_R(ℓ) with mean_R = Σ_{i∈R} ℓ_i / (|R| + 1) (the scalar the plug-in makes the host compute)."""
    support = torch.ones_like(loss, dtype=torch.bool) if support is None else support
    return (heterogeneous_factors(masks, weights, support) * loss.float()).sum()


@PLUGINS.register("metassl")
class MetaSSL(Plugin):
    """MetaSSL: four-region heterogeneous loss (UC > US > DC > DS) with class-wise adaptive thresholds."""

    class Config(PluginConfig):
        name: Literal["metassl"] = "metassl"
        w0: float = Field(50.0, ge=0, description="Unlabelled UC weight of the exponential rule w_k = w0·exp(−(kρ)^γ).")
        rho: float = Field(0.6, ge=0, description="Unlabelled ρ of the exponential rule (CPS-2D code).")
        gamma: float = Field(3.0, gt=0, description="Unlabelled γ (ressetion_factor) of the exponential rule.")
        w0_labeled: float = Field(85.0, ge=0, description="Labelled UC weight (w_confident_label).")
        rho_labeled: float = Field(0.3, ge=0, description="Labelled ρ (ratio_label).")
        gamma_labeled: float = Field(3.0, gt=0, description="Labelled γ.")
        weights: tuple[float, float, float, float] | None = Field(
            None, description="Explicit unlabelled weights (UC, US, DC, DS), overriding the rule; e.g. the MT-2D "
            "script's [50, 40, 0.2048, 6.4].")
        weights_labeled: tuple[float, float, float, float] | None = Field(
            None, description="Explicit labelled weights (UC, US, DC, DS); MT-2D script: [50, 35.71, 18.22, 25.51].")
        labeled: bool = Field(True, description="Also apply the heterogeneous loss to labelled images "
                              "(needs the host's labeled_loss slot).")
        init: float = Field(0.9, ge=0, le=1, description="Initial threshold of every class, network and part.")
        momentum: float = Field(0.5, ge=0, lt=1, description="Weight of the old threshold in each update (α = 0.5).")
        cap: float | Literal["auto"] | None = Field(
            "auto", description="Upper bound of the thresholds: auto = 0.9 in 3D (MetaSSL 3D), none in 2D.")
        weight: Literal["host", "ramp"] = Field(
            "host", description="host: the host's own unlabelled weight applies (MT and CPS: λ(t) = 0.1·ramp, as in "
            "the MetaSSL scripts); ramp: the plug-in applies MetaSSL's λ(t) = lambda_max·r(⌊t/epoch_len⌋, "
            "rampup·T/epoch_len) itself, for hosts that weight their unlabelled loss 1 from the start (FixMatch, BCP).")
        lambda_max: float = Field(0.1, ge=0, description="weight=ramp: MetaSSL's λ_max (--consistency 0.1).")
        rampup: float = Field(1.0, ge=0, le=1, description="weight=ramp: ramp length as a fraction of the run "
                              "(200 epochs of 150 it, scaled to the run as every ramp in ssmis).")
        epoch_len: int = Field(150, ge=1, description="weight=ramp: iterations per ramp 'epoch'.")
        ramp_start: float = Field(0.0, ge=0, lt=1, description="weight=ramp: the ramp starts at this fraction of "
                                  "the run (t counts from there; e.g. 0.25 = BCP's self-training start) and spans "
                                  "rampup of the rest [ours; 0 = MetaSSL's scripts].")
        scale: float = Field(1.0, ge=0, description="Multiplies both terms (after λ(t) with weight=ramp): undoes a "
                             "host's own factor on the slot's loss (BCP and FixMatch halve it: 2).")
        compat_2d_bug: bool = Field(False, description="Reproduce the released 2D code's UC mask (pred == 0): "
                                    "foreground UC pixels get no loss, background UC counts twice.")

        @field_validator("cap")
        @classmethod
        def _cap_in_range(cls, cap):
            if isinstance(cap, float) and not 0 < cap <= 1:
                raise ValueError(f"must be in (0, 1], 'auto' or null, got {cap}")
            return cap

    slot = "unsup_loss"
    needs = frozenset({"teacher_probs", "student_logits", "network", "step"})
    needs_labeled = frozenset({"teacher_probs", "student_logits", "labels", "network", "step"})

    @classmethod
    def declared_slots(cls) -> dict[str, frozenset[str]]:
        return {"unsup_loss": cls.needs, "labeled_loss": cls.needs_labeled}

    def slot_needs(self) -> dict[str, frozenset[str]]:
        slots = type(self).declared_slots()
        return slots if self.cfg.labeled else {"unsup_loss": slots["unsup_loss"]}

    def __init__(self, cfg, num_classes, spatial_dims):
        super().__init__(cfg, num_classes, spatial_dims)
        self.register_buffer("tau", torch.full((NETWORKS, 2, num_classes), float(cfg.init)))
        c = cfg
        self.weights_u = c.weights or exponential_weights(c.w0, c.rho, c.gamma)
        self.weights_l = c.weights_labeled or exponential_weights(c.w0_labeled, c.rho_labeled, c.gamma_labeled)
        self.cap = (0.9 if spatial_dims == 3 else None) if c.cap == "auto" else c.cap

    # ---- thresholds ---------------------------------------------------------------------------------
    def update_thresholds(self, network: int, part: int, label: Tensor, conf: Tensor, support: Tensor) -> Tensor:
        """τ ← momentum·τ + (1 − momentum)·Σ_{ŷ=k} c / (N_k + 1) over the supported pixels; returns the new τ."""
        if not 0 <= network < NETWORKS:
            raise ValueError(f"metassl: network index {network} out of range (hosts pass 0 or 1)")
        lab, c = label[support], conf[support].float()
        sums = torch.zeros(self.num_classes, device=conf.device).index_add_(0, lab, c)
        counts = torch.bincount(lab, minlength=self.num_classes).float()
        stats = sum_over_processes({"sums": sums, "counts": counts})     # the same update on every rank
        mean = stats["sums"] / (stats["counts"] + 1)
        tau = self.cfg.momentum * self.tau[network, part] + (1 - self.cfg.momentum) * mean.to(self.tau.device)
        if self.cap is not None:
            tau = tau.clamp(max=self.cap)
        self.tau[network, part] = tau
        return tau

    # ---- the two slots --------------------------------------------------------------------------------
    def run(self, slot: str, value: Tensor, inp: SlotInputs) -> Tensor:
        logits = inp.student_logits.float()
        ref_probs = inp.teacher_probs.detach().float()
        support = (torch.ones(value.shape, dtype=torch.bool, device=value.device) if inp.pixel_weights is None
                   else inp.pixel_weights > 0)
        pred = logits.detach().argmax(1)
        if slot == "unsup_loss":
            ref = inp.pseudo_labels.long() if inp.pseudo_labels is not None else ref_probs.argmax(1)
            conf = ref_probs.gather(1, ref.unsqueeze(1)).squeeze(1)    # the reference's confidence in its label
            tau = self.update_thresholds(inp.network, UNLABELED, ref, conf, support)
            masks = regions(pred == ref, ref, conf, tau, self.cfg.compat_2d_bug)
            loss, weights, out = F.cross_entropy(logits, ref, reduction="none"), self.weights_u, 0.0
        elif slot == "labeled_loss":
            conf = logits.detach().softmax(1).amax(1)                  # the student's own confidence
            tau = self.update_thresholds(inp.network, LABELED, pred, conf, support)
            masks = regions(pred == ref_probs.argmax(1), pred, conf, tau, self.cfg.compat_2d_bug)
            loss, weights, out = F.cross_entropy(logits, inp.labels.long(), reduction="none"), self.weights_l, value
        else:
            raise ValueError(f"metassl acts in unsup_loss and labeled_loss, not {slot!r}")
        f = heterogeneous_factors(masks, weights, support)
        per_weight = (torch.full_like(f, 1.0 / f.numel()) if inp.pixel_weights is None
                      else inp.pixel_weights.float().clamp_min(1e-30))
        return out + self.factor(inp.step) * loss * f / per_weight * support

    def factor(self, step: int | None) -> float:
        """scale, times MetaSSL's λ(t) with weight=ramp."""
        c = self.cfg
        if c.weight == "host":
            return c.scale
        if step is None or self.total_steps is None:
            raise ValueError("metassl weight=ramp needs the step (from the host) and the run length (from the engine)")
        start = int(round(c.ramp_start * self.total_steps))
        if step < start:
            return 0.0
        length = c.rampup * (self.total_steps - start) / c.epoch_len
        return c.scale * c.lambda_max * sigmoid_ramp((step - start) // c.epoch_len, length)
