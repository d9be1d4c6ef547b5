"""MEDL (Mutual Evidential Deep Learning; methods.md "MEDL"; no public code, everything from the paper text and the
spec's [ours] defaults). Two networks of different architectures (network 1 = model.name, network 2 = method.net2)
output Dirichlet evidence. On every voxel of the batch their opinions are fused (class-aware CAEF): the fused
beliefs give the pseudo-labels of the unlabelled voxels, the fused uncertainty b̃_{C_K} with the belief entropy a
reliability R, and the uncertainties rank the voxels of each sample for the curriculum weights ω (UMAL). Per
network ε, every step, on the same labelled + unlabelled batch (Eq. 8-9):

    L^ε = L_l + L_u + L_{w,l} + λ_GWU(t)·L^I_u
    L_l     = Dice + CE vs the labels
    L_u     = Dice + CE vs the fused pseudo-labels, each voxel weighted by R
    L_{w,l} = Σ_{labelled samples} mean_v ω(q, v)·CE_v, ranked by û_ε = λ1·u_ε + λ2·b̃_{C_K}
    L^I_u   = Σ_{unlabelled samples} mean_v ω(q, v)·R_v·FIE_v, ranked by b̃_{C_K}
    λ_GWU(t) = w_max·exp(−5(1 − t/t_r)²) up to t_r, then w_max

and the step minimises L^{N1} + L^{N2}. The paper's inference averages both networks; in ssmis two-network methods
report network 1 (Implementation decisions 7), and `ssmis eval --ensemble` /
`ssmis predict --ensemble` use the average (ssmis.models.ensemble).

Decisions where the paper is silent ([ours], methods.md MEDL and Implementation decisions 7):
* evidence = softplus(logits); Dice and CE act on the softmax of the same logits (the shared SSL4MIS losses; the
  argmax of softmax and of α/S agree, so the engine's softmax inference is the network's prediction);
* L_l and L_u are the unscaled Dice + CE sum as Eq. 8 writes them (not SSL4MIS's 0.5·(CE + Dice));
* the fusion runs without gradient: pseudo-labels, R and ω are targets and weights, not trained quantities;
* R is a per-voxel multiplicative weight on both unlabelled terms (optionally a hard mask R > r0);
* ψ = −1 for the most certain and +1 for the most uncertain voxel of a sample (certain first);
* epoch progress q/Q = step / run length; the warm-up counts steps, t_r = 40 % of the run;
* L_{w,l} and L^I_u are sums over the samples of per-sample voxel means, as written (`sample_sum`; with 4 + 4
  images that is 4x a batch mean, 2x in the paper's 2 + 2) — recorded with the run's config.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import Tensor

from ssmis.errors import UserError
from ssmis.losses.evidential import (XI_MAX, Opinion, epoch_progress, evidence, fisher_edl_loss, fuse, opinion,
                                     per_sample_sum, reliability, umal_weights)
from ssmis.losses.pseudo import masked_cross_entropy
from ssmis.losses.seg import dice_loss
from ssmis.methods.base import Batch, StepOutput
from ssmis.methods.pair import PairConfig, TwoNetworks
from ssmis.registry import METHODS
from ssmis.schedules import sigmoid_ramp


class MEDLConfig(PairConfig):
    evidence: Literal["softplus", "relu"] = Field("softplus", description="Evidence activation on the logits "
                                                  "(not stated in the paper; softplus as in the I-EDL code).")
    fusion: Literal["caef", "ef"] = Field("caef", description="caef: class-aware fusion, cross terms discounted "
                                          "by 1/(1 + K); ef: plain Dempster-style fusion (the paper's Fig. 4 "
                                          "comparison).")
    lambda1: float = Field(0.5, ge=0, le=1, description="Labelled ranking uncertainty û = λ1·u_network + "
                           "λ2·u_fused (Table VII: 0.5 / 0.5 best Dice).")
    lambda2: float = Field(0.5, ge=0, le=1, description="Weight of the fused uncertainty in û; λ1 + λ2 = 1.")
    xi: float = Field(0.5, gt=0, lt=XI_MAX, description="Ξ of ω = Ξ·tanh(ψ·ζ) + 1 (not given; ours 0.5); "
                      "0 < Ξ < 1/tanh(1) keeps ω > 0.")
    lambda_f: float = Field(0.05, ge=0, description="λ_F, weight of −log|I(α)| in the FIE loss (I-EDL's CIFAR-10 "
                            "fisher_c).")
    w_max: float = Field(0.1, ge=0, description="Maximum of the Gaussian warm-up weight λ_GWU of the FIE term "
                         "(not given; ours 0.1).")
    t_r: float = Field(0.4, ge=0, le=1, description="Warm-up length as a fraction of the run (not given; ours "
                       "40 %); λ_GWU = w_max·exp(−5(1 − t/t_r)²) until then, w_max after.")
    reliability: Literal["weight", "mask", "none"] = Field(
        "weight", description="How R acts on the unlabelled terms (L_u and L^I_u): weight = R·[R > r0] per voxel "
        "(ours), mask = [R > r0], none = 1.")
    r0: float = Field(0.0, ge=0, lt=1, description="Hard reliability mask: voxels with R <= r0 get weight 0 "
                      "(0 = no mask, R > 0 always).")
    sample_sum: bool = Field(True, description="L_{w,l} and L^I_u as Eq. 8 writes them: sums over the samples "
                             "of per-sample voxel means (false: batch means, 1/B of that).")
    u_rampup: float = Field(0.0, ge=0, le=1, description="[ours] Ramp the unlabelled Dice + CE (L_u) with the FIE "
                            "term's Gaussian warm-up over this fraction of the run (to weight 1); 0 = unramped, as "
                            "Eq. 8-9 write it (a control: at the lite budget L_u pulls towards early all-background "
                            "pseudo-labels).")

    @model_validator(mode="after")
    def _lambdas_sum_to_one(self) -> MEDLConfig:
        if abs(self.lambda1 + self.lambda2 - 1.0) > 1e-6:
            raise ValueError(f"lambda1 + lambda2 must be 1 (got {self.lambda1} + {self.lambda2})")
        return self


def dice_ce(logits: Tensor, target: Tensor, weight: Tensor | None = None) -> Tensor:
    """Dice + CE (unscaled, Eq. 8) on float32 logits; `weight` (B×spatial) multiplies every voxel's CE (mean over
    all voxels) and enters the three Dice sums, as a soft mask."""
    logits = logits.float()
    if weight is None:
        return F.cross_entropy(logits, target.long()) + dice_loss(logits.softmax(1), target)
    return masked_cross_entropy(logits, target, weight) + dice_loss(logits.softmax(1), target, mask=weight)


@METHODS.register("medl")
class MEDL(TwoNetworks):
    """MEDL: two evidential networks, class-aware fused pseudo-labels, UMAL + Fisher EDL (network 1 reported).

    Network 2 is `method.net2` (auto: resnet34_unet in 2D, resnet34_vnet in 3D). Logs per network (1, 2): sup,
    unsup, wl (ranked labelled CE), fie; shared: fie_w (λ_GWU), zeta, u_fused (mean fused uncertainty on the
    unlabelled voxels), rel (mean R), pl_fg (foreground share of the pseudo-labels), agree (argmax agreement)."""

    class Config(MEDLConfig):
        name: Literal["medl"] = "medl"

    def build(self, ctx):
        self.build_pair(ctx)

    def fie_weight(self, step: int) -> float:
        """λ_GWU(t) = w_max·exp(−5(1 − t/t_r)²), t_r = t_r·T steps (sigmoid_ramp, SASSNet's warm-up)."""
        return self.cfg.w_max * sigmoid_ramp(step, self.cfg.t_r * self.ctx.total_steps)

    def zeta(self, step: int) -> float:
        """ζ = 2q/Q − 1 with q/Q = step / run length."""
        return epoch_progress(step / max(self.ctx.total_steps, 1))

    def reliability_weight(self, fused: Opinion) -> Tensor:
        r = reliability(fused)
        if self.cfg.reliability == "none":
            return torch.ones_like(r)
        keep = (r > self.cfg.r0).to(r.dtype)
        return keep * r if self.cfg.reliability == "weight" else keep

    def train_step(self, lb: Batch, ub: Batch | None, step: int) -> StepOutput:
        if ub is None:
            raise UserError("train.unlabeled_bs", "MEDL needs unlabelled images", "Set train.unlabeled_bs > 0.")
        n = lb.image.shape[0]
        x = torch.cat([lb.image, ub.image])          # one forward per network over labelled + unlabelled
        logits = [self.net1(x).logits.float(), self.net2(x).logits.float()]
        evid = [evidence(z, self.cfg.evidence) for z in logits]
        zeta, cfg = self.zeta(step), self.cfg
        with torch.no_grad():
            ops = [opinion(e) for e in evid]
            fused = fuse(ops[0], ops[1], class_aware=cfg.fusion == "caef")
            u_fused = fused.uncertainty
            pseudo = fused.belief[n:].max(1).indices      # = argmax (first maximum), much faster on the CPU
            rel = self.reliability_weight(Opinion(fused.belief[n:], u_fused[n:]))
            w_u = umal_weights(u_fused[n:], zeta, cfg.xi) * rel
            w_l = [umal_weights(cfg.lambda1 * op.uncertainty[:n] + cfg.lambda2 * u_fused[:n], zeta, cfg.xi)
                   for op in ops]
        lam = self.fie_weight(step)
        w_lu = sigmoid_ramp(step, cfg.u_rampup * self.ctx.total_steps) if cfg.u_rampup > 0 else 1.0
        loss = torch.zeros((), device=x.device)
        logs: dict = {}
        for i, (z, e) in enumerate(zip(logits, evid), start=1):
            sup = dice_ce(z[:n], lb.label)
            unsup = dice_ce(z[n:], pseudo, rel)
            wl = per_sample_sum(w_l[i - 1] * F.cross_entropy(z[:n], lb.label.long(), reduction="none"),
                                cfg.sample_sum)
            fie = per_sample_sum(w_u * fisher_edl_loss(e[n:] + 1, pseudo, cfg.lambda_f), cfg.sample_sum)
            loss = loss + sup + w_lu * unsup + wl + lam * fie
            logs |= {f"sup{i}": sup.detach(), f"unsup{i}": unsup.detach(), f"wl{i}": wl.detach(),
                     f"fie{i}": fie.detach()}
        with torch.no_grad():
            agree = (logits[0][n:].max(1).indices == logits[1][n:].max(1).indices).float().mean()
            logs |= {"fie_w": lam, "lu_w": w_lu, "zeta": zeta, "u_fused": u_fused[n:].mean(), "rel": rel.mean(),
                     "pl_fg": (pseudo > 0).float().mean(), "agree": agree}
        return StepOutput(loss, logs)
