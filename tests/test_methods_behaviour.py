"""Mean Teacher and UA-MT behaviour ("Test it by" 1-3 of methods.md): EMA numerics, consistency value and
gate, teacher noise, UA-MT uncertainty mask, masked consistency and stochastic teacher passes."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from conftest import random_batches, small_config, tiny_method
from ssmis.engine.ema import EMA
from ssmis.losses.seg import ce_dice_loss
from ssmis.methods import ua_mt
from ssmis.methods.base import Batch, teacher_noise
from ssmis.methods.mean_teacher import MeanTeacher, consistency_weight
from ssmis.methods.ua_mt import UAMT, masked_consistency, threshold, uncertainty
from ssmis.models.output import SegOutput
from ssmis.models.unet import UNet2D

make_method = tiny_method
batches = random_batches


# ---- Mean Teacher 1: EMA ---------------------------------------------------------------------------

def test_ema_numerics_at_steps_0_1_200():
    m, ctx = make_method(MeanTeacher)
    student, teacher = ctx.modules["student"], ctx.modules["teacher"]
    opt = torch.optim.SGD(student.parameters(), lr=0.1, momentum=0.9)
    lb, ub = batches()
    for t, alpha in ((0, 0.0), (1, 0.5), (200, 0.99)):
        assert teacher.alpha(t) == alpha
        out = m.train_step(lb, ub, t)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        prev = [p.detach().clone() for p in teacher.parameters()]
        m.after_step(t)
        for p_t, p_prev, p_s in zip(teacher.parameters(), prev, student.parameters()):
            expected = alpha * p_prev.double() + (1 - alpha) * p_s.detach().double()
            assert torch.allclose(p_t.double(), expected, rtol=0, atol=1e-7)
            if t == 0:
                assert torch.equal(p_t, p_s)          # α_0 = 0: the teacher becomes the student
        if t > 0:                                     # and genuinely mixes afterwards
            assert any(not torch.equal(p_t, p_s) for p_t, p_s in zip(teacher.parameters(), student.parameters()))


def test_ema_keeps_teacher_bn_statistics():
    """Parameters only: the teacher's BN running statistics are its own, not copied or averaged."""
    m, ctx = make_method(MeanTeacher)
    student, teacher = ctx.modules["student"], ctx.modules["teacher"]
    bn_t = [b for b in teacher.modules() if isinstance(b, nn.BatchNorm2d)]
    bn_s = [b for b in student.modules() if isinstance(b, nn.BatchNorm2d)]
    before = [(b.running_mean.clone(), b.running_var.clone(), b.num_batches_tracked.clone()) for b in bn_t]
    with torch.no_grad():
        student(torch.rand(4, 1, 16, 16) * 5 + 3)     # moves the student's statistics only
    m.after_step(0)                                   # α_0 = 0: a buffer copy would show up at once
    for b, (rm, rv, nb), bs in zip(bn_t, before, bn_s):
        assert torch.equal(b.running_mean, rm) and torch.equal(b.running_var, rv)
        assert torch.equal(b.num_batches_tracked, nb)
        assert not torch.equal(bs.running_mean, rm)
    # the teacher stays in train mode (batch-statistics BN, active dropout), as in the reference code
    assert teacher.training and all(mod.training for mod in teacher.modules())


def test_teacher_is_not_trained():
    """Teacher parameters: requires_grad False, absent from the trainer's optimiser, never get a gradient."""
    from ssmis.engine.run import setup

    trainer = setup(small_config("mean_teacher", 5), None, log=lambda m: None)
    teacher = trainer.ctx.modules["teacher"]
    student = trainer.ctx.modules["student"]
    assert trainer.ctx.trainable == ["student"]
    in_opt = {id(p) for g in trainer.opt.param_groups for p in g["params"]}
    assert all(id(p) not in in_opt for p in teacher.parameters())
    assert all(id(p) in in_opt for p in student.parameters())
    assert all(not p.requires_grad for p in teacher.parameters())
    lb, ub = trainer._batches()
    out = trainer.method.train_step(lb, ub, 200)
    out.loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.grad is not None for p in student.parameters())
    # the teacher changes after after_step
    before = [p.clone() for p in teacher.parameters()]
    trainer.opt.step()
    trainer.method.after_step(200)
    assert any(not torch.equal(a, b) for a, b in zip(before, teacher.parameters()))


