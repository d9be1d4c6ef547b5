"""Confidence masks for the `mask` slot: a fixed threshold, and class-wise thresholds that adapt to the
confidence the source network currently reaches on each class (MetaSSL's rule, methods.md "MetaSSL")."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import Tensor

from ssmis.plugins.base import Plugin, PluginConfig, SlotInputs
from ssmis.registry import PLUGINS


@PLUGINS.register("threshold")
class Threshold(Plugin):
    """Fixed confidence threshold: keep pixels whose source max-probability is ≥ τ (FixMatch's mask)."""

    class Config(PluginConfig):
        name: Literal["threshold"] = "threshold"
        tau: float = Field(0.95, ge=0, le=1, description="Keep pixels with max_k p_k ≥ tau.")

    slot = "mask"
    needs = frozenset({"teacher_probs"})

    def forward(self, value: Tensor, inp: SlotInputs) -> Tensor:
        conf = inp.teacher_probs.detach().float().amax(1)
        return value * (conf >= self.cfg.tau).to(value.dtype)


def class_means(conf: Tensor, labels: Tensor, num_classes: int) -> tuple[Tensor, Tensor]:
    """(Σ confidence, pixel count) per predicted class, each of length K."""
    sums = torch.zeros(num_classes, device=conf.device).index_add_(0, labels.reshape(-1), conf.reshape(-1).float())
    counts = torch.bincount(labels.reshape(-1), minlength=num_classes).float()
    return sums, counts


@PLUGINS.register("class_threshold")
class ClassThreshold(Plugin):
    """Class-wise adaptive confidence thresholds (MetaSSL's rule): keep pixels more confident than their class's τ.

    τ_k ← m·τ_k + (1-m)·Σc/(N_k+1), the mean confidence of the pixels predicted k this step, after each step."""

    class Config(PluginConfig):
        name: Literal["class_threshold"] = "class_threshold"
        init: float = Field(0.9, ge=0, le=1, description="Initial threshold of every class.")
        momentum: float = Field(0.5, ge=0, lt=1, description="Weight of the old threshold in each update.")
        cap: float | None = Field(None, gt=0, le=1, description="Upper bound of every threshold (MetaSSL 3D: 0.9); "
                                  "null = none.")

    slot = "mask"
    needs = frozenset({"teacher_probs"})

    def __init__(self, cfg, num_classes, spatial_dims):
        super().__init__(cfg, num_classes, spatial_dims)
        self.register_buffer("tau", torch.full((num_classes,), float(cfg.init)))

    def forward(self, value: Tensor, inp: SlotInputs) -> Tensor:
        conf, labels = inp.teacher_probs.detach().float().max(1)
        sums, counts = class_means(conf, labels, self.num_classes)
        self.record("conf_sum", sums)
        self.record("count", counts)
        return value * (conf > self.tau.to(conf.device)[labels]).to(value.dtype)

    def on_step_end(self, stats: dict[str, Tensor]) -> None:
        mean = stats["conf_sum"] / (stats["count"] + 1)
        tau = self.cfg.momentum * self.tau + (1 - self.cfg.momentum) * mean.to(self.tau.device)
        if self.cfg.cap is not None:
            tau = tau.clamp(max=self.cfg.cap)
        self.tau.copy_(tau)
