"""M3HL (Mutual Mask Mix with High-Low level feature consistency): BCP's single copy-paste box is replaced by a
per-sample random block mask (half of a grid of blocks) that mixes labelled and unlabelled images in two
complementary ways (M³), and the student's high-level (bottleneck) and low-level (last decoder) features of the
mixed images are pulled towards the EMA teacher's features of the unmixed unlabelled images (HL)
(methods.md "M3HL").

One stage, no pre-training: the teacher is an EMA (α 0.99, whole state dict) of the student that starts from its
own random initialisation, and stays in train mode (dropout active, batch-statistics BN), so its pseudo-labels
and feature targets are stochastic. L = L_seg + (L_low + L_high)/2 from the first step (no ramp-up), where L_seg
is BCP's region-weighted mixed loss. Built from bcp.py's `split_pairs`, `largest_component_per_class` and
`mix_loss`, and mixing.py's `mix` / `bidirectional_mix`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from ssmis.data.mixing import bidirectional_mix, mix
from ssmis.engine.ema import EMA
from ssmis.methods.base import Batch, Method, MethodConfig, StepOutput
from ssmis.methods.bcp import largest_component_per_class, mix_loss, split_pairs
from ssmis.registry import METHODS

FG_THRESHOLD = 0.5      # LA: pseudo-label = softmax foreground ≥ 0.5 [LA_M3HL_train.py `get_cut_mask`]


# ---- pieces ---------------------------------------------------------------------------------------------


def block_mask(batch: int, spatial: tuple[int, ...], grid: int = 4, ratio: float = 0.5,
               device: torch.device | str | None = None) -> Tensor:
    """M³ mask, B×spatial float32: per sample, the image cut into `grid` blocks per axis and ⌊ratio·grid^n⌋
    of the grid^n blocks (drawn uniformly without replacement, independently per sample) set to 0, the rest 1.
    Blocks have side `side // grid`; every side must divide by `grid`. Draws use the global torch RNG on the CPU."""
    spatial = tuple(int(s) for s in spatial)
    if any(s % grid for s in spatial):
        raise ValueError(f"image size {spatial} does not divide into {grid} blocks per axis")
    total = grid ** len(spatial)
    n_zero = int(ratio * total + 1e-9)
    keep = torch.ones(batch, total)
    for n in range(batch):
        keep[n, torch.randperm(total)[:n_zero]] = 0
    mask = keep.view(batch, *(grid,) * len(spatial))
    for axis, s in enumerate(spatial, start=1):
        mask = mask.repeat_interleave(s // grid, dim=axis)
    return mask.to(device)


@dataclass
class MixedView:
    """One mixed input with its targets: `target_m` (weight `w_m`) where M = 1, `target_rest` (`w_rest`) where
    M = 0, in BCP `mix_loss` order."""
    image: Tensor
    target_m: Tensor
    target_rest: Tensor
    w_m: float
    w_rest: float


def complementary_mix(l_a: Tensor, l_b: Tensor, u_a: Tensor, u_b: Tensor, y_a: Tensor, y_b: Tensor, p_a: Tensor,
                      p_b: Tensor, mask: Tensor, layout: Literal["acdc", "la"],
                      u_weight: float = 0.5) -> tuple[MixedView, MixedView]:
    """The two M³ views (mask B×spatial, one per sample; images B×C×spatial), pseudo-labelled regions weight
    `u_weight`, labelled ones 1:

    acdc: X_1 = u_a⊙M + l_a⊙(1 − M) (targets p̂_a | y_a), X_2 = l_b⊙M + u_b⊙(1 − M) (y_b | p̂_b);
    la:   X_l = l_a⊙M + u_a⊙(1 − M) (y_a | p̂_a),   X_u = u_b⊙M + l_b⊙(1 − M) (p̂_b | y_b)."""
    m_img = mask[:, None]
    if layout == "acdc":
        x1, x2 = bidirectional_mix(l_a, l_b, u_a, u_b, m_img)
        return MixedView(x1, p_a, y_a, u_weight, 1.0), MixedView(x2, y_b, p_b, 1.0, u_weight)
    return (MixedView(mix(l_a, u_a, m_img), y_a, p_a, 1.0, u_weight),
            MixedView(mix(u_b, l_b, m_img), p_b, y_b, u_weight, 1.0))


def low_level_loss(student: list[Tensor], teacher: list[Tensor]) -> Tensor:
    """L_low: mean over every (mixed view, unlabelled original) pair of the L1 distance, mean over elements."""
    return torch.stack([F.l1_loss(s.float(), t.float()) for s in student for t in teacher]).mean()


def high_level_loss(student: list[Tensor], teacher: list[Tensor]) -> Tensor:
    """L_high: mean over every (mixed view, unlabelled original) pair of 1 − the batch mean of the per-sample
    cosine similarity of the flattened features."""
    return torch.stack([1 - F.cosine_similarity(s.float().flatten(1), t.float().flatten(1)).mean()
                        for s in student for t in teacher]).mean()


@dataclass
class TeacherView:
    """The teacher's pseudo-label, features and logits of one unlabelled sub-batch (one forward pass)."""
    label: Tensor
    high: Tensor
    low: Tensor
    logits: Tensor