# ---- Mean Teacher 2: consistency value, ramp, gate -------------------------------------------------

class FixedLogits(nn.Module):
    """A stand-in network returning prescribed logits (a parameter, so gradients can be inspected)."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.z = nn.Parameter(logits.clone())
        self.inputs: list[torch.Tensor] = []

    def forward(self, x):
        self.inputs.append(x.detach().clone())
        assert x.shape[0] == self.z.shape[0]
        return SegOutput(self.z)


class ScriptedTeacher:
    """A mock teacher: records its inputs; returns `single` on a B-sized batch and, on 2B-sized batches,
    the stochastic passes in order (call k: passes 2k and 2k+1 stacked as [copy 0; copy 1])."""

    def __init__(self, single: torch.Tensor, passes: torch.Tensor | None = None):
        self.single, self.passes, self.inputs = single, passes, []

    def __call__(self, x):
        self.inputs.append(x.clone())
        b = self.single.shape[0]
        if x.shape[0] == b:
            return SegOutput(self.single.clone())
        assert x.shape[0] == 2 * b
        k = sum(1 for i in self.inputs if i.shape[0] == 2 * b) - 1
        return SegOutput(torch.cat([self.passes[2 * k], self.passes[2 * k + 1]]))


def test_mean_teacher_consistency_value_on_constructed_logits():
    g = torch.Generator().manual_seed(3)
    nl, nu, C = 2, 3, 4
    z = torch.randn(nl + nu, C, 3, 5, generator=g) * 2
    zt = torch.randn(nu, C, 3, 5, generator=g) * 2
    m, ctx = make_method(MeanTeacher, total=30000, spatial_dims=3)
    m.student = FixedLogits(z)
    m.teacher = ScriptedTeacher(zt)
    lb = Batch(torch.zeros(nl, 1, 3, 5), torch.randint(0, C, (nl, 3, 5), generator=g))
    ub = Batch(torch.zeros(nu, 1, 3, 5))
    out = m.train_step(lb, ub, 15000)
    diff = (z[nl:].softmax(1) - zt.softmax(1)) ** 2
    expected = diff.sum().item() / (nu * C * 3 * 5)          # mean over B·C·H·W
    assert float(out.logs["cons"]) == pytest.approx(expected, rel=1e-5)
    assert out.logs["w"] == pytest.approx(0.02865, abs=5e-6)
    sup = ce_dice_loss(z[:nl], lb.label)
    assert out.loss.item() == pytest.approx(sup.item() + out.logs["w"] * expected, rel=1e-6)
    # the teacher sees a noisy copy of the unlabelled images (nothing else)
    (t_in,) = m.teacher.inputs
    assert t_in.shape == ub.image.shape and 0 < (t_in - ub.image).abs().max() <= 0.2 + 1e-7


@pytest.mark.parametrize("step,gated", [(9, True), (10, False)])
def test_mean_teacher_2d_gate_blocks_the_unlabelled_gradient(step, gated):
    """T = 300 in 2D: gate at ceil(300/30) = 10. Before it the loss has exactly zero gradient through the
    student's unlabelled logits; at the gate it has a non-zero one."""
    m, ctx = make_method(MeanTeacher, total=300, spatial_dims=2)
    student = ctx.modules["student"]
    captured = []

    def keep(mod, inp, out):
        out.retain_grad()
        captured.append(out)

    student.head.register_forward_hook(keep)
    lb, ub = batches(nl=2, nu=2)
    ctx.modules["teacher"].update(student, 0)        # teacher = student
    with torch.no_grad():                            # make the teacher differ, so the consistency is non-zero
        for p in ctx.modules["teacher"].parameters():
            p.add_(0.05 * torch.randn_like(p))
    out = m.train_step(lb, ub, step)
    out.loss.backward()
    (logits,) = captured
    assert float(out.logs["cons"]) > 0
    g_u, g_l = logits.grad[2:], logits.grad[:2]
    assert g_l.abs().sum() > 0
    if gated:
        assert out.logs["w"] == 0.0
        assert torch.count_nonzero(g_u) == 0
    else:
        assert out.logs["w"] == consistency_weight(m.cfg, step, 300, 2) > 0
        assert torch.count_nonzero(g_u) > 0.9 * g_u.numel()


