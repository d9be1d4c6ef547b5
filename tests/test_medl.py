"""MEDL behaviour (methods.md "MEDL", Test it by 1-4): evidence algebra, CAEF / EF fusion and the reliability on
hand-made beliefs, UMAL weights, the Fisher-information EDL loss, the composed train step (terms, gradients, sums
over samples, schedules), configs and mismatched pairs, exact resume, and learning on the 2D disc and 3D sphere
phantoms."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import (TINY_UNET, assert_same, ensemble_test_dice, random_batches, small_config, straight_and_resumed,
                      tiny_method)
from ssmis.config import load_config
from ssmis.errors import UserError
from ssmis.losses.evidential import (XI_MAX, Opinion, epoch_progress, evidence, expected_probability,
                                     fisher_edl_loss, fuse, opinion, per_sample_sum, rank_position, reliability,
                                     tetragamma, trigamma, umal_weights)
from ssmis.losses.seg import dice_loss
from ssmis.methods import describe_methods
from ssmis.methods.base import Batch
from ssmis.methods.medl import MEDL
from ssmis.models.unet import UNet2D
from ssmis.registry import MODELS
from test_cps import FixedLogits

ROOT = Path(__file__).resolve().parent.parent
D64 = torch.float64
TINY_NET2 = ["method.net2=unet2d", "method.net2_args={widths: [4, 8, 16, 32, 64]}"]
TINY_RESNET = {"widths": [4, 8, 8, 16, 16], "blocks": [1, 1, 1, 1]}


def factory(name=None, **args):
    """BuildContext factory of the tests: tiny UNet-2D as network 1, `name` (unet2d) with `args` as network 2."""
    return UNet2D(1, 4, **TINY_UNET) if name is None else MODELS.get(name)(in_channels=1, num_classes=4, **args)


def make_medl(**kw):
    kw.setdefault("net2", "unet2d")
    kw.setdefault("net2_args", {"widths": [4, 8, 16, 32, 64]})
    return tiny_method(MEDL, make_model=factory, **kw)


# ---- 1: evidence algebra ------------------------------------------------------------------------------------

def test_zero_evidence_is_total_ignorance():
    for k in (2, 4):
        e = torch.zeros(3, k, 5, 6, dtype=D64)
        op = opinion(e)
        alpha = e + 1
        assert torch.equal(alpha, torch.ones_like(e)) and torch.equal(alpha.sum(1), torch.full((3, 5, 6), k, dtype=D64))
        assert torch.equal(op.uncertainty, torch.ones(3, 5, 6, dtype=D64))             # u = K/S = 1, the maximum
        assert torch.equal(op.belief, torch.zeros_like(e))
        assert torch.allclose(expected_probability(alpha), torch.full_like(e, 1 / k))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_random_evidence_masses_sum_to_one(dtype):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 4, 7, 9, generator=g, dtype=dtype) * 4
    e = evidence(logits)
    assert e.dtype == dtype and (e >= 0).all() and torch.allclose(e, F.softplus(logits))
    op = opinion(e)
    assert torch.allclose(op.belief.sum(1) + op.uncertainty, torch.ones(2, 7, 9, dtype=dtype))
    assert (op.uncertainty < 1).all() and (op.uncertainty > 0).all()
    assert torch.allclose(expected_probability(e + 1).sum(1), torch.ones(2, 7, 9, dtype=dtype))
    assert evidence(torch.tensor([[-3.0, 2.0]]), "relu").tolist() == [[0.0, 2.0]]
    assert evidence(torch.zeros(1, 2, dtype=torch.bfloat16)).dtype == torch.float32


# ---- 2: CAEF / EF and the reliability on hand-made beliefs ---------------------------------------------------

B1 = Opinion(torch.tensor([[0.6, 0.2]], dtype=D64), torch.tensor([0.2], dtype=D64))
B2 = Opinion(torch.tensor([[0.5, 0.3]], dtype=D64), torch.tensor([0.2], dtype=D64))


def test_caef_on_hand_made_beliefs():
    """Raw masses (0.37333, 0.09333 | 0.04), normalised b̃ = (0.73684, 0.18421), b̃_{C_K} = 0.07895."""
    raw = B1.belief * B2.belief + (B1.belief * B2.uncertainty + B2.belief * B1.uncertainty) / 3
    assert raw[0].tolist() == pytest.approx([0.37333, 0.09333], abs=1e-5)
    f = fuse(B1, B2)
    assert f.belief[0].tolist() == pytest.approx([0.73684, 0.18421], abs=1e-5)
    assert f.uncertainty.item() == pytest.approx(0.07895, abs=1e-5)
    assert f.belief.sum().item() + f.uncertainty.item() == pytest.approx(1.0, abs=1e-12)
    assert f.belief.argmax(1).item() == 0                                         # the pseudo-label
    g = fuse(B2, B1)                                                              # symmetric
    assert torch.allclose(g.belief, f.belief) and torch.allclose(g.uncertainty, f.uncertainty)


def test_plain_ef_on_hand_made_beliefs():
    f = fuse(B1, B2, class_aware=False)
    assert f.belief[0].tolist() == pytest.approx([0.72222, 0.22222], abs=1e-5)
    assert f.uncertainty.item() == pytest.approx(0.05556, abs=1e-5)


def test_reliability_on_hand_made_beliefs():
    assert reliability(fuse(B1, B2)).item() == pytest.approx(0.94071, abs=1e-5)
    certain = Opinion(torch.tensor([[0.7, 0.3]], dtype=D64), torch.tensor([0.2], dtype=D64))
    fused = fuse(certain, Opinion(torch.tensor([[0.9, 0.1]], dtype=D64), torch.tensor([0.0], dtype=D64)))
    assert fused.uncertainty.item() == 0 and reliability(fused).item() == 1.0          # R = 1 when b̃_{C_K} = 0
    # small when the fused uncertainty and the belief entropy are both large; 1 for one-hot beliefs
    ignorant = Opinion(torch.tensor([[0.05, 0.05]], dtype=D64), torch.tensor([0.9], dtype=D64))
    assert reliability(ignorant).item() == pytest.approx(math.exp(0.9 * 0.1 * math.log2(0.05)))
    assert reliability(Opinion(torch.tensor([[0.5, 0.0]], dtype=D64), torch.tensor([0.5], dtype=D64))).item() \
        == pytest.approx(math.exp(0.5 * 0.5 * math.log2(0.5)))
    assert reliability(Opinion(torch.tensor([[0.0, 1.0]], dtype=D64), torch.tensor([0.0], dtype=D64))).item() == 1.0


def test_fusion_on_network_maps_is_per_voxel():
    g = torch.Generator().manual_seed(1)
    a, b = (opinion(F.softplus(torch.randn(2, 3, 4, 5, generator=g))) for _ in range(2))
    f = fuse(a, b)
    assert f.belief.shape == (2, 3, 4, 5) and f.uncertainty.shape == (2, 4, 5)
    assert torch.allclose(f.belief.sum(1) + f.uncertainty, torch.ones(2, 4, 5))
    one = fuse(Opinion(a.belief[1:, :, 2, 3], a.uncertainty[1:, 2, 3]), Opinion(b.belief[1:, :, 2, 3], b.uncertainty[1:, 2, 3]))
    assert torch.allclose(one.belief[0], f.belief[1, :, 2, 3]) and torch.allclose(one.uncertainty[0], f.uncertainty[1, 2, 3])
    r = reliability(f)
    assert r.shape == (2, 4, 5) and (r > 0).all() and (r <= 1).all()


# ---- 3: UMAL weights ---------------------------------------------------------------------------------------

def test_umal_weights_at_the_ends_and_the_middle_of_the_run():
    u = torch.tensor([[0.3, 0.9, 0.1, 0.5, 0.7]])          # most certain voxel 2, most uncertain voxel 1
    top = 1 + 0.5 * math.tanh(1)
    assert top == pytest.approx(1.38080, abs=1e-5)
    w = umal_weights(u, -1.0, 0.5)                          # ζ = −1: certain first
    assert w[0, 2].item() == pytest.approx(1.38080, abs=1e-5) and w[0, 1].item() == pytest.approx(0.61920, abs=1e-5)
    assert w[0].argsort().tolist() == u[0].argsort(descending=True).tolist()      # the more certain, the heavier
    assert torch.equal(umal_weights(u, 0.0, 0.5), torch.ones_like(u))
    w = umal_weights(u, 1.0, 0.5)                           # ζ = +1: roles swap
    assert w[0, 1].item() == pytest.approx(1.38080, abs=1e-5) and w[0, 2].item() == pytest.approx(0.61920, abs=1e-5)
    assert torch.allclose(umal_weights(u, 1.0, 0.5) + umal_weights(u, -1.0, 0.5), torch.full_like(u, 2.0))
    assert epoch_progress(0.0) == -1 and epoch_progress(0.5) == 0 and epoch_progress(1.0) == 1


def test_umal_ranks_each_sample_separately_with_stable_ties():
    u = torch.tensor([[[0.2, 0.1], [0.4, 0.3]], [[5.0, 6.0], [7.0, 8.0]]])       # B×H×W, different scales
    psi = rank_position(u)
    assert psi.shape == u.shape
    assert psi[0].flatten().tolist() == pytest.approx([-1 / 3, -1, 1, 1 / 3])
    assert psi[1].flatten().tolist() == pytest.approx([-1, -1 / 3, 1 / 3, 1])
    assert rank_position(torch.zeros(1, 3)).tolist() == [[-1.0, 0.0, 1.0]]          # ties: voxel order
    assert rank_position(torch.zeros(2, 1)).tolist() == [[0.0], [0.0]]


def test_umal_weights_stay_positive_below_the_bound():
    assert XI_MAX == pytest.approx(1.313035, abs=1e-6)
    u = torch.rand(2, 50, generator=torch.Generator().manual_seed(0))
    for zeta in (-1.0, -0.3, 0.7, 1.0):
        assert umal_weights(u, zeta, 1.31).min().item() > 0
    for bad in (0.0, -0.1, XI_MAX, 2.0):
        with pytest.raises(ValueError, match="1/tanh"):
            umal_weights(u, 0.5, bad)
    for bad in ("0", "1.32"):
        with pytest.raises(UserError, match="method.xi"):
            load_config("phantom", ["method.name=medl", f"method.xi={bad}"])


# ---- 4: Fisher-information EDL -------------------------------------------------------------------------------

@pytest.mark.parametrize("alpha,expected", [((3, 1), 0.33647), ((1, 3), 1.35640), ((1, 1), 1.12351)])
def test_fie_loss_values(alpha, expected):
    a = torch.tensor([alpha], dtype=D64)
    loss = fisher_edl_loss(a, torch.tensor([0]), 0.05)
    assert loss.dtype == D64 and loss.item() == pytest.approx(expected, abs=1e-5)
    # float32 agrees, and per voxel on maps (B×K×spatial -> B×spatial)
    assert fisher_edl_loss(a.float(), torch.tensor([0]), 0.05).item() == pytest.approx(expected, abs=1e-5)
    maps = a.view(1, 2, 1, 1).expand(2, 2, 3, 4)
    assert torch.allclose(fisher_edl_loss(maps, torch.zeros(2, 3, 4, dtype=torch.long), 0.05),
                          torch.full((2, 3, 4), expected, dtype=D64), atol=1e-5)


def test_fie_prefers_evidence_on_the_pseudo_label_class():
    for e in (1, 2, 5, 10, 20, 50):
        right = fisher_edl_loss(torch.tensor([[e + 1.0, 1.0]], dtype=D64), torch.tensor([0]), 0.05)
        wrong = fisher_edl_loss(torch.tensor([[1.0, e + 1.0]], dtype=D64), torch.tensor([0]), 0.05)
        assert right.item() < wrong.item(), e
    # not monotone in e because of the Fisher term (so no monotonicity is asserted above)
    vals = [fisher_edl_loss(torch.tensor([[e + 1.0, 1.0]], dtype=D64), torch.tensor([0]), 0.05).item() for e in (5, 50)]
    assert vals[1] > vals[0]


def test_fie_is_finite_for_large_evidence_in_float32():
    """The determinant's last factor ≈ (K − 1)/(2KS̄) cancels in float32; it is taken in float64."""
    for e in (1e3, 1e5, 1e7):
        a = torch.tensor([[e + 1, 1.0, 1.0, 1.0], [e, e, e, e]], requires_grad=True)
        loss = fisher_edl_loss(a, torch.tensor([0, 0]), 0.05)
        loss.sum().backward()
        assert loss.dtype == torch.float32 and torch.isfinite(loss).all() and torch.isfinite(a.grad).all()
        ref = fisher_edl_loss(a.detach().double(), torch.tensor([0, 0]), 0.05)
        assert torch.allclose(loss.double(), ref, rtol=1e-4)


