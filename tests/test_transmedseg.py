"""TransMedSeg behaviour (methods.md "TransMedSeg", Test it by): the closed-form TSA bound against Monte Carlo and
its reductions, the efficient M/Q form against the per-pixel formula, the exact 3×3 classifier inputs, the class
statistics (detached, SPD with the ridge, EMA 0.99, per-class subsampling, process-sum algebra), the BCP host with
L_tsa added in self-training only, exact resume of the memory, identical memory on two DDP processes, and "learns on
a tiny phantom"."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from conftest import assert_same, random_batches, small_config, small_overrides, straight_and_resumed, tiny_method
from ssmis.config import load_config
from ssmis.losses.tsa import (ClassMemory, TSAMemory, augmented_logits, check_head, class_sums, classifier_matrix,
                              head_inputs, tsa_loss, tsa_terms)
from ssmis.methods.bcp import BCP
from ssmis.methods.transmedseg import FeatureTap, TransMedSeg, classifier_conv
from ssmis.models.unet import UNet2D
from ssmis.models.vnet import VNet

ROOT = Path(__file__).resolve().parent.parent


def random_problem(c=4, a=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(c, a, generator=g, dtype=torch.float64)
    b = torch.randn(c, generator=g, dtype=torch.float64)
    shift = torch.randn(c, a, generator=g, dtype=torch.float64)
    r = torch.randn(c, a, a, generator=g, dtype=torch.float64)
    cov = r @ r.transpose(1, 2) / a + 0.1 * torch.eye(a, dtype=torch.float64)      # SPD per class
    return w, b, shift, cov, g


# ---- 1: closed-form bound vs Monte Carlo ----------------------------------------------------------------------

@pytest.mark.parametrize("y", [0, 2])
def test_closed_form_bound_is_above_monte_carlo(y):
    """C = 4, A = 8, λ = 0.5: CE(z̃, y) ≥ the mean CE over 10⁵ samples ã ~ N(a + λΔμ_y, λΣ_y) minus 3 standard
    errors (Jensen + the Gaussian moment-generating function)."""
    w, b, shift, cov, g = random_problem()
    a = torch.randn(8, generator=g, dtype=torch.float64)
    lam = 0.5
    m, q = tsa_terms(w, shift, cov)
    z = (w @ a + b).float()[None]
    label = torch.tensor([y])
    bound = F.cross_entropy(augmented_logits(z, label, m, q, lam), label).item()
    torch.manual_seed(1)
    dist = torch.distributions.MultivariateNormal(a + lam * shift[y], covariance_matrix=lam * cov[y])
    samples = dist.sample((100_000,))
    ce = F.cross_entropy(samples @ w.T + b, torch.full((100_000,), y), reduction="none")
    mc, se = ce.mean().item(), ce.std().item() / 100_000 ** 0.5
    assert bound >= mc - 3 * se


def test_zero_covariance_is_the_ce_at_the_shifted_feature():
    """Σ = 0: the closed form is exactly CE(W(a + λΔμ_y) + b, y) (per pixel, every label)."""
    w, b, shift, _, g = random_problem()
    a = torch.randn(16, 8, generator=g, dtype=torch.float64)
    y = torch.arange(16) % 4
    lam = 0.5
    m, q = tsa_terms(w, shift, torch.zeros(4, 8, 8))
    assert torch.equal(q, torch.zeros(4, 4))
    z = (a @ w.T + b).float()
    closed = F.cross_entropy(augmented_logits(z, y, m, q, lam), y, reduction="none")
    shifted = F.cross_entropy(((a + lam * shift[y]) @ w.T + b).float(), y, reduction="none")
    assert torch.allclose(closed, shifted, atol=1e-5, rtol=0)
    assert torch.allclose(tsa_loss(z, y, w.float(), shift.float(), None, lam), shifted.mean(), atol=1e-5)


# ---- 2: reductions and the efficient form ---------------------------------------------------------------------

def test_lambda_zero_is_plain_ce_and_the_label_logit_is_unchanged():
    w, b, shift, cov, g = random_problem()
    z = torch.randn(2, 4, 8, 8, generator=g)
    y = torch.randint(0, 4, (2, 8, 8), generator=g)
    assert torch.equal(tsa_loss(z, y, w.float(), shift, cov, 0.0), F.cross_entropy(z, y))
    sel = torch.rand(2, 8, 8, generator=g) < 0.5
    plain = F.cross_entropy(z, y, reduction="none")
    assert torch.allclose(tsa_loss(z, y, w.float(), shift, cov, 0.0, select=sel), plain[sel].mean(), atol=1e-7)
    m, q = tsa_terms(w, shift, cov)
    assert torch.equal(m.diagonal(), torch.zeros(4)) and torch.equal(q.diagonal(), torch.zeros(4))
    zt = augmented_logits(z, y, m, q, 0.7)
    assert torch.equal(zt.gather(1, y[:, None]), z.gather(1, y[:, None]))
    assert (q >= -1e-6).all()                                        # Σ SPD -> the quadratic term is ≥ 0


def test_efficient_form_equals_the_per_pixel_formula():
    """On a 2×4×8×8 feature map with a 1×1 classifier (C = 3): z̃ from M[y, :], Q[y, :] equals, pixel by pixel,
    z_c + λ(w_c − w_y)ᵀΔμ_y + (λ/2)(w_c − w_y)ᵀΣ_y(w_c − w_y) (allclose 1e-6)."""
    g = torch.Generator().manual_seed(3)
    feat = torch.randn(2, 4, 8, 8, generator=g)
    conv = nn.Conv2d(4, 3, 1)
    y = torch.randint(0, 3, (2, 8, 8), generator=g)
    shift = torch.randn(3, 4, generator=g)
    r = torch.randn(3, 4, 4, generator=g)
    cov = r @ r.transpose(1, 2)
    lam = 0.3
    z = conv(feat)
    w = classifier_matrix(conv)
    m, q = tsa_terms(w, shift, cov)
    fast = augmented_logits(z, y, m, q, lam)
    slow = torch.empty_like(z)
    for n in range(2):
        for i in range(8):
            for j in range(8):
                k = int(y[n, i, j])
                d = w - w[k]                                                     # rows c: w_c − w_y
                slow[n, :, i, j] = z[n, :, i, j] + lam * d @ shift[k] + lam / 2 * ((d @ cov[k]) * d).sum(1)
    assert torch.allclose(fast, slow, atol=1e-6, rtol=0)


def test_gradient_reaches_w_through_both_terms_and_not_the_statistics():
    """The extra terms give W a gradient of their own (z held fixed); Δμ and Σ get none."""
    w, _, shift, cov, g = random_problem()
    w = w.float().requires_grad_(True)
    shift, cov = shift.float().requires_grad_(True), cov.float().requires_grad_(True)
    z = torch.randn(6, 4, generator=g)
    y = torch.tensor([0, 1, 2, 3, 0, 1])
    tsa_loss(z, y, w, shift, cov, 0.5).backward()
    assert w.grad is not None and w.grad.abs().sum() > 0
    assert shift.grad is None and cov.grad is None


def test_unfolded_neighbourhood_is_the_exact_classifier_input():
    """UNet-2D's 3×3 head (a_i = 9·16 = 144 values) and VNet's 1×1×1 head: W a_i + b reproduces the head output at
    every pixel, borders (zero padding) included."""
    torch.manual_seed(0)
    unet = UNet2D(1, 4)
    feat = torch.randn(2, 16, 12, 10)
    conv = classifier_conv(unet)
    a = head_inputs(feat, conv.kernel_size, torch.arange(2 * 12 * 10))
    assert a.shape == (240, 144) and classifier_matrix(conv).shape == (4, 144)
    ref = conv(feat).movedim(1, -1).reshape(-1, 4)
    assert torch.allclose(a @ classifier_matrix(conv).T + conv.bias, ref, atol=1e-5)
    vnet = VNet(1, 2, widths=(4, 8, 16, 32, 64))
    conv3 = classifier_conv(vnet)
    feat3 = torch.randn(1, 4, 4, 6, 6)
    a3 = head_inputs(feat3, conv3.kernel_size, torch.arange(144))
    assert torch.equal(a3, feat3.movedim(1, -1).reshape(-1, 4))
    with pytest.raises(ValueError, match="same"):
        check_head(nn.Conv2d(16, 4, 3))                                 # no padding: not a 'same' conv


def test_last_feature_tap_feeds_the_head():
    """`last` is the input of UNet-2D's output conv: head(aux['last']) = the logits."""
    net = UNet2D(1, 4, widths=(4, 8, 16, 32, 64)).eval()
    tap = FeatureTap(net)
    out = tap(torch.rand(2, 1, 16, 16))
    assert len(tap.features) == 1 and torch.equal(net.head(tap.features[0]), out.logits)


