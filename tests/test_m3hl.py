"""M3HL behaviour (methods.md "M3HL", Test it by): the per-sample M³ block mask (2D and 3D, the LA no-mix bug
guarded), complementary mixing in the ACDC and LA role layouts with targets and weights following the sources,
the high/low feature losses and the un-ramped total, the teacher in train mode from its own initialisation,
exact resume, a 3D run on the sphere phantom and "learns on a tiny phantom"."""

from __future__ import annotations

import csv
import random
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import assert_same, random_batches, tiny_method
from ssmis.config import load_config
from ssmis.data.mixing import mix, to_patches
from ssmis.engine.checkpoint import load_checkpoint
from ssmis.engine.run import train
from ssmis.methods.base import Batch
from ssmis.methods.bcp import mix_loss, split_pairs
from ssmis.methods.m3hl import (M3HL, block_mask, complementary_mix, high_level_loss, low_level_loss,
                                teacher_view)
from ssmis.models.unet import UNet2D
from ssmis.models.vnet import VNet, pooled_bottleneck

ROOT = Path(__file__).resolve().parent.parent


def states_equal(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def zero_blocks(mask: torch.Tensor, grid: int) -> torch.Tensor:
    """Per sample, how many blocks are 0, asserting that every block is entirely 0 or entirely 1."""
    blocks = to_patches(mask[:, None], grid).flatten(2)                  # B×K×pixels
    assert ((blocks == 0).all(2) | (blocks == 1).all(2)).all()
    return (blocks == 0).all(2).sum(1)


# ---- 1: M³ mask ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("side", [32, 128, 256])
def test_block_mask_2d_has_half_the_blocks_zero_per_sample(side):
    """4×4 grid (64 px at 256, 32 at 128, 8 at the phantom's 32), ρ = 0.5: 8 zero blocks in every sample,
    and the 6 masks of a seeded batch all differ."""
    torch.manual_seed(0)
    m = block_mask(6, (side, side), grid=4, ratio=0.5)
    assert m.shape == (6, side, side) and m.dtype == torch.float32
    assert zero_blocks(m, 4).tolist() == [8] * 6
    assert len({tuple(x.flatten().tolist()) for x in m}) == 6


def test_block_mask_3d_la_is_the_per_sample_mask():
    """LA: 112×112×80 (array order D×H×W = 80×112×112) in blocks 28×28×20: 32 of 64 zero per sample; the
    returned batch mask is the per-sample one, not the all-ones batch mask of the released LA code."""
    torch.manual_seed(0)
    m = block_mask(2, (80, 112, 112), grid=4, ratio=0.5)
    assert m.shape == (2, 80, 112, 112)
    assert to_patches(m[:, None], 4).shape[-3:] == (20, 28, 28)
    assert zero_blocks(m, 4).tolist() == [32, 32]
    assert m.mean().item() == 0.5 and not torch.equal(m[0], m[1])


def test_block_mask_draws_only_the_torch_rng():
    """Python's `random` plays no part (a checkpoint restores the torch RNG); sizes must divide by the grid."""
    torch.manual_seed(5)
    random.seed(1)
    a = block_mask(3, (16, 16))
    torch.manual_seed(5)
    random.seed(2)
    assert torch.equal(a, block_mask(3, (16, 16)))
    assert zero_blocks(block_mask(4, (16, 16), ratio=0.3), 4).tolist() == [4] * 4      # ⌊0.3·16⌋
    with pytest.raises(ValueError, match="does not divide"):
        block_mask(1, (30, 32))


# ---- 2: complementary mixing --------------------------------------------------------------------------

def constant_pairs(spatial):
    """u_a = 1, l_a = 2, u_b = 3, l_b = 4 with targets p̂_a = 0, y_a = 1, p̂_b = 2, y_b = 3 (= value − 1)."""
    u_a, l_a, u_b, l_b = (torch.full((2, 1, *spatial), v) for v in (1.0, 2.0, 3.0, 4.0))
    p_a, y_a, p_b, y_b = (torch.full((2, *spatial), v) for v in (0, 1, 2, 3))
    return l_a, l_b, u_a, u_b, y_a, y_b, p_a, p_b


@pytest.mark.parametrize("layout,spatial,on_m,off_m,weights", [
    ("acdc", (32, 32), (1.0, 4.0), (2.0, 3.0), ((0.5, 1.0), (1.0, 0.5))),
    ("la", (16, 16, 16), (2.0, 3.0), (1.0, 4.0), ((1.0, 0.5), (0.5, 1.0))),
])
def test_complementary_mixing_targets_follow_the_sources(layout, spatial, on_m, off_m, weights):
    """ACDC: X_1 takes u_a exactly where X_2 takes l_b (M) and l_a where X_2 takes u_b (1 − M). LA: X_l takes l_a
    and X_u takes u_b on M, u_a and l_b on 1 − M. Every pixel's target is its source's label or pseudo-label,
    pseudo-labelled regions weigh 0.5 and labelled ones 1."""
    torch.manual_seed(0)
    mask = block_mask(2, spatial)
    views = complementary_mix(*constant_pairs(spatial), mask, layout, u_weight=0.5)
    on = mask.bool()
    for v, a, b, (w_m, w_rest) in zip(views, on_m, off_m, weights):
        x = v.image[:, 0]
        assert (x[on] == a).all() and (x[~on] == b).all()
        assert torch.equal(mix(v.target_m, v.target_rest, mask), x.round().long() - 1)     # target = source
        assert (v.w_m, v.w_rest) == (w_m, w_rest)
        # the weight of each region is that of its source: 0.5 for unlabelled (u_a = 1, u_b = 3), 1 for labelled
        assert w_m == (0.5 if a in (1.0, 3.0) else 1.0) and w_rest == (0.5 if b in (1.0, 3.0) else 1.0)


@pytest.mark.parametrize("dims", [2, 3])
def test_train_step_feeds_the_student_complementary_per_sample_mixes(dims):
    """Through train_step (auto layout: acdc in 2D, la in 3D): the two student inputs are complementary, with
    one block mask per sample."""
    spatial = (16, 16) if dims == 2 else (16, 16, 16)
    make = (lambda: UNet2D(1, 4, widths=(4, 8, 16, 32, 64))) if dims == 2 else \
        (lambda: VNet(1, 2, widths=(4, 8, 16, 32, 64)))
    m, ctx = tiny_method(M3HL, num_classes=4 if dims == 2 else 2, spatial_dims=dims, make_model=make)
    img = torch.cat([torch.full((2, 1, *spatial), v) for v in (2.0, 4.0)])     # l_a = 2, l_b = 4
    lb = Batch(img, torch.zeros(4, *spatial, dtype=torch.long))
    ub = Batch(torch.cat([torch.full((2, 1, *spatial), v) for v in (1.0, 3.0)]))   # u_a = 1, u_b = 3
    seen = []
    ctx.modules["student"].register_forward_hook(lambda mod, i, o: seen.append(i[0][:, 0].clone()))
    out = m.train_step(lb, ub, 0)
    assert torch.isfinite(out.loss)
    x1, x2 = seen
    if dims == 2:                        # X_1 = u_a⊙M + l_a⊙(1 − M), X_2 = l_b⊙M + u_b⊙(1 − M)
        mask = x1 == 1
        assert torch.equal(x2 == 4, mask) and torch.equal(x1 == 2, ~mask) and torch.equal(x2 == 3, ~mask)
    else:                                # X_l = l_a⊙M + u_a⊙(1 − M), X_u = u_b⊙M + l_b⊙(1 − M)
        mask = x1 == 2
        assert torch.equal(x2 == 3, mask) and torch.equal(x1 == 1, ~mask) and torch.equal(x2 == 4, ~mask)
    assert zero_blocks(mask.float(), 4).tolist() == [4 ** dims // 2] * 2
    assert not torch.equal(mask[0], mask[1])


# ---- 3: feature losses, total, teacher -----------------------------------------------------------------

def test_feature_taps_have_the_specified_shapes():
    """UNet-2D: F_high = bottleneck (B, 256, H/16, W/16), F_low = last decoder feature (B, 16, H, W). VNet:
    F_high = MaxPool3d(k = 3, s = 2) of the bottleneck (LA: 7×7×5 -> 3×3×2)."""
    out = UNet2D(1, 4)(torch.rand(2, 1, 32, 32), need_features=True)
    assert out.aux["high"].shape == (2, 256, 2, 2) and out.aux["low"].shape == (2, 16, 32, 32)
    x5 = torch.randn(2, 256, 5, 7, 7)
    assert torch.equal(pooled_bottleneck(x5), nn.MaxPool3d(3, stride=2)(x5))
    assert pooled_bottleneck(x5).shape == (2, 256, 2, 3, 3)


def test_feature_losses_reference_values():
    torch.manual_seed(0)
    f = torch.randn(2, 256, 2, 2)
    assert high_level_loss([f, f], [f, f]).item() == pytest.approx(0.0, abs=1e-6)
    assert high_level_loss([-f, -f], [f, f]).item() == pytest.approx(2.0, abs=1e-6)
    ones = torch.ones(2, 16, 8, 8)
    assert low_level_loss([ones, ones], [torch.zeros_like(ones), torch.full_like(ones, 2.0)]).item() == 1.0
    # each mixed view is compared with both unlabelled originals
    g = torch.randn(2, 256, 2, 2)
    four = [1 - F.cosine_similarity(s.flatten(1), t.flatten(1)).mean() for s in (f, g) for t in (g, f)]
    assert high_level_loss([f, g], [g, f]).item() == pytest.approx(torch.stack(four).mean().item(), abs=1e-6)


@pytest.mark.parametrize("step", [0, 39])
def test_total_is_seg_plus_half_the_feature_losses_without_ramp(step):
    """L = L_seg + (L_low + L_high)/2 at every step, the first included: recomputed by replaying the same
    random draws (teacher dropout on u_a, u_b; the mask; student dropout on X_1, X_2)."""
    m, ctx = tiny_method(M3HL, total=40)
    lb, ub = random_batches(4, 4, 16, 4)
    torch.manual_seed(3)
    out = m.train_step(lb, ub, step)
    torch.manual_seed(3)
    l_a, l_b, y_a, y_b, u_a, u_b = split_pairs(lb, ub)
    t_a, t_b = teacher_view(m.teacher, u_a), teacher_view(m.teacher, u_b)
    mask = block_mask(2, (16, 16))
    views = complementary_mix(l_a, l_b, u_a, u_b, y_a, y_b, t_a.label, t_b.label, mask, "acdc")
    outs = [ctx.modules["student"](v.image, need_features=True) for v in views]
    seg = sum(sum(mix_loss(o.logits, v.target_m, v.target_rest, mask, v.w_m, v.w_rest))
              for o, v in zip(outs, views)) / 2
    low = sum(F.l1_loss(o.aux["low"], t.low) for o in outs for t in (t_a, t_b)) / 4
    high = sum(1 - F.cosine_similarity(o.aux["high"].flatten(1), t.high.flatten(1)).mean()
               for o in outs for t in (t_a, t_b)) / 4
    assert out.loss.item() == pytest.approx((seg + (low + high) / 2).item(), abs=1e-5)
    assert out.logs["loss_low"].item() == pytest.approx(low.item(), abs=1e-6)
    assert out.logs["loss_high"].item() == pytest.approx(high.item(), abs=1e-6)
    assert low.item() > 0 and high.item() > 0


def test_teacher_runs_in_train_mode_from_its_own_initialisation():
    """Two teacher passes on the same input differ (dropout active) in logits and both feature taps; the
    teacher starts from a different random initialisation than the student; the EMA is a fixed 0.99 over the
    whole state dict, applied after every step."""
    m, ctx = tiny_method(M3HL)
    teacher, student = ctx.modules["teacher"], ctx.modules["student"]
    assert teacher.module.training and teacher.alpha(0) == 0.99 and teacher.average_buffers
    assert not states_equal(teacher.module, student)
    u = torch.rand(2, 1, 16, 16)
    a, b = teacher_view(teacher, u), teacher_view(teacher, u)
    assert not torch.equal(a.logits, b.logits)
    assert not torch.equal(a.high, b.high) and not torch.equal(a.low, b.low)
    before = teacher.module.head.weight.clone()
    m.after_step(0)
    assert torch.allclose(teacher.module.head.weight, 0.99 * before + 0.01 * student.head.weight)
    assert m.eval_model() is student


def test_3d_binary_pseudo_labels_threshold_then_keep_the_largest_component():
    """LA: p̂ = [softmax foreground ≥ 0.5], then the largest 3D connected component per sample."""

    class Fixed(nn.Module):
        def forward(self, x, need_features=False):
            from ssmis.models.output import SegOutput
            fg = torch.zeros_like(x[:, 0])
            fg[:, 2:6, 2:6, 2:6] = 1.0                        # a 64-voxel blob …
            fg[:, 10:12, 10:12, 10:12] = 1.0                  # … and an 8-voxel one (removed)
            return SegOutput(torch.stack([torch.zeros_like(fg), fg * 2 - 1], 1), aux={"high": x, "low": x})

    tv = teacher_view(Fixed(), torch.zeros(2, 1, 16, 16, 16))
    assert tv.label.shape == (2, 16, 16, 16) and tv.label.sum().item() == 2 * 64
    assert (tv.label[:, 2:6, 2:6, 2:6] == 1).all()


# ---- configs, exact resume ------------------------------------------------------------------------------

def test_method_config_spells_out_the_defaults():
    cfg = load_config(ROOT / "configs" / "methods" / "m3hl.yaml")
    assert cfg.method == M3HL.Config().model_dump()
    assert cfg.train.augment == "auto" and M3HL.default_augment == "bcp" and cfg.data.patch_size == [128, 128]
    assert M3HL.stages == ("train",)                                       # one stage, no pre-training


SMALL = ["data.phantom.size=32", "data.patch_size=[32,32]", "data.phantom.patients=8", "split.labeled=2",
         "split.val=1", "split.test=2", "model.widths=[4,8,16,32,64]", "train.amp='off'", "train.threads=1",
         "train.device=cpu", "train.deterministic=true", "train.log_every=1", "train.eval_every=0",
         "method.name=m3hl", "train.iterations=6", "train.ckpt_every=2"]


def test_exact_resume(tmp_path):
    """6 steps straight == 4 steps + resume: bitwise-equal student, EMA teacher and optimiser state, identical
    training rows (the block masks and teacher dropout come from the checkpointed torch RNG)."""
    straight, out = tmp_path / "straight", tmp_path / "resumed"
    train(load_config("phantom", SMALL), out=straight, progress=False, test_at_end=False)
    train(load_config("phantom", SMALL), out=out, progress=False, stop_after=4, test_at_end=False)
    assert load_checkpoint(out / "checkpoints" / "last.pt")["step"] == 4
    train(load_config("phantom", SMALL), out=out, resume=True, progress=False, test_at_end=False)
    a, b = load_checkpoint(straight / "checkpoints" / "last.pt"), load_checkpoint(out / "checkpoints" / "last.pt")
    assert a["step"] == b["step"] == 6 and set(a["modules"]) == {"student", "teacher"}
    assert_same(a["modules"], b["modules"], "modules")
    assert_same(a["optimizer"], b["optimizer"], "optimizer")

    def rows(run):
        with open(run / "metrics.csv") as f:
            return [r for r in csv.DictReader(f) if r["split"] == "train"]
    assert rows(straight) == rows(out) and {"loss_low", "loss_high"} <= {r["name"] for r in rows(out)}


# ---- 3D on the sphere phantom -----------------------------------------------------------------------------

SPHERE = ["data.layout=sphere", "data.patch_size=[16,16,16]", "model.name=vnet", "model.widths=[4,8,16,32,64]",
          "train.labeled_bs=4", "train.unlabeled_bs=4", "train.threads=1", "train.eval_every=0",
          "data.fg_fraction=0.5", "method.name=m3hl"]


def test_3d_smoke_on_the_sphere_phantom(tmp_path):
    """VNet, LA layout, binary threshold pseudo-labels: a short run trains with finite losses and is tested."""
    cfg = load_config("phantom", SPHERE + ["train.iterations=20", "train.log_every=1", "seed=0"])
    r = train(cfg, out=tmp_path / "r", progress=False)
    assert 0.0 <= r["test_last"]["mean"]["dice"] <= 1.0
    with open(tmp_path / "r" / "metrics.csv") as f:
        losses = [float(row["value"]) for row in csv.DictReader(f) if row["name"] == "loss"]
    assert len(losses) == 20 and all(v == v and v < 1e3 for v in losses)


@pytest.mark.slow
def test_3d_learns_on_the_sphere_phantom(tmp_path):
    # 300 steps, 4 + 4, VNet n_filters 4, patch 16^3, measured (1 thread, torch 2.13 CPU, 22 s each): seeds 0 / 1 / 2
    # 0.872 / 0.465 / 0.893 (labels-only 0.829 / 0.843 / 0.848, BCP 0.874 / 0.928 / 0.899, test_3d.py). Seed 1 with
    # the feature terms off (method.feature_weight=0) reaches 0.919: on this 1-voxel bottleneck, with the teacher's
    # and the student's independent Dropout3d on it, L_high stays near 0.7 and can pull the student off. The test
    # runs seed 0 and asserts the floor of methods.md (0.5).
    cfg = load_config("phantom", SPHERE + ["train.iterations=300", "seed=0"])
    assert train(cfg, out=tmp_path / "r", progress=False)["test_last"]["mean"]["dice"] >= 0.5


# ---- 4: learns on a tiny phantom ---------------------------------------------------------------------------

# "Learns" setting of test_bcp_abd.py (32×32 phantom, 8 patients: 2 labelled, 3 unlabelled, 1 val, 2 test; width-8
# UNet; 300 single-stage steps; batch 4 + 4; SGD 0.01 poly; fp32, 1 thread). Measured mean foreground test Dice
# (last checkpoint, torch 2.13 CPU, 10-20 s each), seeds 0 / 1 / 2 (3 / 4):
#   supervised                      0.711 / 0.757 / 0.540   mean 0.669   (0.766 / 0.601)
#   bcp                             0.863 / 0.835 / 0.578   mean 0.759   (0.660 / 0.527)
#   m3hl                            0.788 / 0.827 / 0.443   mean 0.686   (0.513 / 0.529)
#   m3hl, feature_weight 0          0.808 / 0.803 / 0.636   mean 0.749   (0.528 / 0.602)
#   m3hl, teacher = student at t=0  0.810 / 0.774 / 0.788   mean 0.791   (0.728 / 0.550)   [not the method: probe]
# The 3-seed mean of m3hl misses D_sup + 0.02 by 0.003: with no pre-training, the teacher starts from its own random
# initialisation (as the ACDC code), and at 300 steps with EMA 0.99 its pseudo-labels are poor for the first ~150 steps
# (0.99^150 ≈ 0.22 of the random weights left); the last probe shows this is the main cost here. The test runs seed 0
# and asserts the floor of methods.md (0.5) and D_sup + 0.02 against labels-only trained in the test with the same
# settings on the same machine: fp32 kernels differ between CPUs, and on an Intel Xeon with AMX (2026-12-05) seed 0
# gave supervised 0.667 / m3hl 0.720 (seeds 1, 2: 0.728 / 0.817, 0.654 / 0.564) where the AMD EPYC above gave
# 0.711 / 0.788, so a recorded supervised value from one CPU is no bound on another.
MEASURED_SEED0 = 0.788
MIN_DICE = 0.5


def test_learns_on_the_phantom(tmp_path):
    def test_dice(method: str) -> float:
        cfg = load_config("phantom", ["data.phantom.size=32", "data.patch_size=[32,32]", "data.phantom.patients=8",
                                      "split.labeled=2", "split.val=1", "split.test=2", "model.widths=[8,16,32,64,128]",
                                      "train.iterations=300", "train.amp='off'", "train.eval_every=0",
                                      "train.threads=1", "train.device=cpu", f"method.name={method}", "seed=0"])
        return train(cfg, out=tmp_path / method, progress=False)["test_last"]["mean"]["dice"]

    dice, sup = test_dice("m3hl"), test_dice("supervised")
    assert dice >= MIN_DICE, f"m3hl: test Dice {dice:.3f} (measured {MEASURED_SEED0})"
    assert dice >= sup + 0.02, f"m3hl: test Dice {dice:.3f} not above supervised {sup:.3f} + 0.02 (this machine)"
