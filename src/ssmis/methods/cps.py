"""CPS (Cross Pseudo Supervision): two differently initialised networks teach each other with hard
pseudo-labels on the unlabelled images (methods.md, "CPS"; SSL4MIS train_cross_pseudo_supervision_2D/3D)."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from ssmis.errors import UserError
from ssmis.losses import ce_dice_loss
from ssmis.methods.base import LABELED_INPUTS, Batch, Method, MethodConfig, StepOutput
from ssmis.registry import METHODS
from ssmis.schedules import sigmoid_ramp

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)          # not transposed convs: the reference checks nn.Conv3d only


def cross_pseudo_loss(logits: Tensor, other_logits: Tensor) -> Tensor:
    """CE(z, argmax z_other): the other network's hard prediction is the target, so no gradient reaches it.
    (argmax of the logits = argmax of the softmax, which is what the reference takes.)"""
    target = other_logits.detach().float().argmax(1)
    return F.cross_entropy(logits.float(), target)


def reinit(model: nn.Module, scheme: Literal["kaiming", "xavier"]) -> nn.Module:
    """The 3D reference init: conv weights Kaiming-normal (fan_in, gain √2) or Xavier-normal, BN γ = 1, β = 0;
    conv biases and all other layers keep their default init."""
    init = nn.init.kaiming_normal_ if scheme == "kaiming" else nn.init.xavier_normal_
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, _CONV):
                init(m.weight)
            elif isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine:
                m.weight.fill_(1.0)
                m.bias.zero_()
    return model


def same_weights(a: nn.Module, b: nn.Module) -> bool:
    pa, pb = list(a.parameters()), list(b.parameters())
    return len(pa) == len(pb) and all(x.shape == y.shape and torch.equal(x, y) for x, y in zip(pa, pb))


SLOT_INPUTS = frozenset({"teacher_probs", "student_logits", "student_probs", "image", "step", "network"})


@METHODS.register("cps")
class CPS(Method):
    """CPS: two differently initialised networks supervise each other with hard pseudo-labels (net 1 reported).

    Plug-in slots, once per direction (the other network plays the teacher; `network` = its index, 0 = net 1):
    `targets` (its probabilities, before the argmax), `mask` (per-pixel weights of the cross term) and `unsup_loss`
    (the per-pixel CE); and once per network `labeled_loss` (an extra labelled term weighted like the cross term,
    reference = the other network's prediction)."""

    provides = {"targets": SLOT_INPUTS, "mask": SLOT_INPUTS, "unsup_loss": SLOT_INPUTS, "labeled_loss": LABELED_INPUTS}

    class Config(MethodConfig):
        name: Literal["cps"] = "cps"
        lambda_u: float = Field(0.1, ge=0, description="Maximum weight of the cross pseudo-supervision term.")
        rampup: float = Field(1.0, ge=0, le=1, description="Sigmoid ramp length as a fraction of the run "
                              "(200 epochs of 150 it = 30k of 30k it in the reference).")
        epoch_len: int = Field(150, ge=1, description="Iterations per ramp 'epoch' (SSL4MIS counts the ramp in "
                               "epochs of 150).")
        init: Literal["auto", "default", "kaiming_xavier"] = Field(
            "auto", description="Initialisation of the two networks: 'default' = the model's own init, two "
            "random draws (SSL4MIS 2D); 'kaiming_xavier' = net 1 Kaiming-normal, net 2 Xavier-normal (SSL4MIS "
            "3D); 'auto' = default in 2D, kaiming_xavier in 3D.")

    def build(self, ctx):
        # Two calls of the factory draw two initialisations from the advancing global RNG.
        net1, net2 = ctx.build_model(), ctx.build_model()
        init = self.cfg.init if self.cfg.init != "auto" else ("default" if ctx.spatial_dims == 2 else "kaiming_xavier")
        if init == "kaiming_xavier":
            reinit(net1, "kaiming")
            reinit(net2, "xavier")
        if same_weights(net1, net2):
            raise RuntimeError("CPS: the model factory built two identical networks (does it reseed the RNG?); "
                               "CPS needs two different initialisations")
        # Both nets go into the engine's single SGD: with per-parameter momentum and weight decay and one lr
        # schedule this is exactly the reference's two SGD optimisers with the same settings, stepped together.
        self.net1 = ctx.add("net1", net1, trainable=True)
        self.net2 = ctx.add("net2", net2, trainable=True)

    def weight(self, step: int) -> float:
        """λ(t) = λ_max·r(⌊t/150⌋, L), L scaled to the run: MT's ramp without its 2D gate (CPS has none)."""
        return self.cfg.lambda_u * sigmoid_ramp(step // self.cfg.epoch_len,
                                                self.cfg.rampup * self.ctx.total_steps / self.cfg.epoch_len)

    def train_step(self, lb: Batch, ub: Batch | None, step: int) -> StepOutput:
        if ub is None:
            raise UserError("train.unlabeled_bs", "CPS needs unlabelled images", "Set train.unlabeled_bs > 0.")
        n = lb.image.shape[0]
        x = torch.cat([lb.image, ub.image])        # one forward per net over labelled + unlabelled (BN as reference)
        z1, z2 = self.net1(x).logits, self.net2(x).logits
        sup1, sup2 = ce_dice_loss(z1[:n], lb.label), ce_dice_loss(z2[:n], lb.label)
        cps1 = self.cross_term(z1[n:], z2[n:], ub.image, step, 1)    # net 1 learns from net 2's argmax
        cps2 = self.cross_term(z2[n:], z1[n:], ub.image, step, 0)
        if self.slot_active("labeled_loss"):
            p1, p2 = (z[:n].detach().float().softmax(1) for z in (z1, z2))
            cps1 = cps1 + self.labeled_term(z1[:n], p2, lb.label, step, network=0)
            cps2 = cps2 + self.labeled_term(z2[:n], p1, lb.label, step, network=1)
        w = self.weight(step)
        loss = sup1 + sup2 + w * (cps1 + cps2)
        with torch.no_grad():
            agree = (z1[n:].argmax(1) == z2[n:].argmax(1)).float().mean()
        return StepOutput(loss, {"sup1": sup1.detach(), "sup2": sup2.detach(), "cps1": cps1.detach(),
                                 "cps2": cps2.detach(), "w": w, "agree": agree})

    def cross_term(self, z: Tensor, z_other: Tensor, image: Tensor, step: int, other: int) -> Tensor:
        """CE(z, argmax z_other), through the targets, unsup_loss and mask slots when plug-ins are configured."""
        if not len(self.ctx.plugins):
            return cross_pseudo_loss(z, z_other)
        probs = z_other.detach().float().softmax(1)
        inp = dict(teacher_probs=probs, student_logits=z, student_probs=z.detach().float().softmax(1), image=image,
                   step=step, network=other)
        targets = self.slot("targets", probs, **inp)
        inp["teacher_probs"] = targets
        ce = self.slot("unsup_loss", F.cross_entropy(z.float(), targets.argmax(1), reduction="none"), **inp)
        mask = self.slot("mask", torch.ones_like(ce), **inp)
        return (mask * ce).mean()

    def eval_model(self):
        return self.ctx.modules["net1"]
