"""M&N: a 2D model applied slice by slice and a 3D model co-train on each other's soft pseudo-masks, with
learning-rate guided sampling (methods.md "M&N"; [CODE pakheiyeung/M-N train.py, model.py, losses.py,
hyperparameters.py]). 3D only.

Models: f3D = the run's model (`model.name`, the M&N 3D U-Net `unet3d`); reported, validated, tested and exported.
f2D = `method.model2d` (`name` of any registered 2D model with the run's channels and classes, `args` its other
constructor arguments): `unet2d` (default, no extra needed) or `segformer` (ssmis.models.segformer: Hugging Face
SegFormer + LoRA, `pip install 'ssmis[mn]'`; lora=auto is resolved in the config, so config.yaml records which:
LoRA with `pretrained` weights, full fine-tuning from scratch).

Slicing S (`to_slices`): (B, C, s0, s1, s2) -> (B·D, C, ·, ·), slice k of volume b at index b·D + k along the spatial
axis `slice_axis`; S⁻¹ (`from_slices`) its exact inverse. ssmis orders 3D arrays as stored: ACDC-3D, the sphere
phantom and nnU-Net volumes depth first (D×H×W, patch [16, 128, 128]), LA's h5 x, y, z (depth last, patch
[112, 112, 80]). `auto` = the patch axis with the fewest voxels (the through-plane axis: 0 for ACDC-3D, 2 for LA;
the first of equal ones, ssmis's D); the spec's S slices the last axis (`slice_axis: 2`).

Schedule (counted in epochs of `epoch_len` iterations, the code's total_round = 8): stage 1 "warmup", epochs
0 … E_t − 1: every iteration both models train on the same labelled batch (one backward of L_2D + L_3D = two
optimisers). Stage 2 "cotrain", epochs E_t … E_max − 1 of each model, alternating one epoch each, the 2D model
first: the predicting model is in eval mode under no_grad, its softmax on the unlabelled patches (no threshold) is
the target of the training model on [x_u; x_l] (labelled targets one-hot). So a run has N = ⌈T/epoch_len⌉ epoch
slots = E_t + 2(E_max − E_t); the literature's E_max = 4000, E_t = 500, warm-up 50 (N = 7500, T = 60 000) are scaled
by N/7500 to the run (`RunSchedule.for_run`). Each model's epoch counter is a function of the step, so resume is
exact without extra state.

Learning rates: optim.lr is the 3D model's (AdamW 1e-4, sched constant); the 2D model's is lr2d_ratio × that
(1e-3). Each model's own per-epoch schedule multiplies (Method.lr_scale): linear 1 % → 100 % over the warm-up,
cosine to 0 until E_t, a cosine restart from E_t to E_max.

Learning-rate guided sampling: of the B = train.labeled_bs = train.unlabeled_bs volumes each stream delivers per
step, the training model's epoch e takes n_u(e) unlabelled and n_l = B − n_u labelled ones (the first of each
batch): n_u = 0 before E_t, then ⌊B·(e − E_t)/(E_max − E_t)⌋ (`lrg_mode: linear`, the code) or [ours]
⌊B·(1 − lr(e)/lr_peak)⌋ (`cosine`), at most B − 1. The engine's two streams are endless seeded permutations, so an
epoch is always epoch_len iterations however few labelled volumes there are, and labelled volumes repeat within
an epoch (and within a batch when there are fewer than B): the code's cycling of the labelled files to the fold
length. The unlabelled stream holds the split's unlabelled cases only (never val/test: the code's transductive
pool is not reproduced).

Loss (both models): squared Dice (background included) + KL 'mean' against soft targets (ssmis.losses.soft_dice_kl).
Best checkpoint: chosen among the stage-2 validations only (Method.selection_stages), as the code validates there
only. Not implemented: the code's saved hard pseudo-masks, used only to bias unlabelled crops toward foreground.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor, nn

from ssmis.errors import UserError
from ssmis.losses.soft_dice_kl import one_hot, soft_dice_kl
from ssmis.methods.base import Batch, Method, MethodConfig, StepOutput
from ssmis.models.segformer import resolve_lora
from ssmis.registry import METHODS, MODELS

MODULES = ("model2d", "model3d")


# ---- slicing ---------------------------------------------------------------------------------------------------

def to_slices(x: Tensor, axis: int) -> Tensor:
    """S: (B, C, s0, s1, s2) -> (B·D, C, ·, ·), D = s_axis; slice k of volume b at index b·D + k."""
    x = x.movedim(2 + axis, 1)
    return x.reshape(-1, *x.shape[2:])


def from_slices(y: Tensor, batch: int, axis: int) -> Tensor:
    """S⁻¹: (B·D, C, ·, ·) -> (B, C, s0, s1, s2)."""
    return y.reshape(batch, -1, *y.shape[1:]).movedim(1, 2 + axis)


def resolve_axis(slice_axis: int | str, spatial: tuple[int, ...]) -> int:
    """`auto`: the spatial axis with the fewest voxels (the first of equal ones)."""
    return min(range(len(spatial)), key=lambda a: spatial[a]) if slice_axis == "auto" else int(slice_axis)


# ---- schedule --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Phase:
    stage: str            # warmup | cotrain
    trainee: str          # both | model2d | model3d
    epochs: dict          # module -> its epoch counter


@dataclass(frozen=True)
class RunSchedule:
    """Epochs of the run (already scaled): warm-up E_w, stage-1 end E_t, end E_max; `epoch_len` iterations each."""
    epoch_len: int
    warmup: int
    transition: int
    max_epochs: int

    @classmethod
    def for_run(cls, total_steps: int, epoch_len: int, warmup: int, transition: int, max_epochs: int) -> "RunSchedule":
        """Scale the literature's epochs to N = ⌈T/epoch_len⌉ slots = E_t + 2(E_max − E_t)."""
        n = math.ceil(total_steps / epoch_len)
        s = n / (2 * max_epochs - transition)
        e_t = min(round(transition * s), n)
        return cls(epoch_len, min(round(warmup * s), e_t), e_t, e_t + math.ceil((n - e_t) / 2))

    def phase(self, step: int) -> Phase:
        slot = step // self.epoch_len
        if slot < self.transition:
            return Phase("warmup", "both", {"model2d": slot, "model3d": slot})
        k = slot - self.transition                 # stage 2: the 2D model trains on even k, the 3D model on odd k
        return Phase("cotrain", MODULES[k % 2], {"model2d": self.transition + (k + 1) // 2,
                                                 "model3d": self.transition + k // 2})

    def lr_factor(self, e: int) -> float:
        """Linear 1 % -> 100 % over E_w, cosine to 0 until E_t, cosine restart from E_t to E_max (per epoch)."""
        e = min(e, self.max_epochs)
        if e < self.warmup:
            return 0.01 + 0.99 * e / self.warmup
        start, end = (self.warmup, self.transition) if e < self.transition else (self.transition, self.max_epochs)
        return 0.5 * (1 + math.cos(math.pi * (e - start) / max(1, end - start)))

    def n_unlabeled(self, e: int, batch: int, mode: str = "linear") -> int:
        """n_u(e): 0 before E_t, then ⌊B(e − E_t)/(E_max − E_t)⌋ (linear) or ⌊B(1 − lr(e)/lr_peak)⌋ (cosine), ≤ B − 1."""
        if e < self.transition:
            return 0
        if mode == "linear":
            n = batch * (e - self.transition) // max(1, self.max_epochs - self.transition)
        else:
            n = math.floor(batch * (1 - self.lr_factor(e)))
        return max(0, min(n, batch - 1))


# ---- config ----------------------------------------------------------------------------------------------------

class Model2D(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field("unet2d", description="Registry name of the 2D model (unet2d, segformer, any 2D model).")
    args: dict[str, Any] = Field(default_factory=dict, description="Its constructor arguments besides channels and "
                                 "classes; segformer: pretrained, lora, config, rank, alpha, lora_dropout.")

    @model_validator(mode="after")
    def _record_lora(self):
        if self.name == "segformer":             # config.yaml says which: LoRA or full fine-tuning
            pre = self.args.get("pretrained")
            self.args = {**self.args, "pretrained": pre, "lora": resolve_lora(self.args.get("lora", "auto"), pre)}
        return self


class MNConfig(MethodConfig):
    model2d: Model2D = Field(default_factory=Model2D, description="The 2D model: {name, args}.")
    epoch_len: int = Field(8, ge=1, description="Iterations per epoch (the code's total_round).")
    max_epochs: int = Field(4000, ge=2, description="E_max of the literature run, scaled to train.iterations.")
    transition_epochs: int = Field(500, ge=0, description="E_t: end of the labelled warm-up stage (literature).")
    warmup_epochs: int = Field(50, ge=0, description="Linear lr warm-up 1 % -> 100 % (literature epochs).")
    lrg_mode: Literal["linear", "cosine"] = Field("linear", description="n_u(e): the code's linear ramp, or [ours] "
                                                  "⌊B(1 − lr(e)/lr_peak)⌋.")
    lr2d_ratio: float = Field(10.0, gt=0, description="2D lr / 3D lr (optim.lr is the 3D model's): 1e-3 / 1e-4.")
    slice_axis: Literal["auto", 0, 1, 2] = Field("auto", description="Spatial axis (array order) the 2D model "
                                                 "slices along; auto = the patch axis with the fewest voxels.")

    @model_validator(mode="after")
    def _order(self):
        if not self.warmup_epochs <= self.transition_epochs < self.max_epochs:
            raise ValueError("need warmup_epochs <= transition_epochs < max_epochs")
        return self


def _terms(module: str, total: Tensor, dice: Tensor, kl: Tensor) -> dict[str, Tensor]:
    d = module[-2:]                                # 2d | 3d
    return {f"loss_{d}": total.detach(), f"dice_{d}": dice.detach(), f"kl_{d}": kl.detach()}


# ---- method ----------------------------------------------------------------------------------------------------

@METHODS.register("mn")
class MN(Method):
    """M&N: 2D (slice-wise) and 3D models co-train on each other's soft pseudo-masks (3D model reported)."""

    class Config(MNConfig):
        name: Literal["mn"] = "mn"

    stages = ("warmup", "cotrain")
    spatial_dims = frozenset({3})
    per_module_lr = True

    @classmethod
    def preflight(cls, cfg) -> None:
        """The 2D model's name and, for SegFormer, its packages (transformers, peft with LoRA)."""
        MODELS.get(cfg.model2d.name, "method.model2d.name")
        if cfg.model2d.name == "segformer":
            from ssmis.models.segformer import require

            require(cfg.model2d.args["lora"])

    def build(self, ctx):
        net3d = ctx.build_model()
        cls = MODELS.get(self.cfg.model2d.name, "method.model2d.name")
        if cls.spatial_dims != 2:
            raise UserError("method.model2d.name", f"{self.cfg.model2d.name} is a {cls.spatial_dims}D model",
                            "M&N's 2D model predicts slices: give a 2D model, e.g. unet2d or segformer.")
        net2d = cls(**{"in_channels": net3d.init_args["in_channels"], "num_classes": ctx.num_classes,
                       **self.cfg.model2d.args}).to(ctx.device)
        self.net2d = ctx.add("model2d", net2d, trainable=True)
        self.net3d = ctx.add("model3d", net3d, trainable=True)
        c = self.cfg
        self.schedule = RunSchedule.for_run(ctx.total_steps, c.epoch_len, c.warmup_epochs, c.transition_epochs,
                                            c.max_epochs)

    def stage_fractions(self) -> tuple[float, ...]:
        first = min(1.0, self.schedule.transition * self.schedule.epoch_len / self.ctx.total_steps)
        return (first, 1.0 - first)

    def selection_stages(self) -> frozenset[str]:
        return frozenset({"cotrain"})

    def lr_scale(self, module: str, step: int) -> float:
        own = self.cfg.lr2d_ratio if module == "model2d" else 1.0
        return own * self.schedule.lr_factor(self.schedule.phase(step).epochs[module])

    def predict(self, module: str, x: Tensor, axis: int) -> Tensor:
        """Logits of a model on volumes B×C×spatial; the 2D model through S and S⁻¹."""
        if module == "model3d":
            return self.net3d(x).logits
        return from_slices(self.net2d(to_slices(x, axis)).logits, x.shape[0], axis)

    def counts(self, step: int, batch: int) -> tuple[int, int]:
        """(n_l, n_u) of the step: the training model's epoch decides (both share it in stage 1)."""
        ph = self.schedule.phase(step)
        e = ph.epochs["model3d" if ph.trainee == "both" else ph.trainee]
        n_u = self.schedule.n_unlabeled(e, batch, self.cfg.lrg_mode)
        return batch - n_u, n_u

    def train_step(self, lb: Batch, ub: Batch | None, step: int) -> StepOutput:
        b = lb.image.shape[0]
        if ub is None or ub.image.shape[0] != b:
            raise UserError("train.unlabeled_bs", "M&N draws B volumes per step, n_l of the labelled and n_u of the "
                            "unlabelled stream as the lr-guided sampling says, so both streams must deliver B",
                            "Set train.unlabeled_bs equal to train.labeled_bs (B = 5 in the spec).")
        ph = self.schedule.phase(step)
        n_l, n_u = self.counts(step, b)
        axis = resolve_axis(self.cfg.slice_axis, tuple(lb.image.shape[2:]))
        x, y = lb.image[:n_l], one_hot(lb.label[:n_l], self.ctx.num_classes)
        logs: dict[str, Any] = {"n_u": n_u, **{f"epoch_{m[-2:]}": e for m, e in ph.epochs.items()}}
        if ph.trainee == "both":
            self.net2d.train()
            self.net3d.train()
            loss = 0.0
            for m in MODULES:
                total, dice, kl = soft_dice_kl(self.predict(m, x, axis), y)
                loss = loss + total
                logs.update(_terms(m, total, dice, kl))
            return StepOutput(loss, logs)
        teacher = MODULES[1 - MODULES.index(ph.trainee)]
        self.net3d.train(ph.trainee == "model3d")
        self.net2d.train(ph.trainee == "model2d")
        if n_u:
            with torch.no_grad():
                y_u = self.predict(teacher, ub.image[:n_u], axis).float().softmax(1)
            x, y = torch.cat([ub.image[:n_u], x]), torch.cat([y_u, y])
        loss, dice, kl = soft_dice_kl(self.predict(ph.trainee, x, axis), y)
        return StepOutput(loss, {**logs, **_terms(ph.trainee, loss, dice, kl)})

    def eval_model(self) -> nn.Module:
        return self.ctx.modules["model3d"]