def test_trigamma_gradient_is_the_tetragamma():
    x = torch.cat([torch.logspace(-3, 7, 500, dtype=D64), torch.linspace(0.5, 12, 500, dtype=D64)])
    assert torch.allclose(tetragamma(x), torch.polygamma(2, x), rtol=1e-9, atol=0)
    assert torch.allclose(tetragamma(x.float()).double(), torch.polygamma(2, x), rtol=1e-6, atol=0)
    assert torch.equal(trigamma(x), torch.polygamma(1, x))
    assert torch.autograd.gradcheck(trigamma, (torch.tensor([0.7, 1.0, 3.3, 40.0, 1e4], dtype=D64, requires_grad=True),))
    # the FIE gradient equals autograd through torch.polygamma
    a = (torch.rand(2, 3, 4, 4, generator=torch.Generator().manual_seed(0), dtype=D64) * 20 + 1).requires_grad_()
    t = torch.randint(0, 3, (2, 4, 4), generator=torch.Generator().manual_seed(1))
    (g,) = torch.autograd.grad(fisher_edl_loss(a, t, 0.05).sum(), a)
    s = a.sum(1, keepdim=True)
    tri = torch.polygamma(1, a)
    onehot = F.one_hot(t, 3).movedim(-1, 1).to(D64)
    ref = (((onehot - a / s) ** 2 + a * (s - a) / (s * s * (s + 1))) * tri).sum(1) - 0.05 * (
        tri.log().sum(1) + torch.log(1 - torch.polygamma(1, s[:, 0]) * (1 / tri).sum(1)))
    (g_ref,) = torch.autograd.grad(ref.sum(), a)
    assert torch.allclose(g, g_ref, rtol=1e-8)


