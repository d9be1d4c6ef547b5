"""ResNet34-encoder networks: the second architecture that C3S3 and MEDL train beside the VNet / UNet-2D.

Encoder (methods.md "Networks", "C3S3"; Y-TARL/C3S3 `models/resnet.py`): a stem Conv 7 (stride 1, padding 3) to
`widths[0]` channels → BN → ReLU, then four stages of BasicBlocks ([3, 4, 6, 3] at the ResNet34 size) with widths
`widths[1:]`; the first block of every stage has stride 2 and a 1-wide stride-2 conv + BN shortcut, the others an
identity shortcut. No max-pool after the stem (the release builds one but never calls it), so `encode` returns
[stem, s1, s2, s3, s4] at full, ½, ¼, ⅛ and 1/16 resolution. BasicBlock = Conv3 (stride s) → BN → ReLU → Conv3 →
BN, plus the shortcut, then ReLU. The encoder convs have no bias (as released and as torchvision's).

* `resnet34_vnet` (3D; C3S3's network B, MEDL's "3D-ResVNet"): this encoder + the VNet decoder of vnet.py
  (ConvTranspose3d k2 s2 + BN + ReLU up-sampling, additive skips, stages of 3, 3, 2, 1 convs, 1×1×1 head) with a
  Dropout3d before the classifier only — not on the bottleneck, unlike the VNet (as released).
* `resnet34_unet` (2D; [ours] the second architecture of the 2D (ACDC-lite) forms of C3S3 and MEDL): the same
  encoder in 2D + the UNet-2D decoder of unet.py (1×1 conv to the skip width, bilinear ×2 with align_corners=True,
  concatenation, ConvBlock; 3×3 output conv), with a Dropout2d before the output conv: the 2D analogue of C3S3's
  "Dropout3d 0.5 before the classifier", since a ResNet encoder has no place for UNet-2D's per-stage dropout.

Constructor: `widths` = five widths (stem, then the four stages); `blocks` = BasicBlocks per stage; `dropout` = a
float or a sequence, of which the largest is the rate (VNet's mapping: the config default [0.05 … 0.5] and the
default (0.5,) both give 0.5; 0 turns it off, and `nn.Dropout*d` is a no-op in eval mode).

Initialisation, whole network (encoder, decoder, head; as C3S3's wrapper does after building): Kaiming-normal
(fan-in, gain √2) for every conv and transposed conv weight, BN γ = 1 and β = 0; conv biases keep PyTorch's
default. The release's encoder zero-initialises the last BN γ of each block, but the wrapper's loop resets it to 1
afterwards, so the zero-γ trick is not in effect here either (methods.md "C3S3").

Feature taps (`need_features=True`): `features` = the five encoder maps; `aux["high"]` = the bottleneck s4 (3D:
max-pooled as VNet's, `pooled_bottleneck`, so M3HL-style consumers work; 2D: s4 itself, as UNet-2D);
`aux["last"]` = the last decoder feature before the dropout and the classifier (widths[0] channels, full
resolution; what C3S3's projector reads); `aux["low"]` = as the decoder's own network defines it: 3D, VNet's
x8_up (the last up-sampled feature plus the stem skip, the input of the last conv stage); 2D, the same map as
`last` (UNet-2D's).

Parameters (in_channels = 1, default widths and blocks) [ours, counted]: resnet34_vnet 17,930,354 at 2 classes
(encoder 15,858,384 + VNet decoder and head 2,071,970; +17 per extra class), resnet34_unet 5,953,092 at 4
classes (encoder 5,319,792; +145 per extra class). The C3S3 release's network B has 17,931,715: these plus its
projector (Conv 16→16, PReLU, Conv 16→64: 1,361), which here is not part of the network (C3S3 adds it as a head
reading `aux["last"]`). The release's ResNet ignores `n_channels` and always takes one input channel; here
`in_channels` is honoured.
Input spatial sizes must be multiples of 16 (four stride-2 stages); others raise a ValueError.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from ssmis.models.unet import PooledUNet, UpBlock
from ssmis.models.vnet import VNetDecoder, check_divisible, checked_dropout
from ssmis.registry import MODELS

RESNET34_BLOCKS = (3, 4, 6, 3)


def _conv(dims: int) -> type[nn.Module]:
    return nn.Conv3d if dims == 3 else nn.Conv2d


def _bn(dims: int, c: int) -> nn.Module:
    return nn.BatchNorm3d(c) if dims == 3 else nn.BatchNorm2d(c)


class BasicBlock(nn.Module):
    """Conv3 (stride s) → BN → ReLU → Conv3 → BN, + shortcut (identity, or Conv1 stride s + BN when the shape
    changes), → ReLU; 2D or 3D."""

    def __init__(self, dims: int, cin: int, cout: int, stride: int = 1):
        super().__init__()
        conv = _conv(dims)
        self.conv1 = conv(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = _bn(dims, cout)
        self.conv2 = conv(cout, cout, 3, padding=1, bias=False)
        self.bn2 = _bn(dims, cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = (nn.Sequential(conv(cin, cout, 1, stride=stride, bias=False), _bn(dims, cout))
                           if stride != 1 or cin != cout else None)

    def forward(self, x: Tensor) -> Tensor:
        out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.relu(out + shortcut)


class ResNetEncoder(nn.Module):
    """Stem Conv7 stride 1 → BN → ReLU; four stride-2 BasicBlock stages; no max-pool. Returns the five maps."""

    def __init__(self, dims: int, in_channels: int, widths: Sequence[int], blocks: Sequence[int]):
        super().__init__()
        self.stem = nn.Sequential(_conv(dims)(in_channels, widths[0], 7, padding=3, bias=False), _bn(dims, widths[0]),
                                  nn.ReLU(inplace=True))
        self.stages = nn.ModuleList(
            nn.Sequential(BasicBlock(dims, widths[i], widths[i + 1], stride=2),
                          *(BasicBlock(dims, widths[i + 1], widths[i + 1]) for _ in range(n - 1)))
            for i, n in enumerate(blocks))

    def forward(self, x: Tensor) -> list[Tensor]:
        feats = [self.stem(x)]
        for stage in self.stages:
            feats.append(stage(feats[-1]))
        return feats


def init_weights(model: nn.Module) -> None:
    """Kaiming-normal (fan-in, ReLU gain) conv / transposed-conv weights, BN γ = 1, β = 0 (C3S3's init loop)."""
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
            nn.init.kaiming_normal_(m.weight)
        elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm3d)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class ResNetEncoded:
    """Mixin of both networks: `build_encoder` checks the constructor arguments, sets `init_args` and the
    encoder; `encode` checks the input size and runs the encoder."""

    model_name: str                      # registry name, for messages
    spatial_dims: int
    supports = frozenset({"features"})

    def build_encoder(self, in_channels: int, num_classes: int, widths: Sequence[int],
                      dropout: float | Sequence[float], blocks: Sequence[int]) -> tuple[tuple[int, ...], float]:
        """(widths, dropout rate) after checking the arguments and building `self.encoder`."""
        name = self.model_name
        widths = tuple(int(w) for w in widths)
        blocks = tuple(int(b) for b in blocks)
        if len(widths) != 5:
            raise ValueError(f"{name} needs 5 widths (stem and four stages), got {list(widths)}")
        if len(blocks) != 4 or min(blocks) < 1:
            raise ValueError(f"{name} needs 4 positive block counts (one per stage), got {list(blocks)}")
        p, rates = checked_dropout(dropout, name)
        self.init_args = {"in_channels": in_channels, "num_classes": num_classes, "widths": list(widths),
                          "dropout": rates, "blocks": list(blocks)}
        self.encoder = ResNetEncoder(self.spatial_dims, in_channels, widths, blocks)
        return widths, p

    def encode(self, x: Tensor) -> list[Tensor]:
        """[stem, s1, s2, s3, s4] at full, ½, ¼, ⅛, 1/16 resolution (3D: no bottleneck dropout, as released)."""
        check_divisible(x, 16, self.model_name)
        return self.encoder(x)


