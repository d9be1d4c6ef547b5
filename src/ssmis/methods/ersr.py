"""ERSR (JBHI 2025, arXiv 2508.19815; methods.md "ERSR"): ellipse-constrained pseudo-label refinement and
symmetric regularisation for binary fetal-head segmentation, a Mean-Teacher variant with one sigmoid logit.

The whole method is in this file, in the order of the spec's components:
  B0  student + EMA teacher (whole state dict, BN statistics included; the teacher predicts in eval mode), both
      from a supervised checkpoint: the "pretrain" stage trains the student on labels only with ERSR's L_sup and
      hands its best-validated state to the "train" stage, where the teacher starts as a copy of it.
  B1  dual-scoring filter (`filter_scores`, `ScoreMemory`): Sobel edge score + distance-transform regularity score,
      ranked in a per-epoch memory keyed by batch position, keep ratio r(t), top-up to ⌊0.8·B_u⌋.
  B2  ellipse refinement (`fit_pseudo_label_ellipse`, `refine_pseudo_labels`): the ellipse fit of `ssmis predict`'s
      head-circumference measurement (`ssmis.eval.measure.fit_head_ellipse`), inside/outside re-weighting, hard target.
  B3  symmetry axis = the fitted ellipse's long axis, nearest-neighbour reflection (`reflect`).
  B4  symmetric images X_L, X_R from four masked, randomly perturbed, min-max renormalised pieces
      (`symmetric_images`, `perturb_pieces`).
  B5  losses (`sup_loss`, `symmetry_losses`, `ERSR.train_step`) and the sigmoid ramp w(t).
Evaluation sees the student through `OneLogitAsTwoClasses` (logits [0, z]), which `ssmis eval`/`predict` rebuild.

Cost of the per-image CPU work (B1 distance transform, B2 component/contour/fit: the only per-image Python code,
everything else is batched torch). Measured over 40 ERSR steps at 128×128, 4 + 4, full-width UNet (16-256), fp32 +
channels_last, 1 thread, AMD EPYC (lscpu: AVX-512 with avx512_bf16, no AMX), torch 2.13, head phantom after 100
pre-training steps: step 545 ms; filter + refinement 7.6 ms (1.4 %), of which the numpy distance transforms and
ellipse fits 5.0 ms (0.9 %). The network (teacher forward on 4, student forward/backward on 4 + 3·B′ ≤ 16) dominates.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from scipy import ndimage
from torch import Tensor

from ssmis.engine.ema import EMA
from ssmis.errors import UserError
from ssmis.eval.inference import eval_mode
from ssmis.eval.measure import fit_head_ellipse
from ssmis.methods.base import Batch, Method, MethodConfig, StepOutput
from ssmis.models.one_logit import OneLogitAsTwoClasses
from ssmis.registry import METHODS
from ssmis.schedules import sigmoid_ramp

SOBEL_X = torch.tensor([[1.0, 0.0, -1.0], [2.0, 0.0, -2.0], [1.0, 0.0, -1.0]]) / 8
SOBEL_Y = torch.tensor([[1.0, 2.0, 1.0], [0.0, 0.0, 0.0], [-1.0, -2.0, -1.0]]) / 8
LAPLACE = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]])
MINMAX_EPS = 1e-8          # the piece renormalisation (r - min) / (max - min + 1e-8) [util.py:378]
GAMMA_EPS = 1e-7           # MONAI AdjustContrast
BLUR_TRUNCATE = 4.0        # MONAI GaussianFilter: kernel tail int(4σ + 0.5)


class ERSRConfig(MethodConfig):
    name: Literal["ersr"] = "ersr"
    pretrain_fraction: float = Field(
        0.25, ge=0, lt=1, description="[ours] Share of the run spent in the supervised pre-training stage (labels "
        "only, ERSR's L_sup; its best-validated state starts both student and teacher). The reference loads a "
        "supervised checkpoint whose recipe is not released; 0.25 = BCP's 500 : 1500 split in ACDC-lite.")
    ema_decay: float = Field(0.99, ge=0, lt=1, description="EMA decay, with warm-up min(1 - 1/(t+1), decay), over "
                             "the whole state dict (BN running statistics included).")
    w_max: float = Field(1.0, ge=0, description="Maximum weight of L_seg + L_aug + L_mir.")
    rampup: float = Field(1.0, ge=0, le=1, description="T_w of the sigmoid ramp w(t) as a fraction of the ERSR stage "
                          "(10 000 of 10 000 it); t counts from the stage's first step.")
    keep_rampup: float = Field(1.0, ge=0, le=1, description="T_r of the keep ratio r(t) as a fraction of the ERSR "
                               "stage (10 000 of 10 000 it); r = 1 from T_r on.")
    keep_start: float = Field(0.5, gt=0, le=1, description="Keep ratio at t = 0: r(t) = start + (1 - start)·ramp.")
    min_keep: float = Field(0.8, ge=0, le=1, description="At least max(1, ⌊min_keep·B_u⌋) images of each unlabelled "
                            "batch are kept (top-up by score).")
    alpha: float = Field(0.5, ge=0, le=1, description="Score mix S = α·S_edge + (1 - α)·S_reg (lower = better).")
    score_threshold: float = Field(0.5, gt=0, lt=1, description="Binarisation of the teacher map for the "
                                   "distance-transform score.")
    tau: float = Field(0.6, gt=0, lt=1, description="Ellipse threshold τ: binarisation before the fit (after uint8 "
                       "quantisation) and of the refined map (the hard pseudo-label).")
    inside_base: float = Field(0.6, description="Inside the ellipse p' = max(p, min(1, base + (1 - d)^exponent)).")
    inside_exponent: float = Field(2.0, description="Exponent of the inside fill.")
    outside_decay: float = Field(0.5, ge=0, description="Outside the ellipse p' = p·exp(-decay·(d - 1)).")
    p_noise: float = Field(0.2, ge=0, le=1, description="Probability of masked Gaussian noise per piece image.")
    noise_std: float = Field(0.05, ge=0, description="Standard deviation of the noise.")
    noise_sample_std: bool = Field(False, description="Draw the noise std from U(0, noise_std) each time, as MONAI's "
                                   "RandGaussianNoise does by default since 1.2 (the reference pins monai 1.3.0); "
                                   "false = σ = noise_std as methods.md states.")
    p_gamma: float = Field(0.2, ge=0, le=1, description="Probability of a masked gamma contrast change per piece.")
    gamma: tuple[float, float] = Field((1.2, 1.8), description="Range of γ (MONAI RandAdjustContrast).")
    p_shift: float = Field(0.2, ge=0, le=1, description="Probability of a masked intensity shift per piece.")
    shift: float = Field(0.1, ge=0, description="Shift drawn from U(-shift, shift).")
    p_blur: float = Field(0.2, ge=0, le=1, description="Probability of a masked Gaussian blur per piece.")
    blur_sigma: tuple[float, float] = Field((0.5, 1.5), description="Range of the blur σ, drawn per axis.")
    soft_target: bool = Field(False, description="[ours] L_seg against the refined soft map p' instead of the hard "
                              "pseudo-label 1[p' > τ] (the code's); the symmetric images always use the hard one.")
    skip_degenerate: bool = Field(False, description="[ours] Drop images whose teacher map gives no ellipse from the "
                                  "unlabelled terms; the code keeps them with an all-zero target (a deviation).")
    compat_zero_pad_score: bool = Field(False, description="Zero padding for the regularity score's Laplacian, as "
                                        "the code: the image border then dominates the score (methods.md, "
                                        "Pitfalls); default replicate padding.")
    epoch_len: int | None = Field(None, ge=1, description="Iterations per epoch of the score memory. null = "
                                  "⌊n/labeled_bs⌋ as the reference's loader (n = labelled training images, "
                                  "labeled_bs = the global labelled batch, also under DDP).")


# ---- B1: dual-scoring filter ----------------------------------------------------------------------------------

def edge_score(p: Tensor) -> Tensor:
    """Mean Sobel/8 gradient magnitude √(gx² + gy² + 1e-6) of soft maps B×1×H×W (zero padding) -> B."""
    k = torch.stack([SOBEL_X, SOBEL_Y])[:, None].to(p)
    g = F.conv2d(p, k, padding=1)
    return torch.sqrt(g.pow(2).sum(1) + 1e-6).mean((1, 2))


def regularity_score(p: Tensor, threshold: float = 0.5, zero_pad: bool = False) -> Tensor:
    """Mean |Laplacian * D| of soft maps B×1×H×W -> B, where D is each pixel's distance to the nearest pixel of
    1[p > threshold] (0 inside it; all 0 for an empty mask, as kornia's approximation gives). The Laplacian uses
    replicate padding, or zero padding with `zero_pad` (the code's; the border term then dominates)."""
    fg = (p[:, 0] > threshold).cpu().numpy()
    dist = np.stack([ndimage.distance_transform_edt(~m) if m.any() else np.zeros(m.shape) for m in fg])
    d = torch.from_numpy(dist.astype(np.float32)).to(p.device)[:, None]
    d = d if zero_pad else F.pad(d, (1, 1, 1, 1), mode="replicate")
    return F.conv2d(d, LAPLACE[None, None].to(d), padding=1 if zero_pad else 0).abs().mean((1, 2, 3))


def filter_scores(p: Tensor, cfg: ERSRConfig) -> Tensor:
    """S = α·S_edge + (1 − α)·S_reg per map (lower = better), on the CPU as float32."""
    s = cfg.alpha * edge_score(p) + (1 - cfg.alpha) * regularity_score(p, cfg.score_threshold,
                                                                        cfg.compat_zero_pad_score)
    return s.float().cpu()


def keep_ratio(t: int, length: float, start: float = 0.5) -> float:
    """r(t) = start + (1 − start)·exp(−5(1 − min(t, T_r)/T_r)²); 1 from T_r on."""
    return 1.0 if t >= length else start + (1 - start) * sigmoid_ramp(t, length)


class ScoreMemory:
    """The selector's score dictionary: rebuilt every epoch, keyed by batch position (batch_idx·B_u + k), not by
    sample id [seletor.py]."""

    def __init__(self):
        self.scores: dict[int, float] = {}
        self.epoch = 0

    def select(self, epoch: int, batch_idx: int, scores: list[float], ratio: float, min_keep: float) -> list[int]:
        """Batch positions kept: the current images among the first ⌊r·n⌋ of all scores stored this epoch (in batch
        order), topped up with the best-scoring others of the batch to max(1, ⌊min_keep·B_u⌋)."""
        if epoch != self.epoch:
            self.scores, self.epoch = {}, epoch
        b = len(scores)
        keys = [batch_idx * b + k for k in range(b)]
        self.scores.update(zip(keys, scores))
        ranked = sorted(self.scores.items(), key=lambda kv: kv[1])
        selected = {k for k, _ in ranked[: int(len(ranked) * ratio)]}
        kept = [k for k in range(b) if keys[k] in selected]
        need = max(1, int(b * min_keep))
        if len(kept) < need:
            rest = sorted((k for k in range(b) if keys[k] not in selected), key=lambda k: scores[k])
            kept += rest[: need - len(kept)]
        return kept

    def state_dict(self) -> dict:
        return {"scores": dict(self.scores), "epoch": self.epoch}

    def load_state_dict(self, s: dict) -> None:
        self.scores, self.epoch = dict(s["scores"]), int(s["epoch"])


# ---- B2: ellipse-constrained refinement ------------------------------------------------------------------------

def fit_pseudo_label_ellipse(p: np.ndarray, tau: float) -> tuple[float, float, float, float, float] | None:
    """(cx, cy, θ, s_n, s_t) of the ellipse fitted to a teacher map H×W, or None (degenerate). The map is quantised
    to uint8, binarised (> τ·255), and its largest component's boundary fitted (the head-circumference fit of `ssmis
    predict`). θ is the direction of the SHORT axis n, s_n and s_t the semi-axes along n and along the long axis t,
    so the symmetry line L (through the centre, orthogonal to n) is the long axis, as OpenCV's convention gives in the
    code. None when no pixel or every pixel is above τ (the code's border-rectangle contour), the component has
    fewer than 5 pixels, or the fit fails."""
    fg = (p * 255).astype(np.uint8) > tau * 255
    if not fg.any() or fg.all():
        return None
    fit = fit_head_ellipse(fg)
    if fit is None or not all(map(math.isfinite, fit)) or min(fit[2], fit[3]) <= 0:
        return None
    xc, yc, a, b, theta = fit                 # scikit-image: semi-axis a along θ, b across (either may be longer)
    return (xc, yc, theta, a, b) if a <= b else (xc, yc, theta + math.pi / 2, b, a)


def refine_pseudo_labels(p: Tensor, fits: list[tuple | None], cfg: ERSRConfig) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(target, hard pseudo-label, axis B×3 = (cx, cy, θ of n), degenerate B) for teacher maps p B×1×H×W.

    d = (u/s_n)² + (v/s_t)² with u, v the coordinates along n and t; inside (d ≤ 1) p' = max(p, min(1, base +
    (1 − d)^k)), outside p' = p·exp(−decay·(d − 1)); Ŷ = 1[p' > τ]. A degenerate map gets an all-zero pseudo-label
    and the axis through the image centre (W/2, H/2) with θ = 0 [util.py:126-132]."""
    b, _, h, w = p.shape
    dev = p.device
    degenerate = torch.tensor([f is None for f in fits], device=dev)
    params = torch.tensor([f if f is not None else (w / 2, h / 2, 0.0, 1.0, 1.0) for f in fits],
                          dtype=torch.float64, device=dev).view(b, 5, 1, 1)
    cx, cy, th, s_n, s_t = params.unbind(1)
    xx, yy = pixel_grid(h, w, dev)
    u = (xx - cx) * th.cos() + (yy - cy) * th.sin()
    v = -(xx - cx) * th.sin() + (yy - cy) * th.cos()
    d = (u / s_n) ** 2 + (v / s_t) ** 2
    q = p[:, 0].double()
    inside = torch.maximum(q, (cfg.inside_base + (1 - d).clamp(min=0) ** cfg.inside_exponent).clamp(max=1))
    refined = torch.where(d <= 1, inside, q * torch.exp(-cfg.outside_decay * (d - 1)))
    refined = torch.where(degenerate.view(b, 1, 1), torch.zeros_like(refined), refined)
    hard = (refined > cfg.tau).float()[:, None]
    target = refined.float()[:, None] if cfg.soft_target else hard
    axis = torch.cat([cx, cy, th], 1).view(b, 3)
    return target, hard, axis, degenerate


# ---- B3: symmetry axis and reflection --------------------------------------------------------------------------

def pixel_grid(h: int, w: int, device) -> tuple[Tensor, Tensor]:
    """(x, y) float64 H×W: x = column, y = row, pixel centres at integers (the coordinates of the fit)."""
    yy, xx = torch.meshgrid(torch.arange(h, device=device, dtype=torch.float64),
                            torch.arange(w, device=device, dtype=torch.float64), indexing="ij")
    return xx, yy


def reflect_points(x: Tensor, y: Tensor, axis: Tensor) -> tuple[Tensor, Tensor]:
    """R(p) = c + 2((p − c)·t)t − (p − c), t = (−sin θ, cos θ): reflection across L of points (x, y) B×..."""
    cx, cy, th = axis.double().view(-1, 3, *([1] * (x.dim() - 1))).unbind(1)
    tx, ty = -th.sin(), th.cos()
    vx, vy = x - cx, y - cy
    dot = vx * tx + vy * ty
    return cx + 2 * dot * tx - vx, cy + 2 * dot * ty - vy


def reflect(img: Tensor, axis: Tensor) -> Tensor:
    """Images B×C×H×W reflected across their lines L: nearest-neighbour gather at R(p), rounded and clamped."""
    b, c, h, w = img.shape
    xx, yy = pixel_grid(h, w, img.device)
    rx, ry = reflect_points(xx.expand(b, h, w), yy.expand(b, h, w), axis)
    idx = ry.round().clamp(0, h - 1).long() * w + rx.round().clamp(0, w - 1).long()
    return img.reshape(b, c, h * w).gather(2, idx.view(b, 1, h * w).expand(b, c, h * w)).view(b, c, h, w)


def negative_half(axis: Tensor, h: int, w: int) -> Tensor:
    """1_{H⁻} = 1[(p − c)·n < 0], B×1×H×W float."""
    xx, yy = pixel_grid(h, w, axis.device)
    cx, cy, th = axis.double().view(-1, 3, 1, 1).unbind(1)
    return ((xx - cx) * th.cos() + (yy - cy) * th.sin() < 0).float()[:, None]


def mirrored_halves(q: Tensor, axis: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(q·1_{H⁻}, R(q·1_{H⁻}), q·1_{H⁺}, R(q·1_{H⁺})) [util.py split_and_reflect_by_axis]."""
    neg = negative_half(axis, *q.shape[2:]).to(q)
    lo, hi = q * neg, q * (1 - neg)
    return lo, reflect(lo, axis), hi, reflect(hi, axis)


