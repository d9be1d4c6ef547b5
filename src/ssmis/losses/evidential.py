"""Evidential (subjective-logic) pieces written once: Dirichlet evidence and opinions, the fusion of two opinions
(class-aware CAEF and plain Dempster-style EF), the reliability of a fused opinion, uncertainty-ranked asymptotic
weights (UMAL) and the Fisher-information EDL loss (I-EDL without its KL term). methods.md "MEDL", Components.

Layout: classes on dim 1 (B×K×spatial, or B×K for single opinions); per-voxel quantities are B×spatial. Every
function works in float32 and float64 (inputs in lower precision are promoted to float32) and knows nothing of any
method: weights, targets and reductions are the caller's.
"""

from __future__ import annotations

import math
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

XI_MAX = 1.0 / math.tanh(1.0)       # ω = Ξ·tanh(ψζ) + 1 > 0 for every ψ, ζ ∈ [−1, 1] iff Ξ < 1/tanh(1) ≈ 1.313


def _float(x: Tensor) -> Tensor:
    """x in float32 at least (float64 stays float64)."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def evidence(logits: Tensor, activation: Literal["softplus", "relu"] = "softplus") -> Tensor:
    """Non-negative evidence e from network outputs ([ours] softplus, as the I-EDL code; relu as plain EDL)."""
    logits = _float(logits)
    if activation == "softplus":
        return F.softplus(logits)
    if activation == "relu":
        return F.relu(logits)
    raise ValueError(f"unknown evidence activation {activation!r}")


class Opinion(NamedTuple):
    """A subjective-logic opinion over K classes: beliefs b (B×K×spatial) and the mass of the whole frame
    u = b_{C_K} (B×spatial), with Σ_n b_n + u = 1."""
    belief: Tensor
    uncertainty: Tensor


def dirichlet_strength(alpha: Tensor) -> Tensor:
    """S = Σ_n α_n, kept on the class dim (B×1×spatial) so that α/S broadcasts."""
    return alpha.sum(1, keepdim=True)


def expected_probability(alpha: Tensor) -> Tensor:
    """p_n = α_n / S."""
    return alpha / dirichlet_strength(alpha)


def opinion(e: Tensor) -> Opinion:
    """From evidence e ≥ 0: α = e + 1, S = Σα, b_n = e_n / S, u = K / S."""
    e = _float(e)
    strength = dirichlet_strength(e + 1)
    return Opinion(e / strength, e.shape[1] / strength.squeeze(1))


def fuse(a: Opinion, b: Opinion, class_aware: bool = True) -> Opinion:
    """Fuse two opinions: b̃_n = b1_n b2_n + c·(b1_n u2 + b2_n u1), b̃_{C_K} = u1 u2, then all K + 1 masses
    normalised to sum 1. CAEF (class_aware): c = |C_n|/(|C_n| + |C_K|) = 1/(1 + K); plain EF: c = 1."""
    k = a.belief.shape[1]
    c = 1.0 / (1 + k) if class_aware else 1.0
    u1, u2 = a.uncertainty.unsqueeze(1), b.uncertainty.unsqueeze(1)
    belief = a.belief * b.belief + c * (a.belief * u2 + b.belief * u1)
    unc = a.uncertainty * b.uncertainty
    total = belief.sum(1) + unc
    return Opinion(belief / total.unsqueeze(1), unc / total)


def reliability(fused: Opinion) -> Tensor:
    """R = exp(b̃_{C_K} · Σ_n ζ_n log₂ ζ_n), ζ_n = b̃_n (0·log 0 = 0): R ∈ (0, 1], 1 when b̃_{C_K} = 0 or the
    beliefs are one-hot; small when the fused uncertainty and the belief entropy are both large."""
    neg_entropy = torch.xlogy(fused.belief, fused.belief).sum(1) / math.log(2.0)
    return torch.exp(fused.uncertainty * neg_entropy)


def rank_position(uncertainty: Tensor) -> Tensor:
    """ψ per voxel (B×spatial): each sample's voxels ranked by uncertainty, mapped linearly onto [−1, 1] so that
    the most certain voxel has ψ = −1 and the most uncertain +1 (the certain-first convention; the paper's
    2h/V − 1 with h ∈ {1 … V} shifted to reach both ends, ≤ 2/V apart). Ties keep voxel order (stable sort); a
    sample of one voxel gets 0."""
    flat = uncertainty.detach().flatten(1)
    v = flat.shape[1]
    order = torch.argsort(flat, dim=1, stable=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(v, device=flat.device).expand_as(order))
    ranks = ranks.to(_float(flat).dtype)
    psi = 2.0 * ranks / (v - 1) - 1.0 if v > 1 else ranks
    return psi.view(uncertainty.shape)


def epoch_progress(fraction: float) -> float:
    """ζ(q) = 2q/Q − 1 ∈ [−1, 1] for the share q/Q of the run done."""
    return 2.0 * min(max(fraction, 0.0), 1.0) - 1.0


def umal_weights(uncertainty: Tensor, zeta: float, xi: float) -> Tensor:
    """UMAL ω(q, v) = Ξ·tanh(ψ_v·ζ) + 1 (B×spatial, no gradient): early (ζ < 0) the certain voxels weigh more,
    late (ζ > 0) the uncertain ones; all 1 at ζ = 0. Needs 0 < Ξ < 1/tanh(1) for ω > 0."""
    if not 0 < xi < XI_MAX:
        raise ValueError(f"UMAL needs 0 < Ξ < 1/tanh(1) = {XI_MAX:.4f}, got {xi}")
    return xi * torch.tanh(rank_position(uncertainty) * zeta) + 1.0


def tetragamma(x: Tensor) -> Tensor:
    """ψ2(x) for x > 0: ψ2(x) = ψ2(x + 6) − 2·Σ_{k<6} 1/(x + k)³, ψ2(x + 6) from the asymptotic series
    −1/z² − 1/z³ − 1/(2z⁴) + 1/(6z⁶) − 1/(6z⁸) + 3/(10z¹⁰) − 5/(6z¹²), z = x + 6 (relative error < 1e-8 in
    float64). Several times faster than torch.polygamma(2, x) on the CPU (7x measured), which the trigamma's
    gradient would otherwise cost per step."""
    shifted = torch.zeros_like(x)
    for k in range(6):
        r = (x + k).reciprocal()
        shifted = shifted + r * r * r
    z = x + 6
    r = (z * z).reciprocal()
    series = 1.0 / 6 + r * (-1.0 / 6 + r * (3.0 / 10 + r * (-5.0 / 6)))
    return -r * (1 + z.reciprocal() + r * (0.5 - r * series)) - 2 * shifted


class _Trigamma(torch.autograd.Function):
    """ψ1 with the gradient ψ2 from `tetragamma` (first derivatives only)."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        ctx.save_for_backward(x)
        return torch.polygamma(1, x)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor) -> Tensor:
        (x,) = ctx.saved_tensors
        return grad * tetragamma(x)


