"""UNet-2D of the semi-supervised segmentation literature (SSL4MIS): widths 16-256, bilinear decoder."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ssmis.models.output import EncoderDecoder, SegOutput
from ssmis.registry import MODELS


class ConvBlock(nn.Sequential):
    def __init__(self, cin: int, cout: int, dropout: float):
        super().__init__(
            nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.LeakyReLU(0.01),
            nn.Dropout(dropout),
            nn.Conv2d(cout, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.LeakyReLU(0.01),
        )


class UpBlock(nn.Module):
    """1×1 conv to the skip width, bilinear ×2 (align_corners=True), concatenate, ConvBlock."""

    def __init__(self, cin: int, cskip: int, cout: int):
        super().__init__()
        self.reduce = nn.Conv2d(cin, cskip, 1)
        self.up = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True)
        self.conv = ConvBlock(2 * cskip, cout, 0.0)

    def forward(self, x: Tensor, skip: Tensor) -> Tensor:
        return self.conv(torch.cat([skip, self.up(self.reduce(x))], dim=1))


class PooledUNet(EncoderDecoder):
    """Encoder blocks with max-pooling between them, up-blocks taking (x, skip), a head: 2D and 3D alike.
    Features: encoder maps shallow -> deep; aux `high` (bottleneck), `low` and `last` (both the last decoder
    feature, before the output conv)."""

    def check_input(self, x: Tensor) -> None:
        """Subclasses reject inputs their pooling cannot take."""

    def encode(self, x: Tensor) -> list[Tensor]:
        self.check_input(x)
        feats = []
        for i, block in enumerate(self.enc):
            x = block(x if i == 0 else self.pool(x))
            feats.append(x)
        return feats

    def decode(self, feats: list[Tensor], need_features: bool = False) -> SegOutput:
        x = feats[-1]
        for up, skip in zip(self.dec, reversed(feats[:-1])):
            x = up(x, skip)
        aux = {"high": feats[-1], "low": x, "last": x} if need_features else {}
        return SegOutput(self.head(x), feats if need_features else None, aux)


@MODELS.register("unet2d")
class UNet2D(PooledUNet):
    """SSL4MIS UNet-2D: 5 encoder stages (max-pool + ConvBlock), 4 up-blocks, 3×3 output conv; ~1.81 M parameters at C=4."""

    spatial_dims = 2
    supports = frozenset({"features"})

    def __init__(self, in_channels: int = 1, num_classes: int = 4,
                 widths: tuple[int, ...] = (16, 32, 64, 128, 256),
                 dropout: tuple[float, ...] = (0.05, 0.1, 0.2, 0.3, 0.5)):
        super().__init__()
        self.init_args = {"in_channels": in_channels, "num_classes": num_classes,
                          "widths": list(widths), "dropout": list(dropout)}
        if len(widths) != 5 or len(dropout) != 5:
            raise ValueError("unet2d needs 5 widths and 5 dropout rates")
        self.enc = nn.ModuleList()
        cin = in_channels
        for w, p in zip(widths, dropout):
            self.enc.append(ConvBlock(cin, w, p))
            cin = w
        self.pool = nn.MaxPool2d(2)
        self.dec = nn.ModuleList(UpBlock(widths[i + 1], widths[i], widths[i])
                                 for i in reversed(range(4)))
        self.head = nn.Conv2d(widths[0], num_classes, 3, padding=1)
