"""Transferable Semantic Augmentation (TSA): the closed-form upper bound of the expected cross-entropy over implicit
feature translations, and the EMA class-statistics memory it reads (methods.md "TransMedSeg"; the loss follows
`BIT-DA/TSA:Loss.py`).

Features a_i ∈ R^A feed a linear classifier z_i = W a_i + b (W ∈ R^{C×A}). Each a_i is augmented as
ã_i ~ N(a_i + λ·Δμ_{y_i}, λ·Σ^{y_i}); Jensen plus the Gaussian moment-generating function bound the expected CE by
the CE of the **augmented logits**

    z̃_{i,c} = z_{i,c} + λ·(w_c − w_y)ᵀΔμ_y + (λ/2)·(w_c − w_y)ᵀΣ^y(w_c − w_y),   y = y_i   (z̃_{i,y} = z_{i,y}).

Both extra terms depend on (y, c) only: `tsa_terms` precomputes M[y, c] and Q[y, c] once (O(C²A²)), and
`augmented_logits` gathers the row of each pixel's label (O(N·C)). Gradients reach W through M and Q; Δμ and Σ are
constants (detached). λ = 0 gives plain CE.

`ClassMemory` keeps per-class EMA statistics of pixel features (mean, optionally covariance): a step's statistics
are per-class sums (count, Σx, Σxxᵀ, at most `max_pixels` random pixels per class), which a caller all-reduces over
processes before `update`, so every process applies the same update. `head_inputs` turns a feature map into the
exact classifier inputs of a k×k(×k) output convolution (the unfolded neighbourhood, W = the flattened kernel).
"""

from __future__ import annotations

import itertools
import math
from typing import Literal, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

STATS_DTYPE = torch.float64      # per-step sums of outer products: float64 against cancellation in Σxxᵀ/n − x̄x̄ᵀ


# ---- the bound ------------------------------------------------------------------------------------------------