# ---- 3: statistics ---------------------------------------------------------------------------------------------

def test_statistics_are_detached_and_spd_with_two_pixels():
    """Features with gradients give detached sums; a class with only 2 pixels (rank-1 covariance) is symmetric
    positive definite after Σ + 1e-4·I; the memory's buffers never require gradients."""
    feat = torch.randn(1, 6, 4, 4, requires_grad=True)
    labels = torch.zeros(1, 4, 4, dtype=torch.long)
    labels[0, 0, :2] = 1                                                # class 1: two pixels
    sums = class_sums(feat, labels, 3, kernel=(3, 3))
    assert all(not v.requires_grad for v in sums.values())
    assert sums["count"].tolist() == [14, 2, 0]
    mem = ClassMemory(3, 54)
    mem.update(sums)
    assert mem.seen.tolist() == [True, True, False]
    assert torch.linalg.matrix_rank(mem.cov[1].double(), atol=1e-6, hermitian=True) == 1
    s = mem.covariance(1e-4)[1].double()
    assert torch.equal(s, s.T) and torch.linalg.eigvalsh(s).min() > 0
    torch.linalg.cholesky(s)
    assert not any(b.requires_grad for b in mem.buffers())


def test_ema_update_follows_momentum_099():
    """First observation = the batch statistics; then μ ← 0.99μ + 0.01x̄ and Σ = the covariance of the 0.99/0.01
    mixture of the two batches (EMA of the first and second moments); absent classes keep theirs."""
    g = torch.Generator().manual_seed(0)
    x1, x2 = torch.randn(50, 3, generator=g) + 2, torch.randn(30, 3, generator=g) * 2 - 1

    def sums(x, cls):
        feat = x.T.reshape(1, 3, 1, -1)
        return class_sums(feat, torch.full((1, 1, x.shape[0]), cls), 2, kernel=(1, 1))

    mem = ClassMemory(2, 3, momentum=0.99)
    mem.update(sums(x1.double(), 0))
    c1 = torch.cov(x1.T.double(), correction=0)
    assert torch.allclose(mem.mean[0].double(), x1.double().mean(0), atol=1e-6)
    assert torch.allclose(mem.cov[0].double(), c1, atol=1e-5)
    assert mem.seen.tolist() == [True, False] and torch.equal(mem.mean[1], torch.zeros(3))
    mem.update(sums(x2.double(), 0))
    m1, m2 = x1.double().mean(0), x2.double().mean(0)
    assert torch.allclose(mem.mean[0].double(), 0.99 * m1 + 0.01 * m2, atol=1e-6)
    second = 0.99 * (c1 + torch.outer(m1, m1)) + 0.01 * (x2.double().T @ x2.double() / 30)
    mu = 0.99 * m1 + 0.01 * m2
    assert torch.allclose(mem.cov[0].double(), second - torch.outer(mu, mu), atol=1e-5)
    before = mem.mean.clone(), mem.cov.clone()
    mem.update(sums(x1.double(), 1))                                     # class 0 absent: unchanged
    assert torch.equal(mem.mean[0], before[0][0]) and torch.equal(mem.cov[0], before[1][0])


