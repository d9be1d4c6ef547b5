"""Perturbations and target transforms: sharpening (`targets`), Gaussian input noise (`inputs`) and
channel dropout of encoder features (`features`)."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from ssmis.plugins.base import Plugin, PluginConfig, SlotInputs
from ssmis.registry import PLUGINS


@PLUGINS.register("sharpen")
class Sharpen(Plugin):
    """Temperature sharpening of the targets: p_k^(1/T) / Σ_j p_j^(1/T) (T < 1 sharpens, T = 1 is the identity)."""

    class Config(PluginConfig):
        name: Literal["sharpen"] = "sharpen"
        temperature: float = Field(0.5, gt=0, description="Temperature T.")

    slot = "targets"

    def forward(self, value: Tensor, inp: SlotInputs) -> Tensor:
        # in log space: stable for probabilities near 0
        return torch.softmax(torch.log(value.float().clamp_min(1e-12)) / self.cfg.temperature, dim=1).to(value.dtype)


@PLUGINS.register("gaussian_noise")
class GaussianNoise(Plugin):
    """Additive noise on the inputs: x + clip(N(0, σ²), -c, c) (Mean Teacher's teacher noise, for any input)."""

    class Config(PluginConfig):
        name: Literal["gaussian_noise"] = "gaussian_noise"
        sigma: float = Field(0.1, ge=0, description="Noise standard deviation σ.")
        clip: float | None = Field(0.2, gt=0, description="Clip the noise to ±clip; null = no clipping.")

    slot = "inputs"

    def forward(self, value: Tensor, inp: SlotInputs) -> Tensor:
        noise = torch.randn_like(value) * self.cfg.sigma
        if self.cfg.clip is not None:
            noise = noise.clamp(-self.cfg.clip, self.cfg.clip)
        return value + noise


@PLUGINS.register("feature_dropout")
class FeatureDropout(Plugin):
    """Channel dropout (Dropout2d/3d) on every encoder feature map (UniMatch's feature perturbation)."""

    class Config(PluginConfig):
        name: Literal["feature_dropout"] = "feature_dropout"
        p: float = Field(0.5, ge=0, lt=1, description="Probability of zeroing a channel.")

    slot = "features"

    def forward(self, value: list[Tensor], inp: SlotInputs) -> list[Tensor]:
        drop = F.dropout3d if self.spatial_dims == 3 else F.dropout2d
        return [drop(f, self.cfg.p, training=True) for f in value]
