"""VNet of the semi-supervised segmentation literature (UA-MT / SSL4MIS / BCP `networks/vnet.py`).

Plain (non-residual) conv stages with BatchNorm + ReLU, encoder stages of 1, 2, 3, 3, 3 convs (3×3×3),
Conv3d(k=2, s=2) + BN + ReLU down-sampling, ConvTranspose3d(k=2, s=2) + BN + ReLU up-sampling, **additive**
skips, decoder stages of 3, 3, 2, 1 convs and a 1×1×1 output conv. With dropout on (the released
`has_dropout=True` used for training) a Dropout3d acts on the bottleneck and on the last decoder feature
before the classifier; `nn.Dropout3d` is a no-op in eval mode, which is the literature's "turn off at test".

Constructor mapping from the shared model config (`build_model` passes `widths` and `dropout`):
* `widths` = the five stage widths, shallow to deep. The published net is `n_filters · (1, 2, 4, 8, 16)` with
  `n_filters = widths[0] = 16`; any five widths are accepted (tiny ones for tests).
* `dropout` = a float or a sequence of floats. VNet has one dropout rate used at its two sites, taken as
  `max(dropout)`; 0 (or an empty sequence) means `has_dropout=False`. The VNet default `(0.5,)` and UNet-2D's
  default list `[0.05, 0.1, 0.2, 0.3, 0.5]` (the config default) both give the published rate 0.5.

Feature taps (`need_features=True`): `features` = the encoder maps [x1 … x5]; `aux["high"]` = MaxPool3d(k=3, s=2)
of the bottleneck x5 (after its dropout), `aux["low"]` = x8_up = the last up-sampled decoder feature plus the skip
x1 (the input of the last decoder conv stage, full resolution, widths[0] channels): the F_high / F_low of M3HL's
VNet_HL (methods.md "M3HL"); `aux["last"]` = x9, the last decoder feature before the dropout and the classifier
(what C3S3's projector reads). Along an axis where the bottleneck is smaller than 3 voxels (tiny test patches) the
pooling window shrinks to that size.

Parameters: 9,448,866 for in_channels=1, num_classes=2 (the published ≈ 9.45 M); +17 per extra class.
Input spatial sizes must be multiples of 16 (four stride-2 down-samplings); others raise a ValueError.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from ssmis.models.output import EncoderDecoder, SegOutput
from ssmis.registry import MODELS

STAGE_CONVS_ENC = (1, 2, 3, 3, 3)
STAGE_CONVS_DEC = (3, 3, 2, 1)


def check_divisible(x: Tensor, factor: int, name: str) -> None:
    """Raise a clear error when a spatial size cannot be halved `log2(factor)` times exactly."""
    bad = [s for s in x.shape[2:] if s % factor]
    if bad:
        raise ValueError(f"{name} needs every spatial size to be a multiple of {factor}; got input of shape "
                         f"{tuple(x.shape)} (pad or crop the input, or use a sliding-window patch that is)")


def dropout_rate(dropout: float | Sequence[float] | None) -> float:
    if dropout is None:
        return 0.0
    if isinstance(dropout, (int, float)):
        return float(dropout)
    return max((float(p) for p in dropout), default=0.0)


def checked_dropout(dropout: float | Sequence[float], name: str) -> tuple[float, list[float]]:
    """The one rate `dropout_rate` takes from `dropout` (checked to lie in [0, 1)) and `dropout` as a list of
    floats, the form `init_args` stores."""
    p = dropout_rate(dropout)
    if not 0.0 <= p < 1.0:
        raise ValueError(f"{name} dropout rate must be in [0, 1), got {p}")
    return p, [float(dropout)] if isinstance(dropout, (int, float)) else [float(q) for q in dropout]


def pooled_bottleneck(x5: Tensor) -> Tensor:
    """MaxPool3d(k=3, s=2) of the bottleneck (M3HL's F_high); the window is clipped to axes shorter than 3."""
    return F.max_pool3d(x5, tuple(min(3, int(s)) for s in x5.shape[2:]), stride=2)


class ConvStage(nn.Sequential):
    """`n` × (Conv3×3×3 → BN → ReLU); the first conv maps cin -> cout."""

    def __init__(self, n: int, cin: int, cout: int):
        layers: list[nn.Module] = []
        for i in range(n):
            layers += [nn.Conv3d(cin if i == 0 else cout, cout, 3, padding=1), nn.BatchNorm3d(cout),
                       nn.ReLU(inplace=True)]
        super().__init__(*layers)


class Down(nn.Sequential):
    def __init__(self, cin: int, cout: int):
        super().__init__(nn.Conv3d(cin, cout, 2, stride=2), nn.BatchNorm3d(cout), nn.ReLU(inplace=True))


class Up(nn.Sequential):
    def __init__(self, cin: int, cout: int):
        super().__init__(nn.ConvTranspose3d(cin, cout, 2, stride=2), nn.BatchNorm3d(cout), nn.ReLU(inplace=True))


class VNetDecoder(EncoderDecoder):
    """The VNet decoder on any encoder whose `encode` returns five maps of `widths` channels at full, ½, ¼, ⅛ and
    1/16 resolution: level j (j = 0 the deepest) up-samples widths[4-j] -> widths[3-j], adds the skip and runs a
    conv stage of 3, 3, 2, 1 convs; then `dropout` (Dropout3d, or the identity at rate 0) and the 1×1×1 head.
    Aux taps as VNet's (see the module docstring). Subclasses call `build_decoder` after building their encoder."""

    def build_decoder(self, widths: Sequence[int], num_classes: int, p: float) -> None:
        self.up = nn.ModuleList(Up(widths[4 - j], widths[3 - j]) for j in range(4))
        self.dec = nn.ModuleList(ConvStage(n, widths[3 - j], widths[3 - j]) for j, n in enumerate(STAGE_CONVS_DEC))
        self.dropout = nn.Dropout3d(p) if p > 0 else nn.Identity()
        self.head = nn.Conv3d(widths[0], num_classes, 1)

    def decode(self, feats: list[Tensor], need_features: bool = False) -> SegOutput:
        """Logits; with `need_features` also the encoder maps and aux `high` / `low` / `last`."""
        x = feats[-1]
        for up, stage, skip in zip(self.up, self.dec, reversed(feats[:-1])):
            low = up(x) + skip                      # the last one is x8_up
            x = stage(low)
        aux = {"high": pooled_bottleneck(feats[-1]), "low": low, "last": x} if need_features else {}
        x = self.dropout(x)
        return SegOutput(self.head(x), feats if need_features else None, aux)


@MODELS.register("vnet")
class VNet(VNetDecoder):
    """VNet (n_filters 16, BN, dropout 0.5): ≈ 9.45 M parameters at 2 classes. See the module docstring."""

    spatial_dims = 3
    supports = frozenset({"features"})

    def __init__(self, in_channels: int = 1, num_classes: int = 2,
                 widths: Sequence[int] = (16, 32, 64, 128, 256),
                 dropout: float | Sequence[float] = (0.5,)):
        super().__init__()
        widths = tuple(int(w) for w in widths)
        if len(widths) != 5:
            raise ValueError(f"vnet needs 5 widths, got {list(widths)}")
        p, rates = checked_dropout(dropout, "vnet")
        self.init_args = {"in_channels": in_channels, "num_classes": num_classes, "widths": list(widths),
                          "dropout": rates}
        self.has_dropout = p > 0
        self.enc = nn.ModuleList()
        self.down = nn.ModuleList()
        for i, (n, w) in enumerate(zip(STAGE_CONVS_ENC, widths)):
            self.enc.append(ConvStage(n, in_channels if i == 0 else w, w))   # Down already maps to w
            if i < 4:
                self.down.append(Down(w, widths[i + 1]))
        # released names: up[j] = block_{five..eight}_up, dec[j] = block_{six..nine}; same graph
        self.build_decoder(widths, num_classes, p)

    @staticmethod
    def convert_released_state_dict(state: dict[str, Tensor]) -> dict[str, Tensor]:
        """Rename a UA-MT / SSL4MIS / BCP `VNet(normalization="batchnorm")` state dict (`block_one.conv.0.weight`,
        `block_five_up.conv.1.running_mean`, `out_conv.bias`, optional `module.` prefix) to this class's keys."""
        names = ("one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
        table = {f"block_{n}_dw.conv.": f"down.{i}." for i, n in enumerate(names[:4])}
        table |= {f"block_{n}_up.conv.": f"up.{j}." for j, n in enumerate(names[4:8])}
        table |= {f"block_{n}.conv.": f"enc.{i}." for i, n in enumerate(names[:5])}
        table |= {f"block_{n}.conv.": f"dec.{j}." for j, n in enumerate(names[5:])}
        table["out_conv."] = "head."
        out = {}
        for key, value in state.items():
            k = key.removeprefix("module.")
            for old, new in table.items():
                if k.startswith(old):
                    out[new + k[len(old):]] = value
                    break
            else:
                raise KeyError(f"unexpected key in a released VNet state dict: {key!r}")
        return out

    def encode(self, x: Tensor) -> list[Tensor]:
        """[x1 … x5] at full, ½, ¼, ⅛, 1/16 resolution; x5 after the bottleneck dropout (as released)."""
        check_divisible(x, 16, "vnet")
        feats = []
        for i, stage in enumerate(self.enc):
            x = stage(x if i == 0 else self.down[i - 1](x))
            feats.append(x)
        feats[-1] = self.dropout(feats[-1])
        return feats