def test_per_class_subsampling_and_selection():
    """At most max_pixels per class (uniform without replacement), only selected pixels, 0 for absent classes."""
    torch.manual_seed(0)
    feat = torch.arange(64.0).reshape(1, 1, 8, 8)
    labels = torch.zeros(1, 8, 8, dtype=torch.long)
    labels[0, 4:] = 1
    select = torch.ones(1, 8, 8, dtype=torch.bool)
    select[0, :, 0] = False                                              # column 0 never enters
    s = class_sums(feat, labels, 3, max_pixels=10, select=select, kernel=(1, 1))
    assert s["count"].tolist() == [10, 10, 0]
    assert s["outer"].shape == (3, 1, 1) and torch.equal(s["sum"][2], torch.zeros(1, dtype=torch.float64))
    full = class_sums(feat, labels, 3, select=select, kernel=(1, 1))
    assert full["count"].tolist() == [28, 28, 0]
    allowed = feat[0, 0][select[0]]
    assert full["sum"][0].item() == allowed[:28].sum().item()            # rows 0-3 without column 0


def test_summed_statistics_of_two_processes_equal_one_process_on_both():
    """What DDP all-reduces: the per-class sums of two halves add up to the sums of the whole batch, so the memory
    update from the reduced sums is the one-process update on all pixels."""
    torch.manual_seed(0)
    feat, labels = torch.randn(4, 3, 6, 6), torch.randint(0, 3, (4, 6, 6))
    halves = [class_sums(feat[i:i + 2], labels[i:i + 2], 3, kernel=(3, 3)) for i in (0, 2)]
    whole = class_sums(feat, labels, 3, kernel=(3, 3))
    for k in whole:
        assert torch.allclose(halves[0][k] + halves[1][k], whole[k], atol=1e-9)