# ---- B4: symmetric images ----------------------------------------------------------------------------------------

def _minmax(r: Tensor) -> Tensor:
    flat = r.flatten(1)
    mn, mx = flat.min(1).values.view(-1, 1, 1, 1), flat.max(1).values.view(-1, 1, 1, 1)
    return (r - mn) / (mx - mn + MINMAX_EPS)


def _blur(r: Tensor, sigma: Tensor) -> Tensor:
    """Gaussian blur of each image N×1×H×W with its own σ (N×2, per axis): MONAI's unnormalised erf-sampled kernel
    truncated at int(4σ + 0.5) taps per side, separable, zero padding."""
    n = r.shape[0]
    tail = int(BLUR_TRUNCATE * float(sigma.max()) + 0.5)
    x = torch.arange(-tail, tail + 1, device=r.device, dtype=torch.float32)
    out = r.transpose(0, 1)                          # 1×N×H×W: one group per image
    for dim in (0, 1):
        s = sigma[:, dim:dim + 1].float()
        t = 0.70710678 / s
        k = (0.5 * (torch.erf(t * (x + 0.5)) - torch.erf(t * (x - 0.5)))).clamp(min=0)
        k = k * (x.abs() <= (BLUR_TRUNCATE * s + 0.5).floor()).float()
        weight = k.view(n, 1, -1, 1) if dim == 0 else k.view(n, 1, 1, -1)
        out = F.conv2d(out, weight, padding=(tail, 0) if dim == 0 else (0, tail), groups=n)
    return out.transpose(0, 1)


