"""SPCL's semi-supervised stage (methods.md "SPCL", Downstream (B); [CODE jizongFox/Self-paced-Contrastive-Learning
semi_seg/scripts/run_semi_acdc, run_infonce_semi.py]): the supervised loss on labelled slices plus
w·(self-paced supervised contrastive loss on two views of the unlabelled slices), the contrastive term kept as a
regulariser during fine-tuning. Start it from a pre-trained encoder with `init.encoder` (`ssmis pretrain`);
regime (A), fine-tuning on labelled slices only, is the `supervised` method with `init.encoder`.

Per step: view 1 = the unlabelled batch as the engine augmented it, view 2 = a second, independent augmentation of
it (SSL4MIS rot90/flip-or-rotation + intensity jitter, drawn from the run's seeded RNG). One forward of the
student over labelled images and both views: the encoder sees all of them, the decoder only the labelled images
(the views' bottleneck is taken between encoder and decoder), so the views cost an encoder pass each. One
projection head per meta-label on the bottleneck. The meta-labels available here are those a batch carries:
`partition` (from the slices' positions) and `self` (SimCLR); scan/patient/phase need `ssmis pretrain`.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator
from torch import Tensor

from ssmis.config.schema import MetaLabelConfig
from ssmis.data.augment import intensity_jitter, random_geometry
from ssmis.data.meta_labels import partition_labels
from ssmis.errors import UserError
from ssmis.losses import ce_dice_loss
from ssmis.losses.supcon import epoch_of, gamma_at, supcon_loss, weighted_average
from ssmis.methods.base import Batch, Method, MethodConfig, StepOutput, require_feature_perturbation
from ssmis.registry import METHODS
from ssmis.spcl.encoder import ProjectionHead

BATCH_META_LABELS = ("partition", "self")


@METHODS.register("spcl")
class SPCL(Method):
    """SPCL (semi-supervised stage): supervised loss + w x self-paced contrastive loss on meta-labels of unlabelled slices."""

    spatial_dims = frozenset({2})

    class Config(MethodConfig):
        name: Literal["spcl"] = "spcl"
        contrast_weight: float = Field(0.1, ge=0, description="w of the contrastive term (the reference sweeps "
                                       "0.01, 0.1, 0.2, 0.5, 1.0; 0.1 is its config default).")
        meta_labels: list[MetaLabelConfig] = Field(
            default_factory=lambda: [MetaLabelConfig(name="partition")], min_length=1,
            description="Meta-labels of the contrastive term: partition and/or self (what a batch carries).")
        partitions: int = Field(3, ge=1, description="P of the partition meta-label (ACDC 3).")
        partition_rule: Literal["auto", "acdc", "floor"] = Field("auto", description="As pretrain.partition_rule.")
        tau: float = Field(0.07, gt=0, description="Temperature of the contrastive loss.")
        weighting: Literal["hard", "soft", "none"] = Field("soft", description="Self-paced pair weights.")
        schedule: Literal["inversesquare", "linear", "square"] = Field("inversesquare", description="γ schedule.")
        epochs: int = Field(60, ge=1, description="E of the γ schedule over the run (ACDC fine-tuning: 60 epochs).")
        projector_dim: int = Field(256, ge=1, description="Width of each projection head.")
        intensity: float = Field(0.3, ge=0, lt=1, description="Intensity jitter of the second view.")
        sup_loss: Literal["ce_dice", "ce"] = Field("ce_dice", description="Supervised loss: 0.5(CE + Dice) as every "
                                                   "ACDC-lite method, or CE only (the reference's KL to one-hot).")

        @field_validator("meta_labels")
        @classmethod
        def _batch_labels(cls, v):
            bad = [m.name for m in v if m.name not in BATCH_META_LABELS]
            if bad:
                raise ValueError(f"{bad} are not carried by a training batch; use {' or '.join(BATCH_META_LABELS)} "
                                 "(scan, patient and phase are for `ssmis pretrain`)")
            return v

    def build(self, ctx):
        self.student = ctx.add("student", ctx.build_model(), trainable=True)
        net = ctx.modules["student"]
        require_feature_perturbation(net, "SPCL's contrastive term")
        widths = getattr(net, "init_args", {}).get("widths")
        if not widths:
            raise UserError("model.name", f"{type(net).__name__} does not state its widths", "Use unet2d.")
        device = next(net.parameters()).device
        self.heads = {m.name: ctx.add(f"head_{m.name}", ProjectionHead(widths[-1], self.cfg.projector_dim).to(device),
                                      trainable=True) for m in self.cfg.meta_labels}

    def second_view(self, image: Tensor) -> Tensor:
        gen = torch.Generator().manual_seed(int(torch.randint(0, 2 ** 62, (1,))))
        view, _ = random_geometry(image, None, gen, "ssl4mis")
        return intensity_jitter(view, gen, self.cfg.intensity)

    def labels(self, name: str, ub: Batch) -> Tensor:
        if name == "self":
            return torch.arange(ub.image.shape[0])
        if ub.slice_index is None or bool((ub.slice_index < 0).any()):
            raise UserError("method.meta_labels", "the partition meta-label needs slices cut from volumes; these "
                            "data are 2D images", "Use the self meta-label.")
        return torch.from_numpy(partition_labels(ub.slice_index.cpu().numpy(), ub.num_slices.cpu().numpy(),
                                                 self.cfg.partitions, self.cfg.partition_rule))

    def train_step(self, lb: Batch, ub: Batch | None, step: int) -> StepOutput:
        if ub is None:
            raise UserError("train.unlabeled_bs", "SPCL's contrastive term needs unlabelled slices",
                            "Set train.unlabeled_bs > 0, or train the supervised method with init.encoder (regime A).")
        n_l, n_u = lb.image.shape[0], ub.image.shape[0]
        v2 = self.second_view(ub.image)
        captured = {}

        def tap(feats):          # the views' bottleneck; only the labelled images go on through the decoder
            captured["views"] = feats[-1][n_l:]
            return [f[:n_l] for f in feats]

        logits = self.student(torch.cat([lb.image, ub.image, v2.to(ub.image.dtype)]), perturb_features=tap).logits
        sup = ce_dice_loss(logits, lb.label) if self.cfg.sup_loss == "ce_dice" else F.cross_entropy(logits.float(), lb.label)
        feat = captured["views"]
        epoch = epoch_of(step, self.ctx.total_steps, self.cfg.epochs)
        terms, logs = [], {}
        for m in self.cfg.meta_labels:
            z = self.heads[m.name](feat)
            gamma = gamma_at(epoch, self.cfg.epochs, m.gamma0, m.gamma1, self.cfg.schedule)
            r = supcon_loss(z[:n_u], z[n_u:], self.labels(m.name, ub), self.cfg.tau, gamma, self.cfg.weighting)
            terms.append(r.loss)
            logs.update({f"admitted_{m.name}": r.admitted, f"gamma_{m.name}": gamma})
        con = weighted_average(terms, [m.weight for m in self.cfg.meta_labels])
        w = self.cfg.contrast_weight
        return StepOutput(sup + w * con, {"sup": sup.detach(), "con": con.detach(), "w": w, **logs})

    def eval_model(self):
        return self.ctx.modules["student"]