def test_per_sample_sum_is_the_sum_of_per_sample_means():
    v = torch.tensor([[[1.0, 3.0]], [[5.0, 7.0]], [[0.0, 0.0]]])
    assert per_sample_sum(v).item() == 2 + 6 + 0
    assert per_sample_sum(v, sample_sum=False).item() == pytest.approx(8 / 3)


# ---- the composed step -----------------------------------------------------------------------------------

def expected_step(z1, z2, label, n, step, total, cfg):
    """Eq. 8-9 written out from the evidential pieces, fused quantities from detached copies."""
    a1, a2 = F.softplus(z1) + 1, F.softplus(z2) + 1
    o1, o2 = opinion(F.softplus(z1.detach())), opinion(F.softplus(z2.detach()))
    f = fuse(o1, o2)
    pl = f.belief[n:].argmax(1)
    r = reliability(Opinion(f.belief[n:], f.uncertainty[n:]))
    zeta = 2 * step / total - 1
    lam = cfg["w_max"] * math.exp(-5 * (1 - min(step / (0.4 * total), 1)) ** 2)
    total_loss = 0
    for z, a, o in ((z1, a1, o1), (z2, a2, o2)):
        sup = F.cross_entropy(z[:n], label) + dice_loss(z[:n].softmax(1), label)
        ce_u = F.cross_entropy(z[n:], pl, reduction="none")
        unsup = (r * ce_u).mean() + dice_loss(z[n:].softmax(1), pl, mask=r)
        w_l = umal_weights(0.5 * o.uncertainty[:n] + 0.5 * f.uncertainty[:n], zeta, 0.5)
        wl = (w_l * F.cross_entropy(z[:n], label, reduction="none")).flatten(1).mean(1).sum()
        w_u = umal_weights(f.uncertainty[n:], zeta, 0.5) * r
        fie = (w_u * fisher_edl_loss(a[n:], pl, 0.05)).flatten(1).mean(1).sum()
        total_loss = total_loss + sup + unsup + wl + lam * fie
    return total_loss, dict(lam=lam, zeta=zeta, pl=pl, r=r, u=f.uncertainty[n:])