def perturb_pieces(r: Tensor, m: Tensor, cfg: ERSRConfig) -> Tensor:
    """Masked random intensity perturbations of piece images r N×1×H×W with masks m, each sample on its own [util.py
    apply_random_pixel_perturbation]: Gaussian noise, gamma contrast, intensity shift, Gaussian blur, each with its
    probability, in that order, each applied only inside the mask (r·(1 − m) + T(r)·m); after each of the four the
    whole piece is min-max renormalised, whether the transform fired or not."""
    n, dev = r.shape[0], r.device

    def draw(lo, hi):
        return (lo + (hi - lo) * torch.rand(n, device=dev)).view(n, 1, 1, 1)

    def noise(x):
        std = draw(0.0, cfg.noise_std) if cfg.noise_sample_std else cfg.noise_std
        return x + torch.randn_like(x) * std

    def gamma(x):
        flat = x.flatten(1)
        mn, mx = flat.min(1).values.view(n, 1, 1, 1), flat.max(1).values.view(n, 1, 1, 1)
        return ((x - mn) / (mx - mn + GAMMA_EPS)) ** draw(*cfg.gamma) * (mx - mn) + mn

    def shift(x):
        return x + draw(-cfg.shift, cfg.shift)

    def blur(x):
        lo, hi = cfg.blur_sigma
        return _blur(x, lo + (hi - lo) * torch.rand(n, 2, device=dev))

    for prob, transform in ((cfg.p_noise, noise), (cfg.p_gamma, gamma), (cfg.p_shift, shift), (cfg.p_blur, blur)):
        fire = (torch.rand(n, device=dev) < prob).view(n, 1, 1, 1)
        if fire.any():
            r = torch.where(fire, r * (1 - m) + transform(r) * m, r)
        r = _minmax(r)
    return r


