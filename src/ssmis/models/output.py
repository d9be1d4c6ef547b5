"""The one output type of every segmentation network."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor


@dataclass
class SegOutput:
    logits: Tensor                                   # B×K×spatial
    features: list[Tensor] | None = None             # encoder maps shallow -> deep (need_features=True)
    aux: dict[str, Tensor] = field(default_factory=dict)
