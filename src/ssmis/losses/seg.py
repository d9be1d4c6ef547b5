"""Supervised and consistency losses of the SSL4MIS family (methods.md, "Losses")."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def dice_loss(probs: Tensor, target: Tensor, mask: Tensor | None = None, smooth: float = 1e-5) -> Tensor:
    """SSL4MIS DiceLoss: per class (background included) 1 - (2Σpg + s)/(Σp² + Σg² + s), sums over the
    whole batch, mean over classes. `mask` (B×spatial) multiplies into all three sums (BCP's masked Dice)."""
    onehot = F.one_hot(target.long(), probs.shape[1]).movedim(-1, 1).to(probs.dtype)
    dims = [0] + list(range(2, probs.ndim))
    if mask is not None:
        m = mask.unsqueeze(1).to(probs.dtype)
        probs_m, onehot_m = probs * m, onehot * m
    else:
        probs_m, onehot_m = probs, onehot
    inter = (probs_m * onehot).sum(dims)
    p2 = (probs_m * probs).sum(dims)
    g2 = (onehot_m * onehot).sum(dims)
    return (1 - (2 * inter + smooth) / (p2 + g2 + smooth)).mean()


def ce_dice_loss(logits: Tensor, target: Tensor) -> Tensor:
    """L_sup = 0.5·(CE + Dice) on float32 logits."""
    logits = logits.float()
    return 0.5 * (F.cross_entropy(logits, target.long()) + dice_loss(logits.softmax(1), target))


def softmax_mse(student_logits: Tensor, teacher_probs: Tensor) -> Tensor:
    """Per-pixel squared difference of probabilities, B×K×spatial (mean it for Mean Teacher's term)."""
    return (student_logits.float().softmax(1) - teacher_probs.float()) ** 2


def entropy(probs: Tensor, eps: float = 1e-6) -> Tensor:
    return -(probs * torch.log(probs + eps)).sum(1)