# ---- Mean Teacher 3: teacher noise -----------------------------------------------------------------

def test_teacher_noise_bounds_and_clipped_mass():
    torch.manual_seed(0)
    x = torch.rand(1000, 1000)
    noisy = teacher_noise(x)
    eps = noisy - x
    assert eps.abs().max().item() <= 0.2 + 1e-6
    zero = torch.zeros(10 ** 6)
    e = teacher_noise(zero)
    clipped = (e.abs() == torch.tensor(0.2)).float().mean().item()
    assert clipped == pytest.approx(math.erfc(2 / math.sqrt(2)), abs=1e-3)     # P(|N(0, 0.1²)| > 0.2) = 4.55 %
    assert e.std().item() == pytest.approx(0.0954, abs=0.002)                     # std of the clipped normal
    assert abs(e.mean().item()) < 1e-3
    # fresh noise on each call
    assert not torch.equal(teacher_noise(zero[:100]), teacher_noise(zero[:100]))


# ---- UA-MT 1: uncertainty mask -----------------------------------------------------------------------

def entropy_code(p1: float) -> float:
    """The code's entropy of a 2-class distribution (p1 = probability of class 1), eps 1e-6 inside the log."""
    return -sum(q * math.log(q + 1e-6) for q in (1 - p1, p1))


def p1_for_entropy(u: float) -> float:
    lo, hi = 1e-9, 0.5
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if entropy_code(mid) < u else (lo, mid)
    return (lo + hi) / 2


def logit(p1: float) -> list[float]:
    return [0.0, math.log(p1 / (1 - p1))]


def pass_maps(u2: float, u3: float) -> torch.Tensor:
    """8 passes × (1, 2, 1, 4): pixel 0 confident, pixel 1 u = 0.60, pixels 2/3 with mean-softmax entropy u2/u3.
    The first call's two passes are built to mislead: pixel 2 starts at p = 0.5 (entropy ln 2 > H) and
    pixel 3 at p = 0.01 (entropy ≈ 0.06 < H), so a mask from one pass or one call would differ."""
    q1, q2, q3 = p1_for_entropy(0.60), p1_for_entropy(u2), p1_for_entropy(u3)
    cols = [
        [1e-5] * 8,
        [q1 - 0.1, q1 + 0.1] * 4,
        [0.5, 0.5] + [(8 * q2 - 1.0) / 6] * 6,
        [0.01, 0.01] + [(8 * q3 - 0.02) / 6] * 6,
    ]
    for c in cols:
        assert all(0 < v < 1 for v in c)
    maps = torch.tensor([[logit(cols[px][k]) for px in range(4)] for k in range(8)], dtype=torch.float64)  # 8×4×2
    return maps.permute(0, 2, 1)[:, None, :, None, :].float()     # 8 × (1, 2, 1, 4)


def test_threshold_values():
    T = 1000
    h0 = threshold(0, T, 2, True)
    assert h0 == pytest.approx(0.52103, abs=1e-5)
    assert threshold(T, T, 2, True) == pytest.approx(math.log(2), abs=1e-12)
    # the ramp runs on the iteration, not on 150-iteration epochs
    assert threshold(1, T, 2, True) > h0
    # compat mode ignores C; the fixed mode uses ln C
    assert threshold(0, T, 4, True) == h0
    assert threshold(0, T, 4, False) == pytest.approx(0.52103 * 2, abs=2e-5)
    assert threshold(T, T, 4, False) == pytest.approx(math.log(4), abs=1e-12)


