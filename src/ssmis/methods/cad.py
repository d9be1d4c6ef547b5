"""CAD (Confidence-Aware Adaptive Displacement) — a RECONSTRUCTION from the abstract (arXiv 2502.00536; no public
code was available), methods.md "CAD". Label every result "CAD (reconstruction)", never "CAD".

Built on ABD with the BCP host (`ssmis.methods.abd`): BCP pre-training, then two students on the weak / strong
mixed views with one EMA teacher, BCP mix losses and cross Dice on the mixed and on the displaced images. Only
ABD-R is replaced, by LLCR (Largest Low-Confidence Region Replacement): per view and sample, the largest
8-connected region whose confidence is below τ(t) is replaced by the other view's most confident window of the
same size (both directions); without such a region, ABD's simple grid displacement. DTE (Dynamic Threshold
Escalation) raises τ(t) and the largest allowed region s_max(t) linearly over the self-training stage. Optional
`abd_i`: ABD-I on the labelled images (off by default, a further reconstruction choice).
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import torch
from pydantic import Field, model_validator
from scipy import ndimage
from torch import Tensor
from torch.nn import functional as F

from ssmis.data.mixing import abd_i, patch_confidence, swap_patches
from ssmis.losses import ce_dice_loss
from ssmis.methods.abd import ABD, strong_view
from ssmis.methods.base import Batch, StepOutput
from ssmis.methods.bcp import BCPConfig
from ssmis.registry import METHODS

Box = tuple[slice, slice]

# ---- DTE ------------------------------------------------------------------------------------------------


def dte(progress: float, start: float, end: float) -> float:
    """start + (end − start)·t/T for progress t/T (clamped to [0, 1])."""
    return start + (end - start) * min(max(progress, 0.0), 1.0)


def pixels(fraction: float, side: int) -> int:
    """⌊fraction·side⌋ pixels, at least 1 (0.125 of 256 = 32, of 128 = 16)."""
    return max(1, int(math.floor(fraction * side + 1e-9)))


# ---- LLCR -----------------------------------------------------------------------------------------------

_EIGHT_PER_SLICE = np.zeros((3, 3, 3), dtype=bool)
_EIGHT_PER_SLICE[1] = True                 # 8-connectivity inside each sample, none across samples


def largest_components(mask: np.ndarray) -> list[tuple[Box, tuple[float, float]] | None]:
    """Per sample of a B×H×W boolean mask: the bounding box and centroid (row, col) of its largest 8-connected
    component (ties: the first in raster order), None where the sample has no True pixel. One labelling call
    for the whole batch."""
    lab, n = ndimage.label(mask, structure=_EIGHT_PER_SLICE)
    out: list[tuple[Box, tuple[float, float]] | None] = [None] * mask.shape[0]
    if n == 0:
        return out
    sizes = np.bincount(lab.ravel(), minlength=n + 1)[1:]
    boxes = ndimage.find_objects(lab)
    sample = np.array([b[0].start for b in boxes])
    for i in np.unique(sample):
        ids = np.flatnonzero(sample == i)
        k = int(ids[np.argmax(sizes[ids])])
        _, rows, cols = boxes[k]
        r, c = np.nonzero(lab[boxes[k]][0] == k + 1)                       # the component inside its box
        out[int(i)] = ((rows, cols), (rows.start + float(r.mean()), cols.start + float(c.mean())))
    return out


def fit_side(span: slice, centre: float, s_min: int, s_max: int, side: int) -> slice:
    """The bounding-box extent `span` resized to lie in [s_min, s_max], centred on `centre` (the component's
    centroid): a cropped window stays inside the box, an enlarged one contains it, and both stay in the image.
    Extents already in range are kept."""
    lo, hi = span.start, span.stop
    size = min(max(hi - lo, s_min), s_max, side)
    start = math.floor(centre - (size - 1) / 2 + 0.5)
    start = min(max(start, min(lo, hi - size)), max(lo, hi - size))         # inside the box / around it
    start = min(max(start, 0), side - size)                                 # inside the image
    return slice(start, start + size)


def llcr_boxes(conf: Tensor, tau: float, s_max: tuple[int, int], s_min: tuple[int, int]) -> list[Box | None]:
    """Per sample of a B×H×W confidence map: the region LLCR replaces — the bounding box of the largest
    8-connected component of [conf < tau], each side brought into [s_min, s_max] around its centroid; None
    where no pixel is below tau."""
    h, w = conf.shape[-2:]
    out: list[Box | None] = []
    for found in largest_components((conf < tau).cpu().numpy()):
        if found is None:
            out.append(None)
            continue
        (rows, cols), (r, c) = found
        out.append((fit_side(rows, r, s_min[0], s_max[0], h), fit_side(cols, c, s_min[1], s_max[1], w)))
    return out


def best_window(conf: Tensor, size: tuple[int, int], stride: int) -> Box:
    """The window of `size` with the highest mean of conf (H×W) among the offsets of an average pooling with
    `stride` (ties: the first in raster order)."""
    pooled = F.avg_pool2d(conf[None, None].float(), size, stride)[0, 0]
    r, c = divmod(int(pooled.flatten().argmax()), pooled.shape[1])
    return slice(r * stride, r * stride + size[0]), slice(c * stride, c * stride + size[1])


def grid_displacement(x1: Tensor, x2: Tensor, conf1: Tensor, conf2: Tensor, grid: int) -> tuple[Tensor, Tensor]:
    """ABD-R's simple variant (BCP host): each view's least confident grid patch <- the other view's most
    confident one (conf: B×H×W)."""
    s1, s2 = patch_confidence(conf1[:, None], grid), patch_confidence(conf2[:, None], grid)
    return swap_patches(x1, x2, s1.argmin(1), s2.argmax(1), s2.argmin(1), s1.argmax(1), grid)


def llcr_regions(conf: Tensor, source_conf: Tensor, tau: float, s_max: tuple[int, int], s_min: tuple[int, int],
                 stride: int) -> list[tuple[Box, Box] | None]:
    """Per sample: (the region LLCR replaces in the view of `conf`, the window of the source view, of
    `source_conf`, that fills it) — `llcr_boxes(conf)` and `best_window(source_conf)` of the same size; None where
    no pixel is below tau. conf, source_conf: B×H×W (one connected-component labelling for the whole batch)."""
    out: list[tuple[Box, Box] | None] = []
    for i, box in enumerate(llcr_boxes(conf, tau, s_max, s_min)):
        if box is None:
            out.append(None)
            continue
        rows, cols = box
        out.append((box, best_window(source_conf[i], (rows.stop - rows.start, cols.stop - cols.start), stride)))
    return out


def llcr(x1: Tensor, x2: Tensor, conf1: Tensor, conf2: Tensor, tau: float, s_max: tuple[int, int],
         s_min: tuple[int, int], stride: int, grid: int) -> tuple[Tensor, Tensor]:
    """Bidirectional LLCR: per sample, view 1's region of `llcr_boxes(conf1)` <- view 2's most confident window of
    the same size (`best_window(conf2)`), and view 2's region <- view 1's window (`llcr_regions`); sources are read
    from the inputs. A view without a pixel below tau gets the grid displacement instead (`grid_displacement`).
    x: B×C×H×W images, conf: B×H×W confidence maps. Returns the displaced (x1', x2')."""
    g1, g2 = grid_displacement(x1, x2, conf1, conf2, grid)
    regions = llcr_regions(torch.cat([conf1, conf2]), torch.cat([conf2, conf1]), tau, s_max, s_min, stride)
    n, out = x1.shape[0], []
    for x, src, g, view_regions in ((x1, x2, g1, regions[:n]), (x2, x1, g2, regions[n:])):
        y = x.clone()                                                  # keeps the memory format
        for i, region in enumerate(view_regions):
            if region is None:
                y[i] = g[i]
                continue
            (rows, cols), (sr, sc) = region
            y[i, :, rows, cols] = src[i, :, sr, sc]
        out.append(y)
    return out[0], out[1]


# ---- method ---------------------------------------------------------------------------------------------


class CADConfig(BCPConfig):
    grid: int = Field(4, ge=1, description="Grid of the fallback displacement (ABD's 4×4 patches) when no pixel "
                      "is below τ(t).")
    cutout_p: float = Field(0.5, ge=0, le=1, description="Probability of Cutout in the strong view (as ABD).")
    cross_weight: float = Field(1.0, ge=0, description="Weight of the cross Dice terms on mixed and displaced "
                                "images (1 from the first self-training step, as ABD-BCP).")
    conf_source: Literal["student", "teacher"] = Field(
        "student", description="Confidence maps (max softmax) from the network that sees the view (f1 on the "
        "weak, f2 on the strong mixed images) or from the EMA teacher on both.")
    tau_start: float = Field(0.75, description="DTE: confidence threshold τ at the start of self-training.")
    tau_end: float = Field(0.95, description="DTE: τ at the end of self-training (linear in between).")
    size_start: float = Field(0.125, description="DTE: largest replaced side s_max at the start of self-training, "
                              "as a fraction of the image side (32 px at 256, 16 at 128).")
    size_end: float = Field(0.5, description="DTE: s_max at the end of self-training (128 px at 256, 64 at 128).")
    size_min: float = Field(0.0625, description="Smallest replaced side s_min, fraction of the image side (16 px at "
                            "256, 8 at 128).")
    pool_stride: float = Field(0.0625, description="Stride of the source-window search (average pooling), fraction "
                               "of the image side (16 px at 256, 8 at 128).")
    abd_i: bool = Field(False, description="Also ABD-I on the labelled images (weak / fresh strong view), loss "
                        "0.5(CE + Dice) on both networks; off by default (a reconstruction choice).")
    abd_i_prob: float = Field(0.5, ge=0, le=1, description="ABD-I: probability per labelled sample.")
    abd_i_weight: float = Field(2.0, ge=0, description="ABD-I: weight of its supervised terms.")
    abd_i_until: float = Field(2 / 3, ge=0, le=1, description="ABD-I: switched off from this fraction of the "
                               "self-training steps on (20 000 of 30 000 it).")

    @property
    def host(self) -> str:
        """CAD runs in ABD's BCP host only."""
        return "bcp"

    @model_validator(mode="after")
    def _consistent_schedules(self) -> CADConfig:
        problems = []
        for key in ("tau_start", "tau_end"):
            if not 0 <= getattr(self, key) <= 1:
                problems.append(f"{key}={getattr(self, key)} is outside [0, 1]")
        for key in ("size_start", "size_end", "size_min", "pool_stride"):
            if not 0 < getattr(self, key) <= 1:
                problems.append(f"{key}={getattr(self, key)} is outside (0, 1] (a fraction of the image side)")
        for lo, hi in (("tau_start", "tau_end"), ("size_start", "size_end"), ("size_min", "size_start")):
            if getattr(self, lo) > getattr(self, hi):
                problems.append(f"{lo}={getattr(self, lo)} > {hi}={getattr(self, hi)}")
        if problems:
            raise ValueError("CAD schedule: " + "; ".join(problems) + " (need 0 <= tau_start <= tau_end <= 1 and "
                             "0 < size_min <= size_start <= size_end <= 1)")
        return self


