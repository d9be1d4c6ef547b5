"""A one-logit (sigmoid) network seen as a two-class one, so that validation, `ssmis eval` and `ssmis predict`
(softmax/argmax over class logits) take it unchanged: logits [0, z], whose softmax is [1 − σ(z), σ(z)] and whose
argmax is z > 0 (ties to background). ERSR trains such a network (methods.md "ERSR", B0)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ssmis.models.output import SegOutput
from ssmis.registry import MODELS


@MODELS.register("one_logit")
class OneLogitAsTwoClasses(nn.Module):
    """Wraps a registered network with one output channel; forward returns two-class logits [0, z].

    Built from a checkpoint's `model_args` (`net` = the inner network's registry name plus its constructor
    arguments, `num_classes` = 2), or around an existing one-logit network (`net` a module, e.g. ERSR's student:
    the wrapper shares its parameters). Its state dict is the inner network's under `net.`."""

    spatial_dims = 2          # ERSR, its only user, is 2D

    def __init__(self, net: str | nn.Module = "unet2d", num_classes: int = 2, **net_args):
        super().__init__()
        if num_classes != 2:
            raise ValueError(f"a one-logit network has 2 classes (background, foreground), not {num_classes}")
        if isinstance(net, str):
            net = MODELS.get(net)(**{**net_args, "num_classes": 1})
        elif net_args:
            raise ValueError("constructor arguments go with a network name, not with a built network")
        name = MODELS.name_of(net)
        if name is None or net.init_args.get("num_classes") != 1:
            raise ValueError(f"{type(net).__name__} is not a registered network with one output channel")
        self.net = net
        self.init_args = {"net": name, **net.init_args, "num_classes": 2}

    def forward(self, x: Tensor, **kwargs) -> SegOutput:
        out = self.net(x, **kwargs)
        z = out.logits
        return SegOutput(torch.cat([torch.zeros_like(z), z], dim=1), out.features, out.aux)