def tsa_terms(weight: Tensor, shift: Tensor, cov: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(M, Q), each C×C with rows = the label y and columns = the class c:

    M[y, c] = (w_c − w_y)ᵀ shift_y,    Q[y, c] = (w_c − w_y)ᵀ cov_y (w_c − w_y)   (Q = 0 when cov is None).

    weight: C×A classifier matrix (gradients flow); shift: C×A mean shifts; cov: C×A×A (both detached here)."""
    w = weight.float()
    diff = w[None, :, :] - w[:, None, :]                        # [y, c] = w_c − w_y
    m = torch.einsum("yca,ya->yc", diff, shift.detach().float())
    if cov is None:
        return m, torch.zeros_like(m)
    q = torch.einsum("yca,yab,ycb->yc", diff, cov.detach().float(), diff)
    return m, q


def augmented_logits(logits: Tensor, labels: Tensor, m: Tensor, q: Tensor, lam: float) -> Tensor:
    """z̃ = z + λ·M[y, :] + (λ/2)·Q[y, :] per pixel (logits N×C×spatial or N×C, labels N×spatial or N)."""
    extra = lam * m + (lam / 2) * q                              # C×C, row y
    per_pixel = extra[labels.long()]                             # labels.shape × C
    return logits.float() + per_pixel.movedim(-1, 1)


def tsa_loss(logits: Tensor, labels: Tensor, weight: Tensor, shift: Tensor, cov: Tensor | None, lam: float,
             select: Tensor | None = None) -> Tensor:
    """L_tsa = mean over the selected pixels of CE(z̃_i, y_i) (all pixels when `select` is None; 0 when none is
    selected). `shift` and `cov` are per class (rows of classes without statistics should be zero). Float32."""
    with torch.autocast(logits.device.type, enabled=False):            # float32 even inside a bf16 step
        m, q = tsa_terms(weight, shift, cov)
        z = augmented_logits(logits, labels, m, q, lam)
        if select is None:
            return F.cross_entropy(z, labels.long())
        ce = F.cross_entropy(z, labels.long(), reduction="none")
    sel = select.to(ce.dtype)
    return (ce * sel).sum() / sel.sum().clamp_min(1.0)


# ---- classifier inputs ----------------------------------------------------------------------------------------


def check_head(conv: nn.Module) -> None:
    """The classifier must be a plain 'same' convolution: stride 1, dilation 1, one group, zero padding k // 2."""
    if not isinstance(conv, (nn.Conv2d, nn.Conv3d)):
        raise TypeError(f"TSA needs a Conv2d/Conv3d classifier, got {type(conv).__name__}")
    k = conv.kernel_size
    if (any(s != 1 for s in conv.stride) or any(d != 1 for d in conv.dilation) or conv.groups != 1
            or conv.padding_mode != "zeros" or tuple(conv.padding) != tuple(s // 2 for s in k)
            or any(s % 2 == 0 for s in k)):
        raise ValueError(f"TSA needs an odd, stride-1, zero-padded 'same' classifier conv, got {conv}")


def classifier_matrix(conv: nn.Module) -> Tensor:
    """W ∈ R^{C×(A·K)}: the kernel flattened (channel-major, then kernel positions in raster order)."""
    return conv.weight.flatten(1)


def head_inputs(features: Tensor, kernel: Sequence[int], index: Tensor) -> Tensor:
    """The exact classifier inputs a_i (N×A·K) of the pixels at flat positions `index` (into B×spatial) for a
    'same' conv with odd `kernel` on `features` (B×A×spatial): logits_i = W a_i + b with W = `classifier_matrix`.
    For a 1×1 conv a_i is the feature vector itself; for 3×3 the zero-padded 3×3 neighbourhood (F.unfold's order)."""
    spatial = features.shape[2:]
    pad = [p for s in reversed(kernel) for p in (s // 2, s // 2)]
    padded = (F.pad(features, pad) if any(pad) else features).movedim(1, -1)      # B×spatial×A
    b, *pos = torch.unravel_index(index, (features.shape[0], *spatial))
    cols = [padded[(b, *(p + o for p, o in zip(pos, offset)))]
            for offset in itertools.product(*(range(s) for s in kernel))]
    return torch.stack(cols, dim=-1).flatten(1)                 # N×A×K -> N×(A·K)


# ---- class-statistics memory ----------------------------------------------------------------------------------


def class_sums(features: Tensor, labels: Tensor, num_classes: int, max_pixels: int | None = None,
               covariance: bool = True, select: Tensor | None = None,
               kernel: Sequence[int] | None = None) -> dict[str, Tensor]:
    """Per-class sums of one step: `count` (C), `sum` (C×D) and, with `covariance`, `outer` (C×D×D), in float64.

    features: B×A×spatial map; labels: B×spatial; select: B×spatial bool (pixels that may enter; default all).
    At most `max_pixels` pixels per class, drawn uniformly without replacement (torch RNG) when more are
    available. kernel: that of the 'same' classifier conv reading the features (D = A·K, see `head_inputs`); None
    = 1×1 (the feature vectors, D = A). Same keys and shapes for every call (zeros for absent classes), so that
    the sums can be all-reduced over processes."""
    kernel = tuple(kernel) if kernel is not None else (1,) * (features.ndim - 2)
    dim = features.shape[1] * math.prod(kernel)
    flat = labels.reshape(-1).long()
    ok = torch.ones_like(flat, dtype=torch.bool) if select is None else select.reshape(-1).bool()
    dev = features.device
    count = torch.zeros(num_classes, dtype=STATS_DTYPE, device=dev)
    total = torch.zeros(num_classes, dim, dtype=STATS_DTYPE, device=dev)
    outer = torch.zeros(num_classes, dim, dim, dtype=STATS_DTYPE, device=dev) if covariance else None
    feats = features.detach()
    for c in range(num_classes):
        idx = torch.nonzero(ok & (flat == c)).flatten()
        if max_pixels is not None and idx.numel() > max_pixels:
            idx = idx[torch.randperm(idx.numel(), device=idx.device)[:max_pixels]]
        if idx.numel() == 0:
            continue
        a = head_inputs(feats, kernel, idx).to(STATS_DTYPE)
        count[c] = idx.numel()
        total[c] = a.sum(0)
        if covariance:
            outer[c] = a.T @ a
    out = {"count": count, "sum": total}
    if covariance:
        out["outer"] = outer
    return out


class ClassMemory(nn.Module):
    """Per-class EMA statistics of classifier inputs (buffers: checkpointed with the run).

    `mean` C×D, `cov` C×D×D (when `covariance`), `seen` C (bool). `update(sums)` with one step's (all-reduced)
    `class_sums`: a class seen for the first time takes the batch statistics; afterwards, with ρ = momentum,
    batch mean x̄ and batch covariance S (1/n normalisation),

        μ ← ρ μ + (1 − ρ) x̄,    Σ ← ρ Σ + (1 − ρ) S + ρ(1 − ρ)(μ_old − x̄)(μ_old − x̄)ᵀ,

    i.e. the mean and covariance of the EMA mixture of the batch distributions (EMA of the first and second
    moments; positive semi-definite by construction). Classes absent from a step keep their statistics."""

    def __init__(self, num_classes: int, dim: int, momentum: float = 0.99, covariance: bool = True):
        super().__init__()
        self.num_classes, self.dim, self.momentum, self.has_cov = num_classes, dim, momentum, covariance
        self.register_buffer("mean", torch.zeros(num_classes, dim))
        self.register_buffer("cov", torch.zeros(num_classes, dim, dim) if covariance else torch.zeros(0))
        self.register_buffer("seen", torch.zeros(num_classes, dtype=torch.bool))

    @torch.no_grad()
    def update(self, sums: dict[str, Tensor]) -> None:
        rho = self.momentum
        count = sums["count"]
        present = count > 0
        n = count.clamp_min(1)[:, None]
        bmean = sums["sum"] / n
        old = self.mean.to(STATS_DTYPE)
        first = (present & ~self.seen)[:, None]
        later = (present & self.seen)[:, None]
        new_mean = torch.where(first, bmean, torch.where(later, rho * old + (1 - rho) * bmean, old))
        if self.has_cov:
            bcov = sums["outer"] / n[..., None] - bmean[:, :, None] * bmean[:, None, :]
            bcov = (bcov + bcov.transpose(1, 2)) / 2
            d = old - bmean
            mixed = (rho * self.cov.to(STATS_DTYPE) + (1 - rho) * bcov
                     + rho * (1 - rho) * d[:, :, None] * d[:, None, :])
            new_cov = torch.where(first[..., None], bcov, torch.where(later[..., None], mixed,
                                                                      self.cov.to(STATS_DTYPE)))
            self.cov.copy_(new_cov.to(self.cov.dtype))
        self.mean.copy_(new_mean.to(self.mean.dtype))
        self.seen |= present

    def covariance(self, ridge: float = 1e-4) -> Tensor:
        """Σ + ridge·I per class (symmetric positive definite for ridge > 0)."""
        if not self.has_cov:
            raise RuntimeError("this memory keeps no covariance")
        eye = torch.eye(self.dim, device=self.cov.device, dtype=self.cov.dtype)
        return self.cov + ridge * eye


class TSAMemory(nn.Module):
    """The two domains' class statistics of TSA: `source` (labelled pixels, ground truth) and `target` (unlabelled
    pixels, pseudo-labels); the covariance is kept only for the domain that supplies Σ (`cov_domain`)."""

    def __init__(self, num_classes: int, dim: int, momentum: float = 0.99,
                 cov_domain: Literal["source", "target"] = "target"):
        super().__init__()
        self.cov_domain = cov_domain
        self.source = ClassMemory(num_classes, dim, momentum, covariance=cov_domain == "source")
        self.target = ClassMemory(num_classes, dim, momentum, covariance=cov_domain == "target")

    def augmentation(self, toward: Literal["target", "source"], ridge: float = 1e-4) -> tuple[Tensor, Tensor]:
        """(shift, cov) per class for features moved toward `toward`'s statistics: target -> (μ_t − μ_s, Σ_t + ridge·I),
        source -> (μ_s − μ_t, Σ_s + ridge·I). Rows of classes not yet seen in both domains are zero (no augmentation:
        plain CE for those pixels). Detached."""
        to, frm = (self.target, self.source) if toward == "target" else (self.source, self.target)
        valid = (to.seen & frm.seen).to(to.mean.dtype)
        shift = (to.mean - frm.mean) * valid[:, None]
        cov = to.covariance(ridge) * valid[:, None, None]
        return shift.detach(), cov.detach()