def test_memory_shift_direction_and_unseen_classes():
    """s2t: shift μ_t − μ_s with Σ_t; t2s: μ_s − μ_t with Σ_s; classes unseen in either domain: zero rows."""
    mem = TSAMemory(3, 2, cov_domain="target")
    feat = torch.tensor([[1.0, 3.0], [2.0, 5.0]]).reshape(1, 2, 1, 2)
    mem.source.update(class_sums(feat, torch.tensor([[[0, 1]]]), 3, covariance=False))
    mem.target.update(class_sums(feat * 2, torch.tensor([[[0, 2]]]), 3))
    shift, cov = mem.augmentation("target", 1e-4)
    assert torch.allclose(shift[0], torch.tensor([1.0, 2.0])) and torch.equal(shift[1:], torch.zeros(2, 2))
    assert torch.allclose(cov[0], 1e-4 * torch.eye(2)) and torch.equal(cov[1:], torch.zeros(2, 2, 2))
    assert mem.source.cov.numel() == 0
    rev = TSAMemory(3, 2, cov_domain="source")
    rev.source.update(class_sums(feat, torch.tensor([[[0, 1]]]), 3))
    rev.target.update(class_sums(feat * 2, torch.tensor([[[0, 2]]]), 3, covariance=False))
    assert torch.allclose(rev.augmentation("source")[0][0], torch.tensor([-1.0, -2.0]))


# ---- the BCP host ---------------------------------------------------------------------------------------------

def selftraining(cls, **cfg):
    m, ctx = tiny_method(cls, total=40, **cfg)
    m.on_stage_start("selftrain", False)
    return m, ctx


@pytest.mark.parametrize("direction", ["s2t", "t2s"])
def test_loss_is_bcp_plus_beta_tsa_on_the_same_draws(direction):
    """Same weights and seed: TransMedSeg's loss = BCP's self-training loss + β·L_tsa (β = 1 and 0); the memory is
    filled from this step (labelled and teacher pixels) and λ = λ0·t/T over the self-training steps (30 here)."""
    lb, ub = random_batches(4, 4, 16, 4)
    bcp, _ = selftraining(BCP)
    torch.manual_seed(7)
    ref = bcp.train_step(lb, ub, 25).loss
    for beta in (1.0, 0.0):
        m, _ = selftraining(TransMedSeg, beta=beta, tsa_direction=direction)
        torch.manual_seed(7)
        out = m.train_step(lb, ub, 25)
        assert torch.allclose(out.loss, ref + beta * out.logs["tsa"], atol=1e-6)
        assert out.logs["tsa_lambda"] == pytest.approx(0.25 * 15 / 30)
        assert m.memory.source.seen.all() and m.memory.target.seen.any()
        assert out.logs["tsa"] > 0
    assert m.tsa_lambda(10) == 0.0 and m.tsa_lambda(39) == pytest.approx(0.25 * 29 / 30)


def test_pretraining_is_bcps_without_tsa():
    lb, ub = random_batches(4, 4, 16, 4)
    bcp, _ = tiny_method(BCP, total=40)
    m, _ = tiny_method(TransMedSeg, total=40)
    torch.manual_seed(2)
    a = bcp.train_step(lb, ub, 0)
    torch.manual_seed(2)
    b = m.train_step(lb, ub, 0)
    assert torch.equal(a.loss, b.loss) and "tsa" not in b.logs
    assert not m.memory.source.seen.any() and not m.memory.target.seen.any()


