"""Voxel-wise contrastive selection of C3S3: ODCL, Outcome-Driven Contrastive Learning (methods.md "C3S3",
Components 7; [CODE Y-TARL/C3S3 utils/ContrastiveLoss.py]).

For one pair of views, f_A and f_B are the two networks' projector maps (B×64×spatial), flattened over batch and
space to M voxels; s_i = cos(f_A,i, f_B,i) pairs the same voxel of both networks. From each network's own argmax
prediction ŷ_A, ŷ_B: I_i = [ŷ_A,i fg ∧ ŷ_B,i fg] (intersection), U_i = [ŷ_A,i fg ∨ ŷ_B,i fg] (union), τ = 0.1:

    L1 = −mean_i log( e^{I_i s_i/τ} / (e^{I_i s_i/τ} + Σ_j e^{(1−I_j) s_j/τ} + 1e-8) )
    L2 = −mean_i log( e^{(1−U_i) s_i/τ} / (e^{(1−U_i) s_i/τ} + Σ_j e^{U_j s_j/τ} + 1e-8) )
    L_iuc = L1 + L2

"fg" is the foreground class in the binary paper; for more classes it is any non-background class (argmax ≠ 0),
which is the same thing at 2 classes. The sums in the denominators run over all M voxels (≈ 2 M in LA), so each
term sits near log M with small gradients (a PITFALL of the method, kept). Memory: every tensor is O(M) — there is
no M×M similarity matrix — and `odcl_loss` by default recomputes its per-voxel intermediates in the backward pass
(torch.utils.checkpoint, as the reference) so that only the two projector maps stay alive per pair."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint as _checkpoint

ODCL_EPS = 1e-8     # the reference's `+ 1e-8` in both denominators


def _selected_nce(pos: Tensor, neg: Tensor, eps: float) -> Tensor:
    """−mean_i log(e^{pos_i} / (e^{pos_i} + Σ_j e^{neg_j} + eps)), evaluated as mean_i [log(e^{pos_i} + e^c) − pos_i]
    with c = log(Σ_j e^{neg_j} + eps) by log-sum-exp, and log(e^p + e^c) = c + softplus(p − c) (the same value; no
    overflow when a small τ makes s/τ large; softplus's backward is one sigmoid, where a logaddexp against a
    broadcast scalar was several times slower on the CPU)."""
    log_eps = torch.tensor(math.log(eps) if eps > 0 else -math.inf, dtype=pos.dtype, device=pos.device)
    c = torch.logaddexp(torch.logsumexp(neg, 0), log_eps)
    if c.isneginf():                       # no negative term and eps = 0: the denominator is e^{pos_i} alone
        return (pos - pos).mean()
    return (c + F.softplus(pos - c) - pos).mean()


def odcl_terms(sim: Tensor, inter: Tensor, union: Tensor, tau: float = 0.1,
               eps: float = ODCL_EPS) -> tuple[Tensor, Tensor]:
    """(L1, L2) of the module docstring from per-voxel cosines `sim` and 0/1 masks `inter` (I) and `union` (U), any
    equal shapes (flattened to M voxels); computed in `sim`'s dtype."""
    s = sim.flatten() / tau
    i = inter.flatten().to(s.dtype)
    u = union.flatten().to(s.dtype)
    return _selected_nce(i * s, (1 - i) * s, eps), _selected_nce((1 - u) * s, u * s, eps)


def foreground(logits: Tensor) -> Tensor:
    """B×spatial bool: the network's argmax is a foreground class (≠ 0; at two classes = class 1, as the reference).
    Written as max_{c≥1} z_c > z_0, the same as argmax ≠ 0 (argmax takes the first of tied maxima), without a
    reduction over all K channels; argmax of the logits = argmax of the softmax."""
    z = logits.detach().float()
    return z[:, 1:].amax(1) > z[:, 0]


def cosine(a: Tensor, b: Tensor, dim: int = 1, eps: float = 1e-8, sq_a: Tensor | None = None,
           sq_b: Tensor | None = None) -> Tensor:
    """Cosine of a and b along `dim` (default the channel axis: per voxel of two B×C×spatial maps), float32:
    Σ a·b / max(‖a‖·‖b‖, eps), the value of F.cosine_similarity. ODCL's reference L2-normalises the projector vectors
    first and then takes the cosine, which is the same number. Written out as plain products because reductions
    over the channel axis of B×C×spatial maps are several times slower through F.normalize / F.cosine_similarity on
    the CPU. `sq_a` / `sq_b`: the squared norms Σ a² / Σ b² along `dim`, when the caller has them already."""
    a, b = a.float(), b.float()
    sq_a = (a * a).sum(dim) if sq_a is None else sq_a
    sq_b = (b * b).sum(dim) if sq_b is None else sq_b
    return (a * b).sum(dim) * torch.rsqrt((sq_a * sq_b).clamp_min(eps * eps))


def odcl_sum(feats_a: list[Tensor], feats_b: list[Tensor], fgs_a: list[Tensor], fgs_b: list[Tensor],
             pairs: list[tuple[int, int]], tau: float = 0.1, checkpoint: bool = True) -> Tensor:
    """Σ over (i, j) in `pairs` of L_iuc(feats_a[i], feats_b[j]) = L1 + L2: network A's projector maps of the views
    (B×c×spatial each) against network B's, with each network's foreground prediction on that view
    (`foreground(logits)`, B×spatial); per pair I = fg_a ∧ fg_b, U = fg_a ∨ fg_b. Float32; the masks take no
    gradient, the gradient reaches every projector map. Each map is converted to float32 and its per-voxel squared
    norm computed once, not once per pair it is in (C3S3 pairs each of A's two views with each of B's), and handed
    to `cosine`. With `checkpoint` the per-voxel intermediates are recomputed in the backward
    pass instead of being stored."""
    masks = [(fgs_a[i] & fgs_b[j], fgs_a[i] | fgs_b[j]) for i, j in pairs]
    n = len(feats_a)

    def value(*maps: Tensor) -> Tensor:
        with torch.autocast(maps[0].device.type, enabled=False):
            fa, fb = [m.float() for m in maps[:n]], [m.float() for m in maps[n:]]
            na, nb = [(f * f).sum(1) for f in fa], [(f * f).sum(1) for f in fb]
            total = maps[0].new_zeros((), dtype=torch.float32)
            for (i, j), (inter, union) in zip(pairs, masks):
                sim = cosine(fa[i], fb[j], sq_a=na[i], sq_b=nb[j])
                l1, l2 = odcl_terms(sim, inter, union, tau)
                total = total + (l1 + l2)
            return total

    maps = [*feats_a, *feats_b]
    if checkpoint and torch.is_grad_enabled() and any(m.requires_grad for m in maps):
        return _checkpoint(value, *maps, use_reentrant=False)
    return value(*maps)


def odcl_loss(feat_a: Tensor, feat_b: Tensor, fg_a: Tensor, fg_b: Tensor, tau: float = 0.1,
              checkpoint: bool = True) -> Tensor:
    """L_iuc = L1 + L2 of one (network A view, network B view) pair (`odcl_sum` of one pair)."""
    return odcl_sum([feat_a], [feat_b], [fg_a], [fg_b], [(0, 0)], tau, checkpoint)
