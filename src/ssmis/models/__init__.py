"""Segmentation networks, registered by name; `build_model` makes one from a ModelConfig."""

from __future__ import annotations

from torch import nn

from ssmis.models import one_logit, resnet, segformer, unet, unet3d, vnet  # noqa: F401  (registers models)
from ssmis.models.output import SegOutput
from ssmis.registry import MODELS

__all__ = ["SegOutput", "build_model", "model_from_args"]


def build_model(cfg, in_channels: int, num_classes: int, **overrides) -> nn.Module:
    """The configured model; `overrides` replace constructor arguments (e.g. num_classes=1 for a sigmoid head)."""
    cls = MODELS.get(cfg.name, "model.name")
    args = {"in_channels": in_channels, "num_classes": num_classes, "widths": tuple(cfg.widths),
            "dropout": tuple(cfg.dropout), **overrides}
    return cls(**args)


def model_from_args(name: str, args: dict) -> nn.Module:
    """Rebuild a model from the constructor arguments stored in a checkpoint."""
    return MODELS.get(name)(**args)
