"""Projection head for voxel-wise contrastive terms (C3S3's ODCL; SPCL): a per-voxel two-layer MLP written as two
1×1 convolutions, Conv1(c→c) → PReLU → Conv1(c→out), 2D or 3D (methods.md "C3S3", Components: the head on the
final decoder feature x9, before the dropout, 16 → 16 → 64 in the VNet; [CODE Y-TARL/C3S3 models/vnet.py]).

Not a registered segmentation model: a method builds it beside its network, reads the network's feature tap
(`net(x, need_features=True).aux["last"]`) and registers the head as its own trainable module. Its convs take the
PyTorch default init; a method that re-initialises its networks (C3S3: Kaiming-normal, as the reference's init loop
also covers the head inside the network class) applies the same to the head."""

from __future__ import annotations

from torch import nn

CONVS = {2: nn.Conv2d, 3: nn.Conv3d}


class Projector(nn.Sequential):
    """Conv1(c→c) → PReLU (one shared slope, init 0.25) → Conv1(c→out_channels), both convs with bias.
    `dims` = 2 (B×c×H×W) or 3 (B×c×D×H×W); the spatial size is kept."""

    def __init__(self, in_channels: int, out_channels: int = 64, dims: int = 3):
        if dims not in CONVS:
            raise ValueError(f"Projector: dims must be 2 or 3, got {dims}")
        if in_channels < 1 or out_channels < 1:
            raise ValueError(f"Projector: channel counts must be positive, got {in_channels} -> {out_channels}")
        conv = CONVS[dims]
        super().__init__(conv(in_channels, in_channels, 1), nn.PReLU(), conv(in_channels, out_channels, 1))
        self.in_channels, self.out_channels, self.dims = in_channels, out_channels, dims
