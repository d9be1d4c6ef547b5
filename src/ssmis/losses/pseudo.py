"""Confidence-thresholded pseudo-labels and the unlabelled losses masked by them, written once for every
method that thresholds confidences (FixMatch, UniMatch, ...)."""

from __future__ import annotations

from typing import Literal

import torch.nn.functional as F
from torch import Tensor

from ssmis.losses.seg import dice_loss


def pseudo_label(probs: Tensor, threshold: float) -> tuple[Tensor, Tensor]:
    """Hard pseudo-labels argmax_k p_k and the confidence mask [max_k p_k ≥ τ] (bool), both B×spatial, from
    B×K×spatial probabilities (detached; give float32 probabilities)."""
    conf, labels = probs.detach().max(1)
    return labels, conf >= threshold


def masked_cross_entropy(logits: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    """Σ mask·CE(logits, target) / number of pixels (natural-image FixMatch/UniMatch: unconfident pixels
    contribute 0 but still count in the denominator). Computed on float32 logits."""
    ce = F.cross_entropy(logits.float(), target.long(), reduction="none")
    return (ce * mask.to(ce.dtype)).sum() / ce.numel()


def pseudo_label_loss(logits: Tensor, labels: Tensor, mask: Tensor, kind: Literal["dice", "ce"] = "dice") -> Tensor:
    """Unlabelled term of weak-to-strong methods. `dice`: the SSL4MIS Dice of softmax(logits) against the
    pseudo-labels with the unconfident pixels removed from all three sums (medical UniMatch's `ignore`);
    `ce`: `masked_cross_entropy`. Ignored pixels get exactly zero gradient in both."""
    if kind == "dice":
        return dice_loss(logits.float().softmax(1), labels, mask=mask)
    if kind == "ce":
        return masked_cross_entropy(logits, labels, mask)
    raise ValueError(f"unknown pseudo-label loss {kind!r}")