def constructed(seed=5, nl=2, nu=3, c=4, h=3, w=5):
    g = torch.Generator().manual_seed(seed)
    z1 = torch.randn(nl + nu, c, h, w, generator=g) * 2
    z2 = torch.randn(nl + nu, c, h, w, generator=g) * 2
    lb = Batch(torch.zeros(nl, 1, h, w), torch.randint(0, c, (nl, h, w), generator=g))
    return z1, z2, lb, Batch(torch.zeros(nu, 1, h, w))


@pytest.mark.parametrize("step", [0, 300, 700])
def test_train_step_is_eq_8_with_no_gradient_through_the_fusion(step):
    total = 1000
    z1, z2, lb, ub = constructed()
    m, _ = make_medl(total=total)
    m.net1, m.net2 = FixedLogits(z1), FixedLogits(z2)
    out = m.train_step(lb, ub, step)
    a, b = z1.clone().requires_grad_(), z2.clone().requires_grad_()
    ref, parts = expected_step(a, b, lb.label, 2, step, total, dict(w_max=0.1))
    assert out.loss.item() == pytest.approx(ref.item(), rel=1e-5)
    assert out.logs["fie_w"] == pytest.approx(parts["lam"], rel=1e-9) and out.logs["zeta"] == pytest.approx(parts["zeta"])
    assert float(out.logs["rel"]) == pytest.approx(parts["r"].mean().item(), rel=1e-6)
    assert float(out.logs["u_fused"]) == pytest.approx(parts["u"].mean().item(), rel=1e-6)
    assert float(out.logs["pl_fg"]) == pytest.approx((parts["pl"] > 0).float().mean().item())
    out.loss.backward()
    ga, gb = torch.autograd.grad(ref, [a, b])
    assert torch.allclose(m.net1.z.grad, ga, atol=1e-6) and torch.allclose(m.net2.z.grad, gb, atol=1e-6)
    # every logged per-network term is finite and the unlabelled terms reach the unlabelled logits
    for k in ("sup1", "unsup1", "wl1", "fie1", "sup2", "unsup2", "wl2", "fie2"):
        assert math.isfinite(float(out.logs[k])) and float(out.logs[k]) > 0, k
    assert torch.count_nonzero(m.net1.z.grad[2:]) > 0.9 * m.net1.z.grad[2:].numel()


