"""C3S3, Complementary Competition and Contrastive Selection (methods.md "C3S3"; [CODE Y-TARL/C3S3 train_LA.py,
utils/ContrastiveLoss.py, utils/losses.py, models/*]): two networks of different architectures (A = `model.name`,
network 1; B = `method.net2`, network 2, by default the ResNet34-encoder network of the run's dimension), each with a
projector head on its final decoder feature, trained jointly on two views X¹, X² of every batch.

Per step (N ∈ {A, B}, v ∈ {1, 2}; labelled images first in each view, as the engine's two streams):
1. z_N^v = N(X^v) with the feature tap `aux["last"]` (4 forwards with gradient, in the reference's order
   A¹, B¹, A², B²); f_N^v = projector_N(aux["last"]).
2. Supervised: CE_N^v and the foreground Dice_N^v (squared denominators, smooth 1e-5, sums over the labelled batch)
   on the labelled images; L_sup^N = (CE¹ + Dice¹ + CE² + Dice²)/2.
3. Competition: S^N = α(CE¹ + CE²) + (1 − α)(Dice¹ + Dice²); the winner W is A if S^A < S^B, else B.
4. Only the loser N′: L_cp = λ(t)·Σ_v mean over unlabelled voxels and classes of (P_N′^v − Ŷ^v)², with the winner's
   sharpened, detached Ŷ^v = P_W^{v,1/T} / Σ_c P_W^{v,1/T}; λ(t) = consistency·r(⌊t/150⌋, L).
5. L_cos^N = mean(1 − cos(z_N^1, z_N^2)) on the logits of the whole batch, along the class axis (default) or, as the
   released code, along the last spatial axis (`cosine_axis: depth`; compat).
6. ODCL: L_iuc summed over the pairs (A¹, B¹), (A², B²), (A¹, B²), (A², B¹) (ssmis.losses.contrastive).
7. L_A = L_sup^A + L_cos^A + [W = B]·L_cp^A + ΣL_iuc, L_B likewise, and the step's loss is L_A + L_B.

Decisions (all [ours] unless the spec says otherwise):
* One backward for two. The reference calls L_A.backward(retain_graph) and then L_B.backward() and steps both SGDs.
  Every term of L_A except ΣL_iuc depends on A only (the winner's targets are detached), likewise for L_B, and ΣL_iuc
  depends on both; so A's gradient is ∇_A(L_sup^A + L_cos^A + [W = B]L_cp^A) + 2∇_A ΣL_iuc, and B's likewise. One
  backward of L_A + L_B gives exactly these gradients: the shared ΣL_iuc is counted twice, as in the reference (spec
  item 8). The engine's one SGD over both networks and both projectors equals the reference's two SGDs (per-parameter
  state; tests/test_cps.py shows it).
* Two views. The released loader crops once and returns the same tensor twice, so X¹ = X² and the views differ only
  through dropout (PITFALL; `identical_views: true` reproduces that). By default (implementation decision 4, correct
  behaviour by default) X¹ is the engine's augmented batch and X² = X¹ + clip(N(0, 0.1²), −0.2, 0.2), the noise of the
  same loader module's unused `RandomNoise` and of MT/UA-MT's teacher input: a photometric perturbation only, because
  L_cos and the cross pairs (A¹, B²), (A², B¹) compare the same voxel index across views and the labelled view 2 keeps
  view 1's labels, so a geometric difference would misalign them. Dropout differs between the forwards in both modes.
* More than two classes (ACDC): the paper is binary. Here "foreground" is any non-background class: the ODCL
  intersection/union use argmax ≠ 0 of each network, the Dice term is the mean over the foreground classes 1..K−1 of
  the per-class foreground Dice (one class at K = 2, the reference's `dice_loss(P[:, 1], y == 1)`); CE, the
  sharpening and L_cp's mean run over all K classes (both classes at K = 2, as the reference).
* α: 0.8 in 3D (LA, the code default), 0.5 in 2D (`alpha: auto`). ACDC's structures are small multi-class targets in a
  mostly-background slice, where pixel CE mostly measures the background; equal weights (the reference's value for its
  other small-structure task, Pancreas) let the foreground Dice, the metric ACDC reports, count as much as CE when
  choosing the teacher. α only picks the winner; it weights no gradient.
* Ramp: L = 40 epochs of 150 iterations at the literature length T_lit = 2500, scaled by T/T_lit (ACDC-lite scaling
  rule): at T = 2000, L = 32 and λ(1999) = 0.0172; at T = 2500 (LA), λ(2499) = 0.0165: the run ends at ≈ 40 % of the
  ramp in both (spec item 5).
* Init: every conv (transposed included) of both networks and both projectors Kaiming-normal, BN γ = 1, β = 0, as the
  reference's init loop (resnet.init_weights, which the ResNet34 networks also apply to themselves; `init: default`
  keeps the models' own init).
* Reported: network 1 (implementation decision 7; the validation, test and export use it). The protocol's
  ensemble, argmax of the mean of both softmaxes, is `C3S3.ensemble_predict` (`ssmis eval --ensemble` and `ssmis
  predict --ensemble` on a run); runs in ACDC-lite are "C3S3-2D"
  (decision 10), as is any run with a compat switch on.
* No plug-in slots; no EMA (the reference defines `ema_decay` but has no EMA model); the Gumbel-top-k sampler the
  reference builds is unused there and is not built here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from ssmis.errors import UserError
from ssmis.losses.contrastive import cosine, foreground, odcl_sum
from ssmis.methods.base import Batch, StepOutput, teacher_noise
from ssmis.methods.pair import PairConfig, TwoNetworks
from ssmis.models.ensemble import mean_softmax
from ssmis.models.projector import Projector
from ssmis.models.resnet import init_weights
from ssmis.plugins.base import sum_over_processes
from ssmis.registry import METHODS
from ssmis.schedules import sigmoid_ramp

ALPHA_AUTO = {2: 0.5, 3: 0.8}
PAIRS = ((0, 0), (1, 1), (0, 1), (1, 0))    # (view of A, view of B): (A¹, B¹), (A², B²), (A¹, B²), (A², B¹)
PROBE_SIDE = {2: 64, 3: 32}                 # input side of the one eval-mode forward that sizes a projector
COSINE_DIM = {"class": 1, "depth": -1}


# ---- pieces ---------------------------------------------------------------------------------------------


def foreground_dice_loss(probs: Tensor, target: Tensor, smooth: float = 1e-5) -> Tensor:
    """Mean over the foreground classes c = 1..K−1 of 1 − (2Σ p_c g_c + s)/(Σ p_c² + Σ g_c² + s), sums over the whole
    batch (UA-MT / C3S3 LA Dice: the foreground channel only at K = 2; SSL4MIS `dice_loss` minus the background)."""
    onehot = F.one_hot(target.long(), probs.shape[1]).movedim(-1, 1)[:, 1:].to(probs.dtype)
    p = probs[:, 1:]
    dims = [0] + list(range(2, probs.ndim))
    inter, p2, g2 = (p * onehot).sum(dims), (p * p).sum(dims), onehot.sum(dims)    # g² = g for a one-hot g
    return (1 - (2 * inter + smooth) / (p2 + g2 + smooth)).mean()


def supervised_terms(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """(CE, foreground Dice) of one network and view on the labelled images, float32."""
    logits = logits.float()
    return F.cross_entropy(logits, labels.long()), foreground_dice_loss(logits.softmax(1), labels)


def competition_score(ce: tuple[Tensor, Tensor], dice: tuple[Tensor, Tensor], alpha: float) -> Tensor:
    """S^N = α(CE¹ + CE²) + (1 − α)(Dice¹ + Dice²)."""
    return alpha * (ce[0] + ce[1]) + (1 - alpha) * (dice[0] + dice[1])


def sharpen(probs: Tensor, temperature: float) -> Tensor:
    """Ŷ = P^{1/T} / Σ_c P^{1/T} along the class axis, detached (the winner's pseudo-label)."""
    p = probs.detach().float().pow(1.0 / temperature)
    return p / p.sum(1, keepdim=True)


def competition(scores: tuple[Tensor, Tensor], probs_u: tuple[list[Tensor], list[Tensor]],
                temperature: float) -> tuple[int, list[Tensor]]:
    """Dynamic complementary competition. `scores` = (S^A, S^B); `probs_u[k][v]` = network k's softmax on view v's
    unlabelled images. Returns the winner (0 = A if S^A < S^B, else 1 = B, ties to B as the reference's `<`) and the
    unweighted [L_cp^A, L_cp^B]: the loser's Σ_v mean((P^v − Ŷ^v)²) against the winner's sharpened, detached Ŷ^v;
    the winner's entry is a zero constant (no L_cp and no gradient). Under DDP the scores are summed over the
    processes first, so all of them pick the same winner."""
    # under DDP every process must pick the same winner: compare the scores summed over the processes
    total = sum_over_processes({"s": torch.stack([scores[0].detach().float(), scores[1].detach().float()])})["s"]
    win = 0 if float(total[0]) < float(total[1]) else 1
    lose = 1 - win
    cp = sum(((p.float() - sharpen(q, temperature)) ** 2).mean() for p, q in zip(probs_u[lose], probs_u[win]))
    out = [torch.zeros((), device=cp.device), torch.zeros((), device=cp.device)]
    out[lose] = cp
    return win, out


def cosine_consistency(z1: Tensor, z2: Tensor, axis: Literal["class", "depth"] = "class") -> Tensor:
    """L_cos = mean(1 − cos(z¹, z²)) of one network's logits on the two views, along the class axis or, as the
    released code (`dim=-1`), along the last spatial axis (depth in 3D, width in 2D)."""
    return (1 - cosine(z1, z2, dim=COSINE_DIM[axis])).mean()


@torch.no_grad()
def tap_channels(net: nn.Module, dims: int, where: str) -> int:
    """Channels of the network's `aux["last"]` feature (what the projector reads), from one eval-mode forward of a
    zero image (eval mode: BN statistics, dropout and the RNG are left untouched)."""
    conv = next((m for m in net.modules() if isinstance(m, nn.modules.conv._ConvNd)), None)
    param = next(net.parameters())
    x = torch.zeros(1, conv.in_channels if conv is not None else 1, *(PROBE_SIDE[dims],) * dims,
                    device=param.device, dtype=param.dtype)
    was_training = net.training
    net.eval()
    try:
        aux = net(x, need_features=True).aux
    finally:
        net.train(was_training)
    if "last" not in aux:
        raise UserError(where, f"{type(net).__name__} offers no 'last' feature tap (the final decoder feature)",
                        "C3S3's projector reads it: use a network whose aux features include 'last', e.g. unet2d or "
                        "vnet.")
    return int(aux["last"].shape[1])


# ---- method ---------------------------------------------------------------------------------------------


@dataclass
class C3S3Terms:
    """One step's terms, index 0 = network A (net 1), 1 = network B (net 2): `cp` unweighted (0 for the winner),
    `w` = λ(t), `iuc` = ΣL_iuc over the four pairs (shared by both networks' losses)."""
    sup: list[Tensor]
    scores: list[Tensor]
    winner: int
    w: float
    cp: list[Tensor]
    cos: list[Tensor]
    iuc: Tensor
    cos_weight: float = 1.0
    odcl_weight: float = 1.0

    def loss(self, k: int) -> Tensor:
        """L_A (k = 0) or L_B (k = 1) = L_sup + cos_weight·L_cos + λ·L_cp (loser only) + odcl_weight·ΣL_iuc (both
        weights 1 in the method; 0 removes a term, as the published ablation rows)."""
        return self.sup[k] + self.cos_weight * self.cos[k] + self.w * self.cp[k] + self.odcl_weight * self.iuc


class C3S3Config(PairConfig):
    alpha: float | Literal["auto"] = Field("auto", description="Competition weight: S = α·CE + (1 − α)·Dice over both "
                                           "views; auto = 0.8 in 3D (LA code default), 0.5 in 2D (see the module "
                                           "docstring; the code uses 0.5 for Pancreas).")
    temperature: float = Field(0.1, gt=0, description="Sharpening temperature T of the winner's pseudo-labels.")
    tau: float = Field(0.1, gt=0, description="ODCL temperature τ.")
    consistency: float = Field(0.1, ge=0, description="λ_max of the loser's L_cp weight λ(t) = λ_max·r(⌊t/150⌋, L).")
    rampup: float = Field(40.0, ge=0, description="Ramp length L in epochs at the literature length lit_iterations, "
                          "scaled by train.iterations / lit_iterations (ACDC-lite scaling rule).")
    epoch_len: int = Field(150, ge=1, description="Iterations per ramp 'epoch' (the reference's iter_num // 150).")
    lit_iterations: int = Field(2500, ge=1, description="T_lit: the reference run's length (LA, 2500 iterations).")
    cosine_axis: Literal["class", "depth"] = Field("class", description="Axis of L_cos on the logits: class (what the "
                                                   "method means) or depth = the last spatial axis, the released "
                                                   "code's dim=-1 (compat).")
    identical_views: bool = Field(False, description="Compat: X² = X¹ (the released loader), the views differing only "
                                  "through dropout; default: X² = X¹ + clip(N(0, 0.1²), ±0.2).")
    cos_weight: float = Field(1.0, ge=0, description="Weight of L_cos in each network's loss: 1 in the method; 0 "
                              "removes the consistency term (the published ablation's rows without it).")
    odcl_weight: float = Field(1.0, ge=0, description="Weight of the shared ΣL_iuc (ODCL) in each network's loss: 1 in "
                               "the method; 0 removes contrastive selection (the ablation's rows without ODCL).")
    projector_dim: int = Field(64, ge=1, description="Output channels of the projector heads.")
    init: Literal["kaiming", "default"] = Field("kaiming", description="kaiming = the reference's init of both "
                                                "networks and projectors (Kaiming-normal convs, BN 1/0); default = "
                                                "the models' own.")
    checkpoint: bool | Literal["auto"] = Field("auto", description="Recompute the ODCL intermediates in the backward "
                                               "pass (torch.utils.checkpoint, as the reference) instead of storing "
                                               "them: the same values, less memory, more time. auto = on a GPU only "
                                               "(on the CPU it cost 20 % of a C3S3-2D step; RAM is rarely the limit).")


@METHODS.register("c3s3")
class C3S3(TwoNetworks):
    """C3S3: two networks compete (the better one teaches the other) + contrastive selection (network 1 reported).

    Network 1 = model.name (VNet / UNet-2D), network 2 = method.net2 (ResNet34-encoder network); both need the
    `last` feature tap, read by a projector head each. In ACDC-lite this is the 2D adaptation "C3S3-2D"."""

    needs_features = True

    class Config(C3S3Config):
        name: Literal["c3s3"] = "c3s3"

    def build(self, ctx):
        self.build_pair(ctx)
        self.alpha = ALPHA_AUTO[ctx.spatial_dims] if self.cfg.alpha == "auto" else float(self.cfg.alpha)
        projs = []
        for k, where in ((1, "model.name"), (2, "method.net2")):
            net = ctx.modules[f"net{k}"]
            proj = Projector(tap_channels(net, ctx.spatial_dims, where), self.cfg.projector_dim, ctx.spatial_dims)
            proj = proj.to(next(net.parameters()).device)
            if self.cfg.init == "kaiming":
                init_weights(net)
                init_weights(proj)
            projs.append(ctx.add(f"proj{k}", proj, trainable=True))
        self.proj1, self.proj2 = projs

    def weight(self, step: int) -> float:
        """λ(t) = consistency·r(⌊t/epoch_len⌋, rampup·T/T_lit)."""
        length = self.cfg.rampup * self.ctx.total_steps / self.cfg.lit_iterations
        return self.cfg.consistency * sigmoid_ramp(step // self.cfg.epoch_len, length)

    def views(self, lb: Batch, ub: Batch) -> tuple[Tensor, Tensor]:
        """(X¹, X²): labelled + unlabelled images; X² = X¹ (compat) or X¹ plus clipped Gaussian noise."""
        x1 = torch.cat([lb.image, ub.image])
        return x1, (x1 if self.cfg.identical_views else teacher_noise(x1))

    def terms(self, lb: Batch, ub: Batch, step: int) -> C3S3Terms:
        """The four forwards and every loss term of one step (see the module docstring)."""
        n = lb.image.shape[0]
        nets, projs = (self.net1, self.net2), (self.proj1, self.proj2)
        logits: tuple[list[Tensor], list[Tensor]] = ([], [])       # [network][view], float32
        feats: tuple[list[Tensor], list[Tensor]] = ([], [])
        for x in self.views(lb, ub):
            for k in (0, 1):                                        # A¹, B¹, A², B²
                out = nets[k](x, need_features=True)
                logits[k].append(out.logits.float())
                feats[k].append(projs[k](out.aux["last"]))
        sup, scores = [], []
        for k in (0, 1):
            (ce1, dice1), (ce2, dice2) = (supervised_terms(z[:n], lb.label) for z in logits[k])
            sup.append((ce1 + dice1 + ce2 + dice2) / 2)
            scores.append(competition_score((ce1, ce2), (dice1, dice2), self.alpha))
        probs_u = tuple([z[n:].softmax(1) for z in logits[k]] for k in (0, 1))
        winner, cp = competition((scores[0], scores[1]), probs_u, self.cfg.temperature)
        cos = [cosine_consistency(logits[k][0], logits[k][1], self.cfg.cosine_axis) for k in (0, 1)]
        fg = [[foreground(z) for z in logits[k]] for k in (0, 1)]
        ckpt = self.cfg.checkpoint if self.cfg.checkpoint != "auto" else self.ctx.device.type != "cpu"
        iuc = (odcl_sum(feats[0], feats[1], fg[0], fg[1], PAIRS, self.cfg.tau, ckpt) if self.cfg.odcl_weight
               else torch.zeros((), device=lb.image.device))       # weight 0: not computed (logged as 0)
        return C3S3Terms(sup, scores, winner, self.weight(step), cp, cos, iuc, self.cfg.cos_weight,
                         self.cfg.odcl_weight)

    def train_step(self, lb: Batch, ub: Batch | None, step: int) -> StepOutput:
        if ub is None:
            raise UserError("train.unlabeled_bs", "C3S3 needs unlabelled images", "Set train.unlabeled_bs > 0.")
        t = self.terms(lb, ub, step)
        loss_a, loss_b = t.loss(0), t.loss(1)
        logs = {"sup_a": t.sup[0].detach(), "sup_b": t.sup[1].detach(), "score_a": t.scores[0].detach(),
                "score_b": t.scores[1].detach(), "winner": float(t.winner), "w": t.w, "cp": t.cp[1 - t.winner].detach(),
                "cos_a": t.cos[0].detach(), "cos_b": t.cos[1].detach(), "iuc": t.iuc.detach(),
                "loss_a": loss_a.detach(), "loss_b": loss_b.detach()}
        # one backward of L_A + L_B = the reference's L_A.backward(retain_graph) + L_B.backward() (module docstring)
        return StepOutput(loss_a + loss_b, logs)

    def nets(self) -> list[nn.Module]:
        return [self.ctx.modules["net1"], self.ctx.modules["net2"]]

    @torch.no_grad()
    def ensemble_predict(self, x: Tensor) -> Tensor:
        """The protocol's prediction: argmax of the mean of both networks' softmax (networks in their current mode;
        put them in eval mode for testing)."""
        return mean_softmax(self.nets(), x).argmax(1)
