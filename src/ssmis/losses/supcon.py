"""Supervised contrastive loss with self-paced pair weights (methods.md "SPCL", Components; [CODE
jizongFox/Self-paced-Contrastive-Learning contrastyou/losses/contrast_loss2.py, SelfPacedSupConLoss]).

For 2N L2-normalised projections z (view 1 of N slices, then view 2 of the same slices) and one meta-label per
slice, anchor i has the positives P(i) = the other views with the same meta-label (its twin view included) and
the candidates A(i) = every view but i:

    ℓ_ij = −log( exp(z_i·z_j/τ) / Σ_{a∈A(i)} exp(z_i·z_a/τ) )
    L    = (1/2N) Σ_i (1/|P(i)|) Σ_{j∈P(i)} w_ij ℓ_ij

with no-grad self-paced weights w_ij: hard w = 1[ℓ ≤ γ], soft ("linear") w = max(0, 1 − ℓ/γ), none w = 1 (plain
SupCon). The regulariser R_γ(w) is not added (the reference does not: it would change the logged value only).
γ grows per pre-training epoch e = 0 … E−1 (γ(E) itself is never used, as in the reference). Several
meta-labels are combined by a weighted average Σ λ_k L_k / (Σ λ_k + 1e-16), not a sum. Everything in float32.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

Weighting = Literal["hard", "soft", "none"]
Schedule = Literal["inversesquare", "linear", "square"]


def gamma_at(epoch: int, epochs: int, gamma0: float, gamma1: float, schedule: Schedule = "inversesquare") -> float:
    """The self-paced threshold at `epoch` of `epochs`: γ0 + (γ1 − γ0)·f(e/E) with f = √ (inversesquare), identity
    (linear) or square ([CODE jizongFox/deepclustering2 schedulers/customized_scheduler.py])."""
    x = min(max(epoch, 0), epochs) / epochs
    f = {"inversesquare": math.sqrt(x), "linear": x, "square": x * x}[schedule]
    return gamma0 + (gamma1 - gamma0) * f


def epoch_of(step: int, total: int, epochs: int) -> int:
    """The γ epoch e ∈ {0 … E−1} of optimiser step `step` in a run of `total` steps cut into E equal epochs."""
    return min(step * epochs // max(total, 1), epochs - 1)


def self_paced_weights(ell: Tensor, gamma: float, weighting: Weighting) -> Tensor:
    """The closed-form minimisers of Σ w·ℓ + R_γ(w) over w ∈ [0, 1]: hard 1[ℓ ≤ γ], soft max(0, 1 − ℓ/γ); ones for
    'none'. No gradient."""
    ell = ell.detach()
    if weighting == "none":
        return torch.ones_like(ell)
    if weighting == "hard":
        return (ell <= gamma).to(ell.dtype)
    return (1 - ell / gamma).clamp_min(0)


def pair_losses(z: Tensor, labels: Tensor, tau: float) -> tuple[Tensor, Tensor]:
    """(ℓ: 2N×2N pair losses, positive mask: 2N×2N bool) for projections z (2N×d, rows L2-normalised; float32 or
    float64) and meta-labels (2N integers, equal for positives). The diagonal is neither positive nor a candidate."""
    n2 = z.shape[0]
    eye = torch.eye(n2, dtype=torch.bool, device=z.device)
    logits = (z @ z.t()) / tau
    log_den = torch.logsumexp(logits.masked_fill(eye, -math.inf), dim=1, keepdim=True)
    pos = (labels[:, None] == labels[None, :]) & ~eye
    return log_den - logits, pos


@dataclass
class SupConResult:
    loss: Tensor          # the (weighted) loss, scalar with gradient
    admitted: float       # share of positive pairs with w > 0
    mean_weight: float    # mean w over positive pairs (the reference's "real_percentage")
    plain: float          # the unweighted SupCon value of the same pairs (comparable across γ)


def supcon_views(z: Tensor, labels: Tensor, tau: float = 0.07, gamma: float = math.inf,
                 weighting: Weighting = "none", normalize_weights: bool = False) -> SupConResult:
    """The loss of the module docstring over 2N views z (2N×d, L2-normalised) with one meta-label per view.
    `normalize_weights` divides the loss by the mean positive weight (the reference's later `correct_grad` option)."""
    with torch.autocast(z.device.type, enabled=False):
        z = z if z.dtype == torch.float64 else z.float()
        ell, pos = pair_losses(z, labels.to(z.device), tau)
        w = self_paced_weights(ell, gamma, weighting) * pos
        count = pos.sum(1).clamp_min(1)
        loss = ((w * ell).sum(1) / count).mean()
        plain = float(((ell.detach() * pos).sum(1) / count).mean())
        pos_w = w[pos]
        mean_w = float(pos_w.mean()) if pos_w.numel() else 0.0
        if normalize_weights and mean_w > 0:
            loss = loss / mean_w
        admitted = float((pos_w > 0).float().mean()) if pos_w.numel() else 0.0
    return SupConResult(loss, admitted, mean_w, plain)


def supcon_loss(z1: Tensor, z2: Tensor, labels: Tensor, tau: float = 0.07, gamma: float = math.inf,
                weighting: Weighting = "none", normalize_weights: bool = False) -> SupConResult:
    """Self-paced supervised contrastive loss of two views z1, z2 (N×d each, L2-normalised) whose row i shares the
    meta-label labels[i] (the twin views of a slice are always positives)."""
    return supcon_views(torch.cat([z1, z2]), torch.cat([labels, labels]), tau, gamma, weighting, normalize_weights)


def weighted_average(losses: list[Tensor] | list[float], weights: list[float]):
    """Σ λ_k L_k / (Σ λ_k + 1e-16): how SPCL combines the losses of several meta-labels
    ([CODE contrastyou/utils/utils.py:66-68])."""
    total = sum(w * v for w, v in zip(weights, losses))
    return total / (sum(weights) + 1e-16)