def test_sample_sum_is_b_times_the_batch_mean():
    z1, z2, lb, ub = constructed()
    logs = {}
    for flag in (True, False):
        m, _ = make_medl(total=1000, sample_sum=flag)
        m.net1, m.net2 = FixedLogits(z1), FixedLogits(z2)
        logs[flag] = m.train_step(lb, ub, 500).logs
    for i in (1, 2):
        assert float(logs[True][f"wl{i}"]) == pytest.approx(2 * float(logs[False][f"wl{i}"]), rel=1e-6)   # 2 labelled
        assert float(logs[True][f"fie{i}"]) == pytest.approx(3 * float(logs[False][f"fie{i}"]), rel=1e-6)  # 3 unlabelled
        assert float(logs[True][f"sup{i}"]) == float(logs[False][f"sup{i}"])


def test_reliability_modes():
    z1, z2, lb, ub = constructed()
    r = reliability(fuse(*(opinion(F.softplus(z[2:])) for z in (z1, z2))))
    cut = float(r.median())                         # the hard mask removes about half of the voxels
    rel = {}
    for mode, r0 in (("weight", 0.0), ("weight", cut), ("mask", cut), ("none", 0.0)):
        m, _ = make_medl(total=1000, reliability=mode, r0=r0)
        m.net1, m.net2 = FixedLogits(z1), FixedLogits(z2)
        rel[mode, r0] = float(m.train_step(lb, ub, 500).logs["rel"])
    assert rel["weight", 0.0] == pytest.approx(r.mean().item(), rel=1e-6)
    assert rel["weight", cut] == pytest.approx((r * (r > cut)).mean().item(), rel=1e-6)
    assert rel["mask", cut] == pytest.approx((r > cut).float().mean().item(), rel=1e-6)
    assert 0.3 < rel["mask", cut] < 0.7 and rel["none", 0.0] == 1.0