@MODELS.register("resnet34_vnet")
class ResNet34VNet(ResNetEncoded, VNetDecoder):
    """3D ResNet34 encoder + VNet decoder (C3S3's network B, MEDL's 3D-ResVNet): 17,930,354 parameters at 2 classes.
    See the module docstring."""

    model_name = "resnet34_vnet"
    spatial_dims = 3

    def __init__(self, in_channels: int = 1, num_classes: int = 2,
                 widths: Sequence[int] = (16, 32, 64, 128, 256),
                 dropout: float | Sequence[float] = (0.5,), blocks: Sequence[int] = RESNET34_BLOCKS):
        super().__init__()
        widths, p = self.build_encoder(in_channels, num_classes, widths, dropout, blocks)
        self.build_decoder(widths, num_classes, p)
        init_weights(self)


@MODELS.register("resnet34_unet")
class ResNet34UNet(ResNetEncoded, PooledUNet):
    """2D ResNet34 encoder + UNet-2D decoder (C3S3's / MEDL's 2D second network): 5,953,092 parameters at 4 classes.
    The decoder (`decode`, taps included) is PooledUNet's, the encoder the ResNet's; `head` = (Dropout2d, 3×3
    output conv). See the module docstring."""

    model_name = "resnet34_unet"
    spatial_dims = 2

    def __init__(self, in_channels: int = 1, num_classes: int = 4,
                 widths: Sequence[int] = (16, 32, 64, 128, 256),
                 dropout: float | Sequence[float] = (0.5,), blocks: Sequence[int] = RESNET34_BLOCKS):
        super().__init__()
        widths, p = self.build_encoder(in_channels, num_classes, widths, dropout, blocks)
        self.dec = nn.ModuleList(UpBlock(widths[i + 1], widths[i], widths[i]) for i in reversed(range(4)))
        self.head = nn.Sequential(nn.Dropout2d(p) if p > 0 else nn.Identity(),
                                  nn.Conv2d(widths[0], num_classes, 3, padding=1))
        init_weights(self)
