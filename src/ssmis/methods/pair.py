"""Two networks of different architectures trained side by side (C3S3, MEDL): network 1 is the run's model
(`model.name`), network 2 a second architecture named by `method.net2` (default: the ResNet34-encoder network of
the run's dimension). Both are optimised by the engine's one optimiser (per-parameter state, so exactly two
optimisers with the same settings stepped together). Network 1 is what validation, test and `ssmis predict`
use and what every table reports; `ssmis eval --ensemble` / `ssmis predict --ensemble` use the two-network
average (ssmis.models.ensemble) where a method's protocol asks for it."""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import Field

from ssmis.errors import UserError
from ssmis.methods.base import Method, MethodConfig
from ssmis.registry import MODELS

DEFAULT_NET2 = {2: "resnet34_unet", 3: "resnet34_vnet"}


class PairConfig(MethodConfig):
    net2: str = Field("auto", description="Registry name of network 2, a different architecture from model.name; "
                      "auto = resnet34_unet in 2D, resnet34_vnet in 3D.")
    net2_args: dict[str, Any] = Field(default_factory=dict, description="Constructor arguments of network 2 "
                                      "besides its channels and classes (e.g. smaller widths); default: its own.")


class TwoNetworks(Method):
    """Base of two-network methods: `build_pair` makes and registers net1 / net2; network 1 is reported."""

    needs_features: ClassVar[bool] = False      # both networks must offer feature taps (SegOutput.aux)

    def net2_name(self) -> str:
        return DEFAULT_NET2[self.ctx.spatial_dims] if self.cfg.net2 == "auto" else self.cfg.net2

    def build_pair(self, ctx) -> None:
        name = self.net2_name()
        method = self.cfg.name
        net1 = ctx.build_model()
        net2 = ctx.build_model(name, **self.cfg.net2_args)
        if self.needs_features:
            for where, net in (("model.name", net1), ("method.net2", net2)):
                if "features" not in getattr(type(net), "supports", frozenset()):
                    with_taps = [n for n in MODELS.list() if "features" in getattr(MODELS.get(n), "supports", ())
                                 and MODELS.get(n).spatial_dims == ctx.spatial_dims]
                    raise UserError(where, f"{type(net).__name__} has no feature taps, which {method} needs",
                                    f"Use a network with features: {', '.join(with_taps)}.")
        self.net1 = ctx.add("net1", net1, trainable=True)
        self.net2 = ctx.add("net2", net2, trainable=True)

    def eval_model(self):
        return self.ctx.modules["net1"]

    def ensemble_modules(self) -> list[str]:
        return ["net1", "net2"]