def symmetric_images(x: Tensor, y_hat: Tensor, axis: Tensor, cfg: ERSRConfig) -> tuple[Tensor, Tensor]:
    """X_L = Bg + A⁻ + R(A⁻), X_R = Bg + A⁺ + R(A⁺) with Bg = X·(1 − 1[M⁻ + M⁺ > 0]), A^± = X·M^±, M^± = Ŷ·1_{H^±};
    the four pieces perturbed and renormalised independently, each within its mask (a mirror's mask = the mirrored
    mask). An empty Ŷ gives X_L = X_R = X."""
    m_neg, r_neg, m_pos, r_pos = mirrored_halves(y_hat, axis)
    bg = x * (1 - ((m_neg + m_pos) > 0).to(x))
    a_neg, a_pos = x * m_neg, x * m_pos
    pieces = torch.cat([a_neg, reflect(a_neg, axis), a_pos, reflect(a_pos, axis)])
    p = perturb_pieces(pieces, torch.cat([m_neg, r_neg, m_pos, r_pos]).to(x), cfg).chunk(4)
    return bg + p[0] + p[1], bg + p[2] + p[3]


# ---- B5: losses --------------------------------------------------------------------------------------------------

def sup_loss(z: Tensor, label: Tensor) -> Tensor:
    """L_sup = ½[BCE-with-logits(z, y) + DiceFocal(σ(z), y)] with MONAI DiceFocalLoss defaults fed probabilities, as
    the code: Dice per image, smooth 1e-5 (numerator and denominator), Σp + Σg; the focal part (γ = 2, mean) treats
    its input as logits, so it applies a second sigmoid. z: B×1×H×W logits, label: B×H×W in {0, 1}."""
    z = z.float()
    y = label.float()[:, None]
    bce = F.binary_cross_entropy_with_logits(z, y)
    p = z.sigmoid()
    dice = 1 - (2 * (p * y).sum((2, 3)) + 1e-5) / (p.sum((2, 3)) + y.sum((2, 3)) + 1e-5)
    focal = torch.exp(2 * F.logsigmoid(-p * (2 * y - 1))) * F.binary_cross_entropy_with_logits(p, y, reduction="none")
    return 0.5 * (bce + dice.mean() + focal.mean())