def test_ef_fusion_changes_the_fused_uncertainty():
    z1, z2, lb, ub = constructed()
    u = {}
    for fusion in ("caef", "ef"):
        m, _ = make_medl(total=1000, fusion=fusion)
        m.net1, m.net2 = FixedLogits(z1), FixedLogits(z2)
        u[fusion] = float(m.train_step(lb, ub, 500).logs["u_fused"])
    o1, o2 = (opinion(F.softplus(z[2:])) for z in (z1, z2))
    assert u["ef"] == pytest.approx(fuse(o1, o2, class_aware=False).uncertainty.mean().item(), rel=1e-6)
    assert u["ef"] < u["caef"]                     # EF keeps more mass on the classes


def test_schedules_follow_the_run_length():
    m, _ = make_medl(total=2000)
    assert m.fie_weight(0) == pytest.approx(0.1 * math.exp(-5))
    assert m.fie_weight(400) == pytest.approx(0.1 * math.exp(-5 * 0.25))
    assert m.fie_weight(800) == pytest.approx(0.1) and m.fie_weight(1999) == pytest.approx(0.1)   # t_r = 40 %
    assert m.zeta(0) == -1 and m.zeta(1000) == 0 and m.zeta(1999) == pytest.approx(0.999)


def test_train_step_on_real_networks_trains_both_and_needs_unlabelled_images():
    m, ctx = make_medl(total=300)
    lb, ub = random_batches(size=16)
    out = m.train_step(lb, ub, 120)
    out.loss.backward()
    for name in ("net1", "net2"):
        grads = [p.grad for p in ctx.modules[name].parameters()]
        assert all(g is not None and torch.isfinite(g).all() for g in grads) and any(g.abs().sum() > 0 for g in grads)
    assert 0 < float(out.logs["rel"]) <= 1 and 0 < float(out.logs["u_fused"]) < 1
    assert m.eval_model() is ctx.modules["net1"] and ctx.trainable == ["net1", "net2"]
    with pytest.raises(UserError, match="unlabeled_bs"):
        m.train_step(lb, None, 0)


def test_3d_train_step_with_the_default_second_network():
    """3D: network 2 'auto' = resnet34_vnet (tiny), network 1 a tiny VNet."""
    from ssmis.models.vnet import VNet

    def nets(name=None, **args):
        return VNet(1, 2, widths=(4, 8, 16, 32, 64)) if name is None else MODELS.get(name)(1, 2, **args)

    m, ctx = tiny_method(MEDL, num_classes=2, spatial_dims=3, make_model=nets, net2_args=TINY_RESNET)
    assert m.net2_name() == "resnet34_vnet" and type(ctx.modules["net2"]).__name__ != "VNet"
    g = torch.Generator().manual_seed(0)
    lb = Batch(torch.rand(2, 1, 16, 16, 16, generator=g), torch.randint(0, 2, (2, 16, 16, 16), generator=g))
    out = m.train_step(lb, Batch(torch.rand(2, 1, 16, 16, 16, generator=g)), 10)
    out.loss.backward()
    assert math.isfinite(out.loss.item()) and 0 <= float(out.logs["pl_fg"]) <= 1
    assert all(p.grad is not None for p in ctx.modules["net2"].parameters())


# ---- config, registry, mismatched pairs, resume ---------------------------------------------------------------

