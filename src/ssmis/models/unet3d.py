"""3D U-Net of M&N (pakheiyeung/M-N `model.py`, `Unet3d_segmentation`, base_n_filter 32).

Encoder: 5 stages, widths 32/64/128/256/512 (configurable), MaxPool3d(2) before every stage but the first;
a stage = 2 × (Conv3×3×3 → InstanceNorm3d → ReLU). Decoder: 4 levels, each = trilinear ×2 up-sampling
(align_corners=False, PyTorch's default as released) → Conv3×3×3 → IN → ReLU to the skip width, concatenation
[skip, up], stage of 2 convs. Output Conv3×3×3 to the classes, no activation. InstanceNorm3d has PyTorch's
defaults (no affine parameters, no running statistics), as released.

Shared model config mapping: `widths` = the 5 stage widths; `dropout` = one rate per encoder stage, an
`nn.Dropout` between the two convs of the stage (UNet-2D's placement). M&N uses none, so the default is all
zeros; `build_model` passes the config's list, so set `model.dropout: [0, 0, 0, 0, 0]` for the published net.
`norm` = "instance" (as released) or "batch".

Parameters: 25,884,546 for in_channels=1, num_classes=2 at widths 32…512 (methods.md: ~26 M).
Input spatial sizes must be multiples of 16; instance norm in training needs more than one voxel at the
bottleneck, i.e. inputs of at least 32 per axis.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ssmis.models.unet import PooledUNet
from ssmis.models.vnet import check_divisible
from ssmis.registry import MODELS


def _norm(kind: str, c: int) -> nn.Module:
    if kind == "instance":
        return nn.InstanceNorm3d(c)
    if kind == "batch":
        return nn.BatchNorm3d(c)
    raise ValueError(f"unet3d norm must be 'instance' or 'batch', got {kind!r}")


class ConvBlock3d(nn.Sequential):
    def __init__(self, cin: int, cout: int, dropout: float, norm: str):
        # the Dropout is always there (p = 0 is the identity) so state-dict keys do not depend on the rate
        super().__init__(nn.Conv3d(cin, cout, 3, padding=1), _norm(norm, cout), nn.ReLU(inplace=True),
                         nn.Dropout(dropout),
                         nn.Conv3d(cout, cout, 3, padding=1), _norm(norm, cout), nn.ReLU(inplace=True))


class UpBlock3d(nn.Module):
    """Trilinear ×2 → Conv3³ → norm → ReLU to the skip width; concatenate [skip, up]; ConvBlock."""

    def __init__(self, cin: int, cskip: int, norm: str):
        super().__init__()
        self.up = nn.Sequential(nn.Upsample(scale_factor=2, mode="trilinear", align_corners=False),
                                nn.Conv3d(cin, cskip, 3, padding=1), _norm(norm, cskip), nn.ReLU(inplace=True))
        self.conv = ConvBlock3d(2 * cskip, cskip, 0.0, norm)

    def forward(self, x: Tensor, skip: Tensor) -> Tensor:
        return self.conv(torch.cat([skip, self.up(x)], dim=1))


@MODELS.register("unet3d")
class UNet3D(PooledUNet):
    """M&N's 32-base 3D U-Net: ≈ 25.9 M parameters at 2 classes. See the module docstring."""

    spatial_dims = 3
    supports = frozenset({"features"})

    def __init__(self, in_channels: int = 1, num_classes: int = 2,
                 widths: Sequence[int] = (32, 64, 128, 256, 512),
                 dropout: Sequence[float] = (0.0, 0.0, 0.0, 0.0, 0.0), norm: str = "instance"):
        super().__init__()
        widths = tuple(int(w) for w in widths)
        dropout = tuple(float(p) for p in dropout)
        if len(widths) != 5 or len(dropout) != 5:
            raise ValueError("unet3d needs 5 widths and 5 dropout rates")
        self.init_args = {"in_channels": in_channels, "num_classes": num_classes, "widths": list(widths),
                          "dropout": list(dropout), "norm": norm}
        self.enc = nn.ModuleList()
        cin = in_channels
        for w, p in zip(widths, dropout):
            self.enc.append(ConvBlock3d(cin, w, p, norm))
            cin = w
        self.pool = nn.MaxPool3d(2)
        self.dec = nn.ModuleList(UpBlock3d(widths[i + 1], widths[i], norm) for i in reversed(range(4)))
        self.head = nn.Conv3d(widths[0], num_classes, 3, padding=1)

    def check_input(self, x: Tensor) -> None:
        check_divisible(x, 16, "unet3d")