def trigamma(x: Tensor) -> Tensor:
    """ψ1(x), differentiable once (its gradient via `tetragamma`)."""
    return _Trigamma.apply(x)


def fisher_edl_loss(alpha: Tensor, target: Tensor, lambda_f: float) -> Tensor:
    """KL-free I-EDL loss per voxel (B×spatial), target = class indices (B×spatial):
    Σ_n ((ŷ_n − α_n/S)² + α_n(S − α_n)/(S²(S + 1)))·ψ1(α_n) − λ_F·log|I(α)|, with
    log|I(α)| = Σ_n log ψ1(α_n) + log(1 − ψ1(S)·Σ_n 1/ψ1(α_n)) (danruod/IEDL FisherEvidentialN).
    The determinant's last factor cancels badly for large evidence (≈ (K − 1)/(2KS̄)), so the trigammas are taken
    in float64 and that factor floored at the smallest positive float64; the result has α's dtype (float32 at
    least)."""
    alpha = _float(alpha)
    k = alpha.shape[1]
    onehot = F.one_hot(target.long(), k).movedim(-1, 1).to(alpha.dtype)
    strength = dirichlet_strength(alpha)
    p = alpha / strength
    a64 = alpha.double()
    tri64 = trigamma(a64)
    fit = (((onehot - p) ** 2 + alpha * (strength - alpha) / (strength * strength * (strength + 1)))
           * tri64.to(alpha.dtype)).sum(1)
    det_rest = 1.0 - trigamma(a64.sum(1)) * (1.0 / tri64).sum(1)
    log_det = torch.log(tri64).sum(1) + torch.log(det_rest.clamp_min(torch.finfo(torch.float64).tiny))
    return fit - lambda_f * log_det.to(alpha.dtype)


def per_sample_sum(values: Tensor, sample_sum: bool = True) -> Tensor:
    """Σ over samples of each sample's mean over its voxels (B×spatial -> scalar), as MEDL's Eq. 8 writes
    L_{w,l} and L^I_u; `sample_sum=False` gives the batch mean (1/B of it)."""
    per_sample = values.flatten(1).mean(1)
    return per_sample.sum() if sample_sum else per_sample.mean()