def test_method_config_spells_out_the_defaults():
    cfg = load_config(ROOT / "configs" / "methods" / "medl.yaml")
    assert cfg.method == MEDL.Config().model_dump()
    assert cfg.data.patch_size == [128, 128] and cfg.train.iterations == 2000
    c = MEDL.Config()
    assert (c.lambda1, c.lambda2, c.xi, c.lambda_f, c.w_max, c.t_r) == (0.5, 0.5, 0.5, 0.05, 0.1, 0.4)
    assert (c.evidence, c.fusion, c.reliability, c.r0, c.sample_sum, c.net2) == ("softplus", "caef", "weight", 0.0,
                                                                                True, "auto")
    with pytest.raises(UserError, match="lambda1 \\+ lambda2 must be 1"):
        load_config("phantom", ["method.name=medl", "method.lambda1=0.3", "method.lambda2=0.5"])
    load_config("phantom", ["method.name=medl", "method.lambda1=0.3", "method.lambda2=0.7"])
    ramped = load_config(ROOT / "configs" / "methods" / "medl_ramped.yaml")     # the control: only L_u's ramp differs
    assert ramped.method == {**cfg.method, "u_rampup": 0.4}
    assert ramped.model_dump(exclude={"method"}) == cfg.model_dump(exclude={"method"})


def test_listed_as_reporting_network_1():
    rows = {n: (dims, line) for n, dims, line in describe_methods()}
    assert rows["medl"][0] == "2D/3D" and "(network 1 reported)" in rows["medl"][1]


def test_2d_second_network_with_a_3d_patch_is_one_clear_error(tmp_path):
    cfg = load_config("phantom", ["data.layout=sphere", "data.patch_size=[16,16,16]", "model.name=vnet",
                                  "model.widths=[4,8,16,32,64]", "method.name=medl", "method.net2=unet2d",
                                  "train.iterations=2"])
    with pytest.raises(UserError, match="method.net2: unet2d is a 2D model but data.patch_size .* is 3D"):
        from ssmis.engine.run import train

        train(cfg, out=tmp_path / "r", progress=False)
    assert not (tmp_path / "r").exists()                   # failed before training: no half-made run


def test_unknown_second_network_is_a_user_error(tmp_path):
    from ssmis.engine.run import train

    with pytest.raises(UserError, match="method.net2"):
        train(small_config("medl", 2, "method.net2=unet2dd"), out=tmp_path / "r", progress=False)


def test_exact_resume(tmp_path):
    """6 steps straight == 4 steps + resume: bitwise-equal networks and optimiser state. Network 2 is the 2D
    default (auto = resnet34_unet), tiny."""
    cfg = small_config("medl", 6, "method.net2_args={widths: [4, 8, 8, 16, 16], blocks: [1, 1, 1, 1]}",
                       "train.deterministic=true", "train.ckpt_every=2")
    a, b, mid = straight_and_resumed(cfg, tmp_path, 4)
    assert mid["step"] == 4 and a["step"] == b["step"] == 6 and set(a["modules"]) == {"net1", "net2"}
    assert "encoder.stem.0.weight" in a["modules"]["net2"]                   # the ResNet34-encoder U-Net
    assert_same(a["modules"], b["modules"], "modules")
    assert_same(a["optimizer"], b["optimizer"], "optimizer")
    assert_same(a["eval_weights"], a["modules"]["net1"], "eval_weights")      # network 1 is reported


def test_unet2d_pair_trains_through_the_engine(tmp_path):
    """The ACDC-lite alternative: a UNet-2D pair with different initialisations (method.net2=unet2d)."""
    from ssmis.engine.run import train

    import csv

    train(small_config("medl", 3, *TINY_NET2, "train.log_every=1"), out=tmp_path / "r", progress=False,
          test_at_end=False)
    with open(tmp_path / "r" / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r["split"] == "train"]
    names = {r["name"] for r in rows}
    assert {"loss", "sup1", "unsup2", "wl1", "fie2", "fie_w", "u_fused", "rel", "pl_fg"} <= names
    assert all(math.isfinite(float(r["value"])) for r in rows)


# ---- learning on the phantoms -------------------------------------------------------------------------------

