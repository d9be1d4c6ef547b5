"""Several trained networks as one predictor: the average of their softmax (C3S3's published inference, MEDL's test
prediction). `ssmis eval --ensemble` and `ssmis predict --ensemble` build it from a two-network run's checkpoint."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ssmis.models.output import SegOutput

LOG_FLOOR = 1e-12     # log(0) guard: a class no network gives any probability keeps a finite log-probability


@torch.no_grad()
def mean_softmax(nets: list[nn.Module], x: Tensor) -> Tensor:
    """The average of the networks' softmax, float32 (networks in their current mode)."""
    return torch.stack([net(x).logits.float().softmax(1) for net in nets]).mean(0)


class SoftmaxAverage(nn.Module):
    """Networks with the same input channels and classes; the forward returns log(mean softmax) as the logits, so that
    what the predictors do with logits (softmax, sliding-window averaging of probabilities, argmax) sees the average."""

    def __init__(self, nets: list[nn.Module]):
        super().__init__()
        shapes = {(int(n.init_args["in_channels"]), int(n.init_args["num_classes"])) for n in nets}
        if len(shapes) != 1:
            raise ValueError(f"networks of an ensemble must share channels and classes, got {sorted(shapes)}")
        (channels, classes), = shapes
        self.nets = nn.ModuleList(nets)
        self.init_args = {"in_channels": channels, "num_classes": classes}     # what the predictors read

    def forward(self, x: Tensor, **_) -> SegOutput:
        return SegOutput(mean_softmax(list(self.nets), x).clamp_min(LOG_FLOOR).log())