def test_tsa_changes_the_head_gradient():
    """β = 1 vs β = 0 on the same draws (memory filled by one earlier step, λ ≈ λ0): L_tsa adds to the gradient of
    the student's 3×3 output conv."""
    lb, ub = random_batches(4, 4, 16, 4)
    grads = []
    for beta in (1.0, 0.0):
        m, ctx = selftraining(TransMedSeg, beta=beta)
        torch.manual_seed(4)
        m.train_step(lb, ub, 38)
        m.train_step(lb, ub, 39).loss.backward()
        grads.append(ctx.modules["student"].head.weight.grad.clone())
    assert grads[0].abs().sum() > 0 and not torch.allclose(grads[0], grads[1])


@pytest.mark.parametrize("net", ["vnet", "unet3d"])
def test_3d_hosts_use_their_own_head_form(net):
    """3D on the BCP host: VNet's 1×1×1 head reads the `last` feature itself (A = 4), UNet-3D's 3×3×3 head its
    27-voxel neighbourhood (4·27 = 108); one self-training step gives a finite loss and fills both memories."""
    from ssmis.methods.base import Batch
    from ssmis.models.unet3d import UNet3D

    make = (lambda: VNet(1, 2, widths=(4, 8, 16, 32, 64))) if net == "vnet" else \
        (lambda: UNet3D(1, 2, widths=(4, 8, 16, 32, 64)))
    m, ctx = tiny_method(TransMedSeg, total=40, num_classes=2, spatial_dims=3, make_model=make)
    m.on_stage_start("selftrain", False)
    g = torch.Generator().manual_seed(0)
    shape = (16, 32, 32)                                              # bottleneck 1×2×2 (instance norm in UNet-3D)
    lb = Batch(torch.rand(4, 1, *shape, generator=g), (torch.rand(4, *shape, generator=g) > 0.5).long())
    ub = Batch(torch.rand(4, 1, *shape, generator=g))
    out = m.train_step(lb, ub, 30)
    assert torch.isfinite(out.loss) and m.memory.source.seen.all() and m.memory.target.seen.any()
    assert m.memory.target.mean.shape == (2, 4 if net == "vnet" else 108)


def test_memory_is_a_non_trainable_module_sized_for_the_head():
    m, ctx = tiny_method(TransMedSeg)
    assert "tsa_memory" in ctx.modules and "tsa_memory" not in ctx.trainable
    mem = ctx.modules["tsa_memory"]
    assert mem.target.mean.shape == (4, 4 * 9) and mem.target.cov.shape == (4, 36, 36)     # widths[0] 4 × 3×3
    assert TransMedSeg.provides == {}


def test_method_config_spells_out_the_defaults():
    cfg = load_config(ROOT / "configs" / "methods" / "transmedseg.yaml")
    assert cfg.method == TransMedSeg.Config().model_dump()
    d = TransMedSeg.Config()
    assert (d.beta, d.lambda0, d.tsa_direction, d.stats_momentum, d.max_pixels, d.ridge) == \
        (1.0, 0.25, "s2t", 0.99, 4096, 1e-4)
    assert cfg.train.augment == "auto" and TransMedSeg.default_augment == "bcp" and cfg.data.patch_size == [128, 128]
    assert cfg.data.layout == "ssl4mis_h5" and cfg.train.iterations == 2000                  # ACDC-lite


# ---- exact resume ------------------------------------------------------------------------------------------------

def tiny_run(steps: int, *extra: str) -> list[str]:
    """The conftest phantom run (2 labelled patients, width-4 UNet) of `steps` steps, self-training from 25 %."""
    return small_overrides("transmedseg", steps, "split.labeled=2", "train.log_every=1", "train.eval_every=0", *extra)


