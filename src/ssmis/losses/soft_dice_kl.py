"""Squared-Dice + KL against soft targets (M&N's loss for both of its models; methods.md "M&N", [CODE
pakheiyeung/M-N losses.py, train.py]): y is a one-hot label or another model's probabilities (no threshold)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def squared_dice_loss(probs: Tensor, target: Tensor, eps: float = 1e-6) -> Tensor:
    """1 − mean over the classes (background included) of 2Σpy / max(Σp² + Σy², eps), the sums over batch and
    space together (pytorch-3dunet's `compute_per_channel_dice`, as M&N uses it). `target` has the shape of `probs`."""
    dims = [0] + list(range(2, probs.ndim))
    inter = (probs * target).sum(dims)
    denom = (probs * probs).sum(dims) + (target * target).sum(dims)
    return 1 - (2 * inter / denom.clamp(min=eps)).mean()


def soft_dice_kl(logits: Tensor, target: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(DiceSq(softmax z, y) + KL(y ‖ softmax z), DiceSq, KL) in float32. KL is PyTorch's `kl_div(log_softmax z, y,
    reduction='mean')`: divided by every element (classes × voxels × batch), so the Dice term dominates."""
    z, y = logits.float(), target.float()
    dice = squared_dice_loss(z.softmax(1), y)
    kl = F.kl_div(F.log_softmax(z, 1), y, reduction="sum") / y.numel()    # 'mean', which torch means to change
    return dice + kl, dice, kl


def one_hot(labels: Tensor, num_classes: int) -> Tensor:
    """B×spatial integer labels -> B×K×spatial float32 one-hot."""
    return F.one_hot(labels.long(), num_classes).movedim(-1, 1).float()