# "Learns" setting of test_cps.py / test_m3hl.py (32×32 disc phantom, 8 patients: 2 labelled, 3 unlabelled, 1 val,
# 2 test; width-8 UNet-2D pair; 300 steps; batch 4 + 4; SGD 0.01 poly; fp32, 1 thread). Measured mean foreground
# test Dice (last checkpoint, torch 2.13 CPU, 20 s each), seeds 0 / 1 / 2:
#   supervised (test_m3hl.py)     0.711 / 0.757 / 0.540   mean 0.669
#   medl, network 1               0.769 / 0.844 / 0.514   mean 0.709   (D_sup + 0.040)
#   medl, average of both         0.785 / 0.855 / 0.548   mean 0.729   (D_sup + 0.060)
# The test runs seed 0 and asserts both the network-1 and the averaged prediction at D_sup + 0.02 against the
# recorded seed-0 supervised value (margins 0.038 / 0.054), and the floor of methods.md (0.5).
D_SUP_SEED0 = 0.711
LEARNS = ["data.phantom.size=32", "data.patch_size=[32,32]", "data.phantom.patients=8", "split.labeled=2",
          "split.val=1", "split.test=2", "model.widths=[8,16,32,64,128]", "train.iterations=300", "train.amp='off'",
          "train.eval_every=0", "train.threads=1", "train.device=cpu", "method.name=medl", "method.net2=unet2d",
          "method.net2_args={widths: [8, 16, 32, 64, 128]}", "seed=0"]


@pytest.mark.slow
def test_learns_on_the_disc_phantom(tmp_path):
    from ssmis.engine.run import train

    r = train(load_config("phantom", LEARNS), out=tmp_path / "medl", progress=False)
    net1 = r["test_last"]["mean"]["dice"]
    both = ensemble_test_dice(tmp_path / "medl")
    assert min(net1, both) >= 0.5, (net1, both)
    assert min(net1, both) >= D_SUP_SEED0 + 0.02, f"net 1 {net1:.3f} (measured 0.769), average {both:.3f} " \
        f"(0.785) vs supervised {D_SUP_SEED0}"


SPHERE = ["data.layout=sphere", "data.patch_size=[16,16,16]", "model.name=vnet", "model.widths=[4,8,16,32,64]",
          "train.labeled_bs=4", "train.unlabeled_bs=4", "train.threads=1", "train.eval_every=0",
          "data.fg_fraction=0.5", "method.name=medl", "method.net2=vnet", "method.net2_args={widths: [4,8,16,32,64]}"]


# 3D (test_3d.py's setting: 24×24×16 sphere phantom, patch 16³, VNet n_filters 4 pair, 300 steps, 4 + 4, 1 thread):
# measured seeds 0 / 1 / 2: medl network 1 0.877 / 0.927 / 0.922 (mean 0.909; 30 s each),
# supervised 0.829 / 0.843 / 0.848 (mean 0.840, test_3d.py). The test runs seed 0 against supervised's seed 0 + 0.02.
D_SUP_3D_SEED0 = 0.829


@pytest.mark.slow
def test_3d_learns_on_the_sphere_phantom(tmp_path):
    from ssmis.engine.run import train

    cfg = load_config("phantom", SPHERE + ["train.iterations=300", "seed=0"])
    dice = train(cfg, out=tmp_path / "r", progress=False)["test_last"]["mean"]["dice"]
    assert dice >= max(0.5, D_SUP_3D_SEED0 + 0.02), f"medl 3D: {dice:.3f} (measured 0.877)"


def test_u_rampup_control_ramps_only_the_unlabelled_dice_ce():
    """[ours] `u_rampup` multiplies L_u by the Gaussian warm-up (exp(-5) of its weight at step 0, 1 from the end of the
    ramp); the default 0 keeps Eq. 8's unramped L_u."""
    from ssmis.schedules import sigmoid_ramp

    lb, ub = random_batches(nl=2, nu=2, size=16)
    out = {}
    for ramp in (0.0, 0.4):
        m, _ = make_medl(total=100, u_rampup=ramp)
        torch.manual_seed(0)
        out[ramp] = m.train_step(lb, ub, step=0)
    plain, ramped = out[0.0], out[0.4]
    unsup = plain.logs["unsup1"] + plain.logs["unsup2"]
    w = sigmoid_ramp(0, 40)
    assert plain.logs["lu_w"] == 1.0 and ramped.logs["lu_w"] == pytest.approx(w) and w < 0.01
    assert float((plain.loss - ramped.loss).detach()) == pytest.approx(float((1 - w) * unsup), rel=1e-5)
    m, _ = make_medl(total=100, u_rampup=0.4)
    assert m.train_step(lb, ub, step=40).logs["lu_w"] == 1.0