def test_exact_resume_of_the_memory(tmp_path):
    """8 steps (self-training from step 2) straight == 4 + resume: bitwise-equal student, teacher, optimiser and
    class memory (the per-class pixel subsampling draws from the checkpointed torch RNG), identical rows."""
    cfg = load_config("phantom", tiny_run(8, "train.deterministic=true", "train.ckpt_every=2"))
    a, b, mid = straight_and_resumed(cfg, tmp_path, 4)
    assert mid["step"] == 4 and mid["modules"]["tsa_memory"]["source.seen"].all()
    assert a["step"] == b["step"] == 8 and set(a["modules"]) == {"student", "teacher", "tsa_memory"}
    assert_same(a["modules"], b["modules"], "modules")
    assert_same(a["optimizer"], b["optimizer"], "optimizer")
    assert not torch.equal(a["modules"]["tsa_memory"]["target.mean"], mid["modules"]["tsa_memory"]["target.mean"])

    def rows(run):
        with open(run / "metrics.csv") as f:
            return [r for r in csv.DictReader(f) if r["split"] == "train"]
    assert rows(tmp_path / "straight") == rows(tmp_path / "resumed")
    assert "tsa" in {r["name"] for r in rows(tmp_path / "resumed")}


# ---- DDP ---------------------------------------------------------------------------------------------------------

def _ddp_worker(rank: int, world: int, store: str, tmp: str) -> None:
    import os

    import torch.distributed as tdist

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    tdist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    from ssmis.engine import dist
    from ssmis.engine.run import setup

    torch.set_num_threads(1)
    cfg = load_config("phantom", tiny_run(5))
    trainer = setup(cfg, None, log=lambda m: None, dinfo=dist.init("cpu"))
    mem, seen = trainer.ctx.modules["tsa_memory"], []
    after_step = trainer.method.after_step
    trainer.method.after_step = lambda step: (after_step(step), seen.append(
        torch.cat([mem.source.mean.flatten(), mem.target.mean.flatten(), mem.target.cov.flatten()])))
    trainer.fit(progress=False)
    torch.save({"memory": torch.stack(seen), "student": trainer.ctx.modules["student"].head.weight.detach()},
               f"{tmp}/rank{rank}.pt")
    dist.shutdown()
    os._exit(0)


@pytest.mark.timeout(240)
def test_memory_is_identical_on_two_processes(tmp_path):
    """2 gloo processes, each with its own half batch (its own images, dropout and subsampling draws): after every
    step both hold the same memory (the per-class sums are all-reduced before the update), not merely after the
    buffer averaging at checkpoints."""
    mp.start_processes(_ddp_worker, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2,
                       start_method="spawn", join=True)
    a, b = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    assert a["memory"].shape[0] == 5 and a["memory"][-1].abs().sum() > 0
    assert torch.equal(a["memory"], b["memory"])
    assert torch.equal(a["student"], b["student"])


# ---- 4: learns on a tiny phantom -----------------------------------------------------------------------------------

# "Learns" setting of test_bcp_abd.py (32×32 phantom, 8 patients: 2 labelled, 3 unlabelled, 1 val, 2 test; width-8
# UNet, head input 8·9 = 72 values; 300 steps split 75 + 225; batch 4 + 4; SGD 0.01 poly; fp32, 1 thread).
# Measured mean foreground test Dice (last checkpoint, torch 2.13 CPU), seeds 0 / 1 / 2:
#   supervised         0.711 / 0.757 / 0.540   mean 0.669   (test_learning.py)
#   bcp                0.862 / 0.834 / 0.595   mean 0.764   (re-measured with this file; test_bcp_abd.py: 0.759)
#   transmedseg        0.889 / 0.876 / 0.663   mean 0.809   (10-23 s each on the shared 2-core machine)
# The test runs seed 0 and asserts the floor of methods.md (0.5) and D_sup + 0.02 against the recorded seed-0
# supervised value.
D_SUP_SEED0 = 0.711
MEASURED_SEED0 = 0.889
MIN_DICE = 0.5


@pytest.mark.slow
def test_learns_on_the_phantom(tmp_path):
    from ssmis.engine.run import train

    cfg = small_config("transmedseg", 300, "split.labeled=2", "model.widths=[8,16,32,64,128]", "train.eval_every=0",
                       "seed=0")
    dice = train(cfg, out=tmp_path / "tms", progress=False)["test_last"]["mean"]["dice"]
    assert dice >= MIN_DICE, f"transmedseg: test Dice {dice:.3f} (measured {MEASURED_SEED0})"
    assert dice >= D_SUP_SEED0 + 0.02, f"transmedseg: test Dice {dice:.3f} not above supervised {D_SUP_SEED0} + 0.02"
