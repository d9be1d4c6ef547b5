"""The one output type of every segmentation network, and the encode/perturb/decode forward they share."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor, nn


@dataclass
class SegOutput:
    logits: Tensor                                   # B×K×spatial
    features: list[Tensor] | None = None             # encoder maps shallow -> deep (need_features=True)
    aux: dict[str, Tensor] = field(default_factory=dict)


class EncoderDecoder(nn.Module):
    """A network with `encode(x) -> features` and `decode(features) -> SegOutput`."""

    def forward(self, x: Tensor, need_features: bool = False, perturb_features=None) -> SegOutput:
        """`perturb_features(list) -> list` acts between encoder and decoder (UniMatch's feature stream); going
        through forward keeps DDP's gradient bookkeeping intact."""
        feats = self.encode(x)
        if perturb_features is not None:
            feats = perturb_features(feats)
        return self.decode(feats, need_features)
