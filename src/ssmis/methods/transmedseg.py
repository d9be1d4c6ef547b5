"""TransMedSeg: Transferable Semantic Augmentation (TSA) on the BCP host (methods.md "TransMedSeg").

BCP unchanged (labelled-only copy-paste pre-training, then bidirectional copy-paste self-training with EMA-teacher
pseudo-labels), plus in self-training L = L_BCP + β·L_tsa. L_tsa is the closed-form upper bound of the expected
cross-entropy when each pixel's classifier input a_i is translated by ã_i ~ N(a_i + λΔμ_y, λΣ^y)
(`ssmis.losses.tsa`): with the default direction s2t, over the **labelled** pixels of the two mixed images (ground
truth y), Δμ_y = μ_t^y − μ_s^y and Σ = Σ_t^y; with t2s over the pseudo-labelled pixels, Δμ = μ_s − μ_t and Σ_s.

Design (the spec leaves these open; all [ours]):
* Classifier form: the exact unfolded neighbourhood. The UNet-2D's output conv is 3×3, so a_i = the zero-padded 3×3
  neighbourhood of the last decoder feature (feature tap `last`; 9·16 = 144 values at full width) and W = the
  flattened kernel (C×144), so that z_i = W a_i + b holds exactly and the network is BCP's, unchanged. A 1×1(×1)
  head (VNet) gives a_i = the feature vector; a 3×3×3 head (UNet-3D) the 27-voxel neighbourhood. Heads behind a
  dropout (VNet, ResNet-UNet) read the feature before the dropout.
* Statistics: μ_s^c from the student's `last` features of the labelled pixels of the mixed images X_in (inside
  the box) and X_out (outside), class = ground truth; μ_t^c, Σ_t^c from the teacher's features of the unmixed
  unlabelled images u_a, u_b (the forward that makes BCP's pseudo-labels), class = the host's pseudo-label (argmax,
  then the per-class largest component when `lcc`), optionally only pixels with teacher confidence ≥ `confidence`.
  At most `max_pixels` random pixels per class and domain per step; detached; EMA memory (`TSAMemory`, momentum
  0.99) updated with this step's statistics before the loss (as TSA's train loop updates its memory first); Σ +
  ridge·I. Classes not yet seen in both domains get no augmentation (plain CE).
* λ = λ0·t/T over the self-training stage (t = steps since self-training began, T = its length; TSA's own ramp
  over its whole training, which here is the stage that has L_tsa). Pre-training is BCP's, without TSA.
* State: the memory is the non-trainable module `tsa_memory` (registered buffers: checkpointed, resumed exactly).
  Under DDP each process's per-class sums (count, Σa, Σaaᵀ) are all-reduced before the update, so every process
  holds the same memory.
* Plug-in slots: none offered (BCP's are not wired into this step; `targets` would be, see `provides`).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from ssmis.data.mixing import bidirectional_mix, box_mask
from ssmis.losses.tsa import TSAMemory, check_head, class_sums, classifier_matrix, tsa_loss
from ssmis.methods.base import Batch, StepOutput
from ssmis.methods.bcp import BCP, BCPConfig, mixed_step, pseudo_labels, split_pairs
from ssmis.plugins.base import sum_over_processes
from ssmis.registry import METHODS

FEATURE_TAP = "last"     # the last decoder feature, the input of the output conv (models: `aux["last"]`)


class FeatureTap:
    """Calls `net(x, need_features=True)` and keeps each call's `aux[key]`, so that BCP's pieces that call
    `net(x).logits` (mixed_step, pseudo_labels) run unchanged while TSA reads the features."""

    def __init__(self, net: nn.Module, key: str = FEATURE_TAP):
        self.net, self.key, self.features = net, key, []

    def __call__(self, x: Tensor):
        out = self.net(x, need_features=True)
        self.features.append(out.aux[self.key])
        return out


def classifier_conv(model: nn.Module) -> nn.Module:
    """The output conv of a segmentation network: `model.head`, or its last module when the head is a sequence
    (dropout + conv)."""
    head = getattr(model, "head", None)
    if isinstance(head, nn.Sequential):
        head = head[-1]
    if head is None:
        raise TypeError(f"{type(model).__name__} has no `head` output conv for TSA")
    check_head(head)
    return head


class TransMedSegConfig(BCPConfig):
    beta: float = Field(1.0, ge=0, description="Weight β of L_tsa (not given by the source; ours 1.0).")
    lambda0: float = Field(0.25, ge=0, description="λ = λ0·t/T over the self-training stage (TSA's code: 0.25).")
    tsa_direction: Literal["s2t", "t2s"] = Field(
        "s2t", description="s2t: labelled pixels (ground truth) shifted by μ_t − μ_s with covariance Σ_t (default); "
        "t2s: pseudo-labelled pixels shifted by μ_s − μ_t with Σ_s.")
    stats_momentum: float = Field(0.99, ge=0, lt=1, description="EMA momentum of the class statistics memory.")
    max_pixels: int = Field(4096, ge=1, description="At most this many random pixels per class and domain enter "
                            "the statistics per step (the background would dominate).")
    ridge: float = Field(1e-4, ge=0, description="Σ + ridge·I: keeps the covariance positive definite with few pixels.")
    confidence: float = Field(0.0, ge=0, le=1, description="Teacher pixels enter μ_t, Σ_t only with max softmax "
                              "probability ≥ this (0 = all; the spec's optional 0.9).")


@METHODS.register("transmedseg")
class TransMedSeg(BCP):
    """TransMedSeg: BCP + Transferable Semantic Augmentation (closed-form implicit feature translation loss)."""

    # no plug-in slots yet: BCP's `targets` path runs through here (targets_slot), but offering it needs the README's
    # slot table to list this method; BCP's unsup_loss / labeled_loss slots are not wired into the TSA step
    provides = {}

    class Config(TransMedSegConfig):
        name: Literal["transmedseg"] = "transmedseg"
        eval_net: Literal["student", "teacher"] = Field("student", description="Network validated and exported "
                                                        "(the reference code saves and tests the student).")

    def build(self, ctx):
        super().build(ctx)
        conv = classifier_conv(ctx.modules["student"])
        self.kernel = tuple(conv.kernel_size)
        dim = conv.in_channels * math.prod(self.kernel)
        cov_domain = "target" if self.cfg.tsa_direction == "s2t" else "source"
        self.memory = ctx.add("tsa_memory", TSAMemory(ctx.num_classes, dim, self.cfg.stats_momentum, cov_domain),
                              trainable=False)

    def tsa_lambda(self, step: int) -> float:
        """λ0·t/T with t, T counted in the self-training stage (its first step as the engine places it)."""
        total = self.ctx.total_steps
        start = int(round(self.cfg.pretrain * total))
        return self.cfg.lambda0 * min(max(step - start, 0) / max(total - start, 1), 1.0)

    def train_step(self, lb: Batch, ub: Batch | None, step: int) -> StepOutput:
        if self.stage == "pretrain":
            return super().train_step(lb, ub, step)
        cfg, num_classes = self.cfg, self.ctx.num_classes
        l_a, l_b, y_a, y_b, u_a, u_b = split_pairs(lb, ub)
        teacher = FeatureTap(self.teacher)
        p_a, q_a = pseudo_labels(teacher, u_a, cfg.lcc, self.targets_slot(u_a, step), with_probs=True)
        p_b, q_b = pseudo_labels(teacher, u_b, cfg.lcc, self.targets_slot(u_b, step), with_probs=True)
        mask = box_mask(l_a.shape[2:], cfg.mask_ratio, l_a.device)
        student = FeatureTap(self.student)
        m = mixed_step(student, l_a, l_b, u_a, u_b, y_a, y_b, p_a, p_b, mask, cfg.u_weight)
        # per pixel of [X_in; X_out]: its target (label or pseudo-label) and whether it comes from a labelled image
        target = torch.cat(bidirectional_mix(y_a, y_b, p_a, p_b, mask)).long()
        ones, zeros = torch.ones_like(y_a, dtype=torch.bool), torch.zeros_like(y_a, dtype=torch.bool)
        labelled = torch.cat(bidirectional_mix(ones, ones, zeros, zeros, mask))
        confident = torch.cat([q_a, q_b]).amax(1) >= cfg.confidence if cfg.confidence > 0 else None
        s2t = cfg.tsa_direction == "s2t"
        sums_s = class_sums(torch.cat(student.features), target, num_classes, cfg.max_pixels, covariance=not s2t,
                            select=labelled, kernel=self.kernel)
        sums_t = class_sums(torch.cat(teacher.features), torch.cat([p_a, p_b]), num_classes, cfg.max_pixels,
                            covariance=s2t, select=confident, kernel=self.kernel)
        reduced = sum_over_processes({**{f"s.{k}": v for k, v in sums_s.items()},
                                      **{f"t.{k}": v for k, v in sums_t.items()}})
        self.memory.source.update({k[2:]: v for k, v in reduced.items() if k.startswith("s.")})
        self.memory.target.update({k[2:]: v for k, v in reduced.items() if k.startswith("t.")})
        shift, cov = self.memory.augmentation("target" if s2t else "source", cfg.ridge)
        lam = self.tsa_lambda(step)
        w = classifier_matrix(classifier_conv(self.ctx.modules["student"]))
        z = torch.cat([m.z_in, m.z_out])
        tsa = tsa_loss(z, target, w, shift, cov, lam, select=labelled if s2t else ~labelled)
        loss = m.loss + cfg.beta * tsa
        return StepOutput(loss, {"mix_dice": m.dice.detach(), "mix_ce": m.ce.detach(), "tsa": tsa.detach(),
                                 "tsa_lambda": lam})