@METHODS.register("cad")
class CAD(ABD):
    """CAD (reconstruction): ABD-BCP with ABD-R replaced by largest-low-confidence-region replacement + DTE."""

    class Config(CADConfig):
        name: Literal["cad"] = "cad"

    def selftrain_progress(self, step: int) -> float:
        """t/T of DTE and of the ABD-I switch-off, counted over the self-training stage (0 at its first step)."""
        total = self.ctx.total_steps
        start = int(round(self.stage_fractions()[0] * total))      # the trainer's first self-training step
        return min(max((step - start) / max(total - start, 1), 0.0), 1.0)

    def threshold(self, step: int) -> float:
        """τ(t) = τ₀ + (τ₁ − τ₀)·t/T."""
        return dte(self.selftrain_progress(step), self.cfg.tau_start, self.cfg.tau_end)

    def max_side(self, step: int, side: int) -> int:
        """s_max(t) = s₀ + (s₁ − s₀)·t/T in pixels of an image side of `side` pixels."""
        return pixels(dte(self.selftrain_progress(step), self.cfg.size_start, self.cfg.size_end), side)

    def confidence(self, x: Tensor, z: Tensor) -> Tensor:
        """Max-softmax confidence map (B×H×W, detached) of the view x: from its own network's logits z, or from
        the EMA teacher."""
        with torch.no_grad():
            logits = self.teacher(x).logits if self.cfg.conf_source == "teacher" else z
            return logits.detach().float().softmax(1).amax(1)

    def displace(self, x1: Tensor, x2: Tensor, z1: Tensor, z2: Tensor, step: int) -> tuple[Tensor, Tensor]:
        """LLCR with the DTE threshold and sizes of this step (replaces ABD-R)."""
        cfg, (h, w) = self.cfg, x1.shape[-2:]
        s_max = (self.max_side(step, h), self.max_side(step, w))
        s_min = (pixels(cfg.size_min, h), pixels(cfg.size_min, w))
        stride = pixels(cfg.pool_stride, min(h, w))
        return llcr(x1, x2, self.confidence(x1, z1), self.confidence(x2, z2), self.threshold(step), s_max, s_min,
                    stride, cfg.grid)

    def abd_i_active(self, step: int) -> bool:
        """ABD-I (option `abd_i`) runs before `abd_i_until` of the self-training steps."""
        return self.cfg.abd_i and self.selftrain_progress(step) < self.cfg.abd_i_until

    def _bcp_step(self, lb: Batch, ub: Batch, step: int) -> StepOutput:
        out = super()._bcp_step(lb, ub, step)
        if not self.abd_i_active(step):
            return out
        loss = self.abd_i_loss(lb)
        out.logs["abd_i"] = loss.detach()
        return StepOutput(out.loss + self.cfg.abd_i_weight * loss, out.logs, out.stats)

    def abd_i_loss(self, lb: Batch) -> Tensor:
        """ABD-I as in the cross-teaching host on the labelled batch (weak view and a strong view of it): the
        displaced images through both students, 0.5(CE + Dice) each."""
        cfg = self.cfg
        xs, ys = strong_view(lb.image, lb.label, cfg.cutout_p)
        with torch.no_grad():
            if cfg.conf_source == "teacher":
                z1, z2 = self.teacher(lb.image).logits, self.teacher(xs).logits
            else:
                z1, z2 = self.student(lb.image).logits, self.student2(xs).logits
        xi1, xi2, yi1, yi2 = abd_i(lb.image, xs, lb.label, ys, z1, z2, cfg.grid, cfg.abd_i_prob)
        xi, yi = torch.cat([xi1, xi2]), torch.cat([yi1, yi2])
        return ce_dice_loss(self.student(xi).logits, yi) + ce_dice_loss(self.student2(xi).logits, yi)


__all__ = ["CAD", "best_window", "dte", "grid_displacement", "largest_components", "llcr", "llcr_boxes",
           "llcr_regions"]