def symmetry_losses(q0: Tensor, q_sym: Tensor, axis: Tensor) -> tuple[Tensor, Tensor]:
    """(L_aug, L_mir) from the student's probabilities on the selected images q0 (B′) and on [X_L; X_R] (2B′):
    L_aug = MSE([Q_L; Q_R], [T_L; T_R]) with T_L = Q0·1_{H⁻} + R(Q0·1_{H⁻}), T_R = Q0·1_{H⁺} + R(Q0·1_{H⁺}) (not
    detached, as the code); L_mir = MSE([Q_L; Q_R]·1_{H⁻}, R([Q_L; Q_R]·1_{H⁺}))."""
    lo, lo_r, hi, hi_r = mirrored_halves(q0, axis)
    aug = F.mse_loss(q_sym, torch.cat([lo + lo_r, hi + hi_r]))
    s_lo, _, _, s_hi_r = mirrored_halves(q_sym, torch.cat([axis, axis]))
    return aug, F.mse_loss(s_lo, s_hi_r)


# ---- method ------------------------------------------------------------------------------------------------------

@METHODS.register("ersr")
class ERSR(Method):
    """ERSR: ellipse-refined EMA-teacher pseudo-labels + symmetric consistency, binary 2D, one sigmoid logit."""

    Config = ERSRConfig

    stages = ("pretrain", "train")
    default_augment = "bcp"                  # the BCP-variant RandomGenerator [fetal_head_dataset.py:245-248]
    spatial_dims = frozenset({2})

    def build(self, ctx):
        if ctx.num_classes > 2:
            raise UserError("data.num_classes", f"ERSR segments one foreground class with one sigmoid logit, but the "
                            f"data have {ctx.num_classes} classes",
                            "Train ERSR on binary data (background + one class, e.g. HC18 or the head phantom), or "
                            "choose a multi-class method.")
        student = ctx.build_model(num_classes=1)
        self.student = ctx.add("student", student, trainable=True)
        # whole state dict, warm-up α_t; num_batches_tracked (unused with BN momentum 0.1) is copied, not left as is
        self.teacher = ctx.add("teacher", EMA(student, self.cfg.ema_decay, warmup=True, buffers=True), trainable=False)
        self.evaluated = OneLogitAsTwoClasses(student)
        self.train_start = int(round(self.cfg.pretrain_fraction * ctx.total_steps))   # as Trainer.stage_bounds
        self.stage_len = ctx.total_steps - self.train_start
        self.stage = self.stages[0]
        self._entered: str | None = None
        self.memory = ScoreMemory()
        # iterations per epoch of the score memory: epoch_len, or ⌊n/labeled_bs⌋ as the reference's loader
        n, bs = ctx.labeled_count, ctx.labeled_bs
        self.epoch_iters = self.cfg.epoch_len or (max(1, n // bs) if n and bs else None)

    def stage_fractions(self) -> tuple[float, ...]:
        return (self.cfg.pretrain_fraction, 1.0 - self.cfg.pretrain_fraction)

    def handover_stages(self) -> frozenset[str]:
        return frozenset({"pretrain"})

    def on_stage_start(self, stage: str, resumed: bool) -> None:
        started = (self._entered == stage) if self._entered is not None else resumed
        self.stage = stage
        if stage == "train" and not started:       # both networks start from the supervised (pre-trained) student
            with torch.no_grad():
                self.teacher.module.load_state_dict(self.ctx.modules["student"].state_dict())
        self._entered = stage

    def epoch_length(self) -> int | None:
        """Iterations per epoch of the score memory (None: one epoch, when the labelled set size is unknown)."""
        return self.epoch_iters

    def train_step(self, lb: Batch, ub: Batch | None, step: int) -> StepOutput:
        sup = sup_loss(self.student(lb.image).logits, lb.label)
        if self.stage == "pretrain":
            return StepOutput(sup, {"sup": sup.detach()})
        if ub is None:
            raise UserError("train.unlabeled_bs", "ERSR's self-training needs unlabelled images", "Set it above 0.")
        cfg, t = self.cfg, step - self.train_start
        with torch.no_grad(), eval_mode(self.teacher):
            probs = self.teacher(ub.image).logits.float().sigmoid()
        # B1: keep the most regular teacher maps
        e = self.epoch_length()
        epoch, batch_idx = divmod(t, e) if e else (0, t)
        kept = self.memory.select(epoch, batch_idx, filter_scores(probs, cfg).tolist(),
                                  keep_ratio(t, cfg.keep_rampup * self.stage_len, cfg.keep_start), cfg.min_keep)
        x, p = ub.image[kept], probs[kept]
        # B2: ellipse-refined pseudo-labels
        fits = [fit_pseudo_label_ellipse(m, cfg.tau) for m in p[:, 0].cpu().numpy()]
        target, hard, axis, degenerate = refine_pseudo_labels(p, fits, cfg)
        if cfg.skip_degenerate and degenerate.any():
            ok = ~degenerate
            x, target, hard, axis = x[ok], target[ok], hard[ok], axis[ok]
        w = cfg.w_max * sigmoid_ramp(t, cfg.rampup * self.stage_len)
        logs = {"sup": sup.detach(), "w": w, "kept": len(kept), "degenerate": int(degenerate.sum())}
        n = x.shape[0]
        if n == 0:
            return StepOutput(sup, logs)
        # B3/B4: symmetric images; B5: one student forward on [X_sel; X_L; X_R]
        x_l, x_r = symmetric_images(x, hard, axis, cfg)
        q = self.student(torch.cat([x, x_l, x_r])).logits.float().sigmoid()
        q0, q_sym = q[:n], q[n:]
        seg = F.mse_loss(q0, target)
        aug, mir = symmetry_losses(q0, q_sym, axis)
        logs.update(seg=seg.detach(), aug=aug.detach(), mir=mir.detach())
        return StepOutput(sup + w * (seg + aug + mir), logs)

    def after_step(self, step: int) -> None:
        if self.stage == "train":
            self.teacher.update(self.ctx.modules["student"], step - self.train_start)

    def eval_model(self):
        return self.evaluated

    def extra_state(self) -> dict[str, Any]:
        return {"entered_stage": self._entered, "memory": self.memory.state_dict()}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self._entered = state.get("entered_stage")
        self.memory.load_state_dict(state["memory"])