@pytest.mark.parametrize("where", ["start", "middle", "end"])
def test_uncertainty_mask_from_the_mean_of_8_softmaxes(where):
    T = 100
    t = {"start": 0, "middle": 76, "end": T}[where]
    h = threshold(t, T, 2, True)
    if where == "start":
        assert h == pytest.approx(0.52103, abs=1e-5)
    if where == "middle":
        assert 0.62 < h < 0.68
    # the maps are built around H(t) (at the end around H(0), since no 2-class entropy exceeds ln 2)
    h_build = threshold(0, T, 2, True) if where == "end" else h
    maps = pass_maps(h_build - 0.01, h_build + 0.01)
    teacher = ScriptedTeacher(torch.zeros(1, 2, 1, 4), maps)
    x = torch.zeros(1, 1, 1, 4)
    u = uncertainty(teacher, x, passes=8)
    assert u.shape == (1, 1, 4)
    assert u[0, 0, 0].item() < 1e-3
    assert u[0, 0, 1].item() == pytest.approx(0.60, abs=1e-4)
    assert u[0, 0, 2].item() == pytest.approx(h_build - 0.01, abs=1e-4)
    assert u[0, 0, 3].item() == pytest.approx(h_build + 0.01, abs=1e-4)
    mask = (u < h).int().flatten().tolist()
    expected = {"start": [1, 0, 1, 0], "middle": [1, 1, 1, 0], "end": [1, 1, 1, 1]}[where]
    assert mask == expected


def test_uamt_train_step_uses_the_mc_mask():
    """Inside train_step (compat_ln2, C = 2, t = 0): mask (1, 0, 1, 0), consistency Σ M·d / (2·ΣM)."""
    T = 100
    m, ctx = make_method(UAMT, total=T, num_classes=2, compat_ln2=True)
    h = threshold(0, T, 2, True)
    maps = pass_maps(h - 0.01, h + 0.01)
    single = torch.tensor([[[[2.0, -1.0, 0.5, 0.0]], [[-2.0, 1.0, 0.0, 0.3]]]])      # 1×2×1×4
    z = torch.tensor([[[[1.0, 0.0, -1.0, 2.0]], [[0.0, 1.0, 1.0, 0.0]]],
                      [[[0.3, -0.7, 1.5, 0.2]], [[-0.4, 0.9, -1.0, 1.1]]]])          # [labelled; unlabelled]
    m.student = FixedLogits(z)
    m.teacher = ScriptedTeacher(single, maps)
    lb = Batch(torch.zeros(1, 1, 1, 4), torch.tensor([[[0, 1, 1, 0]]]))
    ub = Batch(torch.rand(1, 1, 1, 4))
    out = m.train_step(lb, ub, 0)
    assert float(out.logs["mask"]) == 0.5
    d = (z[1:].softmax(1) - single.softmax(1)) ** 2                                  # 1×2×1×4
    mask = torch.tensor([1.0, 0.0, 1.0, 0.0]).view(1, 1, 1, 4)
    expected = (d * mask).sum().item() / (2 * 2 + 1e-16)
    assert float(out.logs["cons"]) == pytest.approx(expected, rel=1e-5)
    # UA-MT 3: one single prediction on B, then 4 calls on 2B images, each with fresh noise
    inputs = m.teacher.inputs
    assert [i.shape[0] for i in inputs] == [1, 2, 2, 2, 2]
    stoch = inputs[1:]
    for i in stoch:
        assert (i - ub.image.repeat(2, 1, 1, 1)).abs().max() <= 0.2 + 1e-6
        assert not torch.equal(i[0], i[1])                  # the two copies get different noise
    for a in range(4):
        for b in range(a + 1, 4):
            assert not torch.equal(stoch[a], stoch[b])