@torch.no_grad()
def teacher_view(teacher: nn.Module, image: Tensor, lcc: bool = True) -> TeacherView:
    """One teacher forward in whatever mode the teacher is in (M3HL: train). Pseudo-label: argmax, or for
    binary 3D foreground probability ≥ 0.5 (LA); then the largest connected component per class and sample."""
    out = teacher(image, need_features=True)
    logits = out.logits.float()
    if image.ndim == 5 and logits.shape[1] == 2:
        label = (logits.softmax(1)[:, 1] >= FG_THRESHOLD).long()
    else:
        label = logits.argmax(1)
    if lcc:
        label = largest_component_per_class(label, logits.shape[1])
    return TeacherView(label, out.aux["high"], out.aux["low"], logits)


# ---- method ---------------------------------------------------------------------------------------------


class M3HLConfig(MethodConfig):
    grid: int = Field(4, ge=1, description="Mask blocks per image axis (methods.md's m3.block_size = side / grid): "
                      "4 gives 64-px blocks at 256 (ACDC), 32 at 128 (ACDC-lite), 28×28×20 at 112×112×80 (LA).")
    mask_ratio: float = Field(0.5, gt=0, lt=1, description="Share of the blocks set to 0 per sample "
                              "(⌊ratio·grid^n⌋: 8 of 16 in 2D, 32 of 64 in 3D).")
    layout: Literal["auto", "acdc", "la"] = Field("auto", description="Roles relative to M: acdc (unlabelled a "
                                                  "on M in X_1, labelled b on M in X_2) or la (labelled a, "
                                                  "unlabelled b on M); auto = acdc in 2D, la in 3D.")
    u_weight: float = Field(0.5, ge=0, description="Weight of the pseudo-labelled (unlabelled) regions in the "
                            "mixed loss; labelled regions weigh 1.")
    feature_weight: float = Field(0.5, ge=0, description="Weight of L_low + L_high, constant from step 0 (the "
                                  "code's ramped consistency weight is only logged).")
    ema_decay: float = Field(0.99, ge=0, lt=1, description="Fixed EMA decay of the teacher over the whole state "
                             "dict (BN statistics included); the teacher starts from its own random init.")
    lcc: bool = Field(True, description="Keep only the largest connected component per class and sample of the "
                      "teacher's pseudo-labels (per slice in 2D, 3D components in 3D), as the code.")


@METHODS.register("m3hl")
class M3HL(Method):
    """M3HL: complementary block-mask labelled/unlabelled mixing + high/low feature consistency to an EMA teacher."""

    default_augment = "bcp"                # the BCP-variant RandomGenerator (methods.md, Augmentation)

    class Config(M3HLConfig):
        name: Literal["m3hl"] = "m3hl"

    def build(self, ctx):
        self.student = ctx.add("student", ctx.build_model(), trainable=True)
        # EMA copies the module it is given: a second, independently initialised network (ACDC code)
        self.teacher = ctx.add("teacher", EMA(ctx.build_model(), self.cfg.ema_decay, warmup=False, buffers=True),
                               trainable=False)

    def layout(self, image: Tensor) -> Literal["acdc", "la"]:
        if self.cfg.layout != "auto":
            return self.cfg.layout
        return "la" if image.ndim == 5 else "acdc"

    def train_step(self, lb: Batch, ub: Batch | None, step: int) -> StepOutput:
        l_a, l_b, y_a, y_b, u_a, u_b = split_pairs(lb, ub)
        t_a, t_b = teacher_view(self.teacher, u_a, self.cfg.lcc), teacher_view(self.teacher, u_b, self.cfg.lcc)
        mask = block_mask(l_a.shape[0], tuple(l_a.shape[2:]), self.cfg.grid, self.cfg.mask_ratio, l_a.device)
        views = complementary_mix(l_a, l_b, u_a, u_b, y_a, y_b, t_a.label, t_b.label, mask, self.layout(l_a),
                                  self.cfg.u_weight)
        dice = ce = torch.zeros((), device=l_a.device)
        s_high, s_low = [], []
        for v in views:
            out = self.student(v.image, need_features=True)
            d, c = mix_loss(out.logits, v.target_m, v.target_rest, mask, v.w_m, v.w_rest)
            dice, ce = dice + d, ce + c
            s_high.append(out.aux["high"])
            s_low.append(out.aux["low"])
        seg = (dice + ce) / 2
        low = low_level_loss(s_low, [t_a.low, t_b.low])
        high = high_level_loss(s_high, [t_a.high, t_b.high])
        loss = seg + self.cfg.feature_weight * (low + high)
        return StepOutput(loss, {"seg": seg.detach(), "mix_dice": dice.detach(), "mix_ce": ce.detach(),
                                 "loss_low": low.detach(), "loss_high": high.detach()})

    def after_step(self, step: int) -> None:
        self.teacher.update(self.ctx.modules["student"], step)

    def eval_model(self):
        return self.ctx.modules["student"]