def test_uamt_fixed_mode_uses_ln_c_and_c_times_mask_sum():
    """C = 4, all passes equal: pixel entropies 0.1, 0.9, 1.2, 1.3. At t = 0 the fixed threshold
    0.75·ln 4 ≈ 1.04 keeps (1, 1, 0, 0), the ln 2 form (0.52) keeps (1, 0, 0, 0); denominators 4k vs 2k."""
    def probs_for_entropy(u):
        lo, hi = 0.25, 1.0
        f = lambda a: -sum(q * math.log(q + 1e-6) for q in [a] + [(1 - a) / 3] * 3)  # noqa: E731
        for _ in range(200):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if f(mid) > u else (lo, mid)
        a = (lo + hi) / 2
        return [a] + [(1 - a) / 3] * 3

    ents = [0.1, 0.9, 1.2, 1.3]
    p = torch.tensor([probs_for_entropy(u) for u in ents], dtype=torch.float64)       # 4 px × 4 classes
    logits = p.log().T[None, :, None, :].float()                                      # 1×4×1×4
    T = 100
    results = {}
    for compat in (False, True):
        m, ctx = make_method(UAMT, total=T, num_classes=4, compat_ln2=compat)
        z = torch.randn(2, 4, 1, 4, generator=torch.Generator().manual_seed(0))
        m.student = FixedLogits(z)
        m.teacher = ScriptedTeacher(logits, logits.repeat(8, 1, 1, 1, 1))
        u = uncertainty(m.teacher, torch.zeros(1, 1, 1, 4))
        assert u.flatten().tolist() == pytest.approx(ents, abs=1e-4)
        m.teacher = ScriptedTeacher(logits, logits.repeat(8, 1, 1, 1, 1))
        out = m.train_step(Batch(torch.zeros(1, 1, 1, 4), torch.tensor([[[0, 1, 2, 3]]])),
                           Batch(torch.zeros(1, 1, 1, 4)), 0)
        d = (z[1:].softmax(1) - logits.softmax(1)) ** 2
        keep = [1.0, 1.0, 0.0, 0.0] if not compat else [1.0, 0.0, 0.0, 0.0]
        mask = torch.tensor(keep).view(1, 1, 1, 4)
        denom = (4 if not compat else 2) * sum(keep)
        assert float(out.logs["mask"]) == pytest.approx(sum(keep) / 4)
        assert float(out.logs["cons"]) == pytest.approx((d * mask).sum().item() / denom, rel=1e-5)
        results[compat] = float(out.logs["cons"])
    assert results[False] != results[True]


# ---- UA-MT 2: masked consistency ---------------------------------------------------------------------

@pytest.mark.parametrize("C", [2, 4])
def test_masked_consistency_value(C):
    g = torch.Generator().manual_seed(C)
    d = torch.rand(2, C, 3, 3, generator=g)
    mask = torch.rand(2, 3, 3, generator=g) > 0.5
    k = int(mask.sum())
    assert 0 < k < 18
    s = (d * mask[:, None]).sum().item()
    assert masked_consistency(d, mask, C, compat_ln2=True).item() == pytest.approx(s / (2 * k), rel=1e-6)
    assert masked_consistency(d, mask, C, compat_ln2=False).item() == pytest.approx(s / (C * k), rel=1e-6)
    empty = torch.zeros_like(mask)
    assert masked_consistency(d, empty, C, compat_ln2=False).item() == 0.0


# ---- UA-MT 3: deterministic teacher ------------------------------------------------------------------

def test_uncertainty_without_noise_or_dropout_is_the_single_prediction_entropy(monkeypatch):
    monkeypatch.setattr(ua_mt, "teacher_noise", lambda x: x)
    torch.manual_seed(0)
    net = UNet2D(1, 4, widths=(4, 8, 16, 32, 64), dropout=(0, 0, 0, 0, 0))
    teacher = EMA(net)
    x = torch.rand(3, 1, 16, 16)
    u = uncertainty(teacher, x, passes=8)
    with torch.no_grad():
        p = teacher(x).logits.softmax(1)
    single = -(p * torch.log(p + 1e-6)).sum(1)
    assert torch.allclose(u, single, atol=1e-5)
    # with noise back on, the passes differ and the uncertainty changes
    monkeypatch.undo()
    assert not torch.allclose(uncertainty(teacher, x, passes=8), single, atol=1e-5)
