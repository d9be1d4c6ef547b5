"""BCP and ABD behaviour (methods.md "BCP" and "ABD", Test it by): mixing targets and region weights, LCC on
pseudo-labels, BCP's masked Dice, the two stages (no unlabelled image in pre-training, teacher and second
network from the pre-trained student, exact resume inside self-training and at the stage change), ABD's strong
view and schedules, and "learns on a tiny phantom". The mask and displacement tests are in test_mixing.py."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import assert_same, random_batches, tiny_method
from ssmis.config import load_config
from ssmis.data.mixing import bidirectional_mix, box_mask
from ssmis.engine.checkpoint import load_checkpoint
from ssmis.engine.run import setup, train
from ssmis.errors import UserError
from ssmis.losses.seg import dice_loss
from ssmis.methods.abd import ABD, cross_dice, cutout, strong_view
from ssmis.methods.base import Batch
from ssmis.methods.bcp import BCP, largest_component_per_class, mix_loss, mixed_step
from ssmis.models.output import SegOutput

ROOT = Path(__file__).resolve().parent.parent
def make_method(cls, total=40, **cfg):
    return tiny_method(cls, total=total, **cfg)


def batches(n=4, size=16, seed=0):
    return random_batches(n, n, size, 4, seed)


def states_equal(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# ---- BCP 2: mixing and targets ---------------------------------------------------------------------------

class SourceNet(nn.Module):
    """Predicts class = pixel value − 1 (confidently) outside the box and a uniform distribution inside."""

    def __init__(self, mask: torch.Tensor):
        super().__init__()
        self.mask = mask

    def forward(self, x):
        onehot = F.one_hot(x[:, 0].round().long() - 1, 4).movedim(-1, 1).float()
        return SegOutput(100 * onehot * self.mask)


def test_every_pixel_target_comes_from_its_source_image():
    """u_a = 1, l_a = 2, u_b = 3, l_b = 4 with labels p̂_a = 0, y_a = 1, p̂_b = 2, y_b = 3: the target map of
    X_in is y_a inside (weight 1) and p̂_a outside (weight u_weight); that of X_out is p̂_b inside (u_weight) and
    y_b outside (1). A network that predicts each pixel's source perfectly outside the box and uniformly inside
    has zero loss outside, and CE ln 4 inside weighted 1 (X_in) and u_weight (X_out)."""
    torch.manual_seed(2)
    shape = (2, 1, 24, 24)
    u_a, l_a, u_b, l_b = (torch.full(shape, v) for v in (1.0, 2.0, 3.0, 4.0))
    p_a, y_a, p_b, y_b = (torch.full((2, 24, 24), v) for v in (0, 1, 2, 3))
    m = box_mask((24, 24))
    t_in, t_out = bidirectional_mix(y_a, y_b, p_a, p_b, m)
    inside = m == 0
    assert (t_in[:, inside] == 1).all() and (t_in[:, ~inside] == 0).all()
    assert (t_out[:, inside] == 2).all() and (t_out[:, ~inside] == 3).all()
    step = mixed_step(SourceNet(m), l_a, l_b, u_a, u_b, y_a, y_b, p_a, p_b, m, u_weight=0.5)
    assert torch.equal(step.x_in[:, 0].round().long() - 1, t_in)            # pixel source == target source
    assert torch.equal(step.x_out[:, 0].round().long() - 1, t_out)
    d_in, c_in = mix_loss(step.z_in, p_a, y_a, m, 0.5, 1.0)
    d_out, c_out = mix_loss(step.z_out, y_b, p_b, m, 1.0, 0.5)
    ln4 = torch.log(torch.tensor(4.0))
    assert c_in.item() == pytest.approx(1.0 * ln4.item(), abs=1e-5)
    assert c_out.item() == pytest.approx(0.5 * ln4.item(), abs=1e-5)
    assert step.ce.item() == pytest.approx(1.5 * ln4.item(), abs=1e-5)
    assert step.loss.item() == pytest.approx(((d_in + d_out + c_in + c_out) / 2).item(), abs=1e-6)
    # the perfectly predicted outside regions cost nothing
    assert mix_loss(step.z_in, p_a, y_a, m, 1.0, 0.0)[1].item() == pytest.approx(0.0, abs=1e-6)
    assert mix_loss(step.z_in, p_a, y_a, m, 1.0, 0.0)[0].item() == pytest.approx(0.0, abs=1e-6)


# ---- BCP 3: LCC on pseudo-labels -------------------------------------------------------------------------

def test_largest_component_per_class():
    lab = torch.zeros(2, 12, 12, dtype=torch.long)
    lab[0, 0:2, 0:5] = 1                        # class 1: a 10-pixel blob …
    lab[0, 8:10, 8:10] = 1                      # … and a 4-pixel one (removed)
    lab[0, 5, 0:3] = 2                          # class 2: two 3-pixel pieces touching only diagonally (one
    lab[0, 6, 3:6] = 2                          # 6-pixel component with 8-connectivity) …
    lab[0, 9:11, 0:3] = 2                       # … beat a 6-pixel blob? no: equal size, the first in raster order
    lab[0, 9, 2] = 0                            # now 5 pixels: the diagonal pair (6) wins
    lab[1, 8:10, 8:10] = 1                      # slice 1: its own largest class-1 component (4 pixels) stays
    out = largest_component_per_class(lab, 4)
    exp = torch.zeros_like(lab)
    exp[0, 0:2, 0:5] = 1
    exp[0, 5, 0:3] = 2
    exp[0, 6, 3:6] = 2
    exp[1, 8:10, 8:10] = 1
    assert torch.equal(out, exp)
    assert not (out == 3).any()                 # an absent class stays absent


# ---- BCP 4: masked Dice ----------------------------------------------------------------------------------

def test_masked_dice_is_bcp_not_abds_all_ones_class0_variant():
    """The mask excludes two background pixels: BCP's masked Dice (mask in every class, smooth 1e-10) equals a
    hand computation and differs from ABD's variant whose class-0 mask is all ones."""
    probs = torch.tensor([[0.7, 0.2, 0.9, 0.6], [0.3, 0.8, 0.1, 0.4]]).view(1, 2, 1, 4)
    target = torch.tensor([[[0, 1, 0, 0]]])
    mask = torch.tensor([[[1.0, 1.0, 0.0, 0.0]]])
    got = dice_loss(probs, target, mask, smooth=1e-10)
    # by hand over the two kept pixels: class 0: 2·0.7 / (0.49 + 0.04 + 1); class 1: 2·0.8 / (0.09 + 0.64 + 1)
    hand = 1 - 0.5 * (2 * 0.7 / (0.49 + 0.04 + 1) + 2 * 0.8 / (0.09 + 0.64 + 1))
    assert got.item() == pytest.approx(hand, abs=1e-6)
    # ABD's copy: class 0 sees every pixel
    d0_abd = 2 * (0.7 + 0.9 + 0.6) / (0.49 + 0.04 + 0.81 + 0.36 + 3)
    abd = 1 - 0.5 * (d0_abd + 2 * 0.8 / (0.09 + 0.64 + 1))
    assert abs(got.item() - abd) > 0.01
    # smooth 1e-10, not 1e-5: a class absent from the masked target with tiny predictions counts as wrong
    tiny = torch.tensor([[1 - 1e-4, 1 - 1e-4], [1e-4, 1e-4]]).view(1, 2, 1, 2)
    zero = torch.zeros(1, 1, 2, dtype=torch.long)
    d = dice_loss(tiny, zero, torch.ones(1, 1, 2), smooth=1e-10)
    assert d.item() == pytest.approx(0.5 * (1 - 1e-10 / (2e-8 + 1e-10)), abs=1e-4)


# ---- BCP stages --------------------------------------------------------------------------------------------

def test_pretraining_uses_no_unlabelled_image():
    m, ctx = make_method(BCP)
    m.on_stage_start("pretrain", False)
    lb, ub = batches()
    torch.manual_seed(5)
    a = m.train_step(lb, Batch(torch.full_like(ub.image, float("nan"))), 0).loss
    torch.manual_seed(5)
    b = m.train_step(lb, None, 0).loss
    assert torch.isfinite(a) and torch.equal(a, b)
    teacher = {k: v.clone() for k, v in ctx.modules["teacher"].state_dict().items()}
    m.after_step(0)                                                       # no EMA update in pre-training
    assert all(torch.equal(teacher[k], v) for k, v in ctx.modules["teacher"].state_dict().items())


def test_pretraining_mixes_the_two_labelled_halves():
    """x = x_a⊙M + x_b⊙(1 − M), target y_a outside and y_b inside, both weight 1, L = (Dice + CE)/2."""
    m, ctx = make_method(BCP)
    m.on_stage_start("pretrain", False)
    lb, _ = batches()
    seen = []
    ctx.modules["student"].register_forward_hook(lambda mod, i, o: seen.append((i[0].clone(), o.logits)))
    torch.manual_seed(7)
    loss = m.train_step(lb, None, 0).loss
    torch.manual_seed(7)
    mask = box_mask((16, 16))
    (x, z), = seen
    assert torch.equal(x, lb.image[:2] * mask + lb.image[2:] * (1 - mask))
    dice, ce = mix_loss(z, lb.label[:2], lb.label[2:], mask, 1.0, 1.0)
    assert loss.item() == pytest.approx(((dice + ce) / 2).item(), abs=1e-6)


def test_selftraining_needs_equal_even_batches():
    m, _ = make_method(BCP)
    m.on_stage_start("selftrain", False)
    lb, ub = batches()
    with pytest.raises(UserError, match="unlabeled_bs"):
        m.train_step(lb, Batch(ub.image[:2]), 0)
    with pytest.raises(UserError, match="even"):
        m.train_step(Batch(lb.image[:3], lb.label[:3]), Batch(ub.image[:3]), 0)


@pytest.mark.parametrize("cls", [BCP, ABD])
def test_stage_change_starts_teacher_and_second_network_from_the_student(cls):
    m, ctx = make_method(cls)
    m.on_stage_start("pretrain", False)
    student = ctx.modules["student"]
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.1)
        student(torch.rand(4, 1, 16, 16) * 3)                             # moves BN statistics too
    others = ["teacher"] + (["student2"] if cls is ABD else [])
    assert not any(states_equal(student, getattr(ctx.modules[n], "module", ctx.modules[n])) for n in others)
    m.on_stage_start("selftrain", False)
    for n in others:
        assert states_equal(student, getattr(ctx.modules[n], "module", ctx.modules[n])), n
    # the EMA of the self-training stage is BCP's: fixed 0.99 over the whole state dict
    teacher = ctx.modules["teacher"]
    assert teacher.alpha(0) == 0.99 and teacher.average_buffers
    # a resumed stage keeps what the checkpoint restored
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.1)
    m.on_stage_start("selftrain", True)
    assert not states_equal(student, teacher.module)


def test_stage_split_and_optimizer_flag():
    for total, pre in ((2000, 500), (300, 75)):
        cfg = load_config("phantom", ["method.name=bcp", f"train.iterations={total}"])
        trainer = setup(cfg, None, log=lambda m: None)
        assert trainer.stage_bounds() == {"pretrain": 0, "selftrain": pre}
    assert BCP.Config().fresh_optimizer is False                           # ACDC keeps the optimiser state
    m, _ = make_method(BCP, fresh_optimizer=True)
    assert m.fresh_optimizer_per_stage


# ---- exact resume inside self-training and at the stage change -----------------------------------------

SMALL = ["data.phantom.size=32", "data.patch_size=[32,32]", "data.phantom.patients=8", "split.labeled=2",
         "split.val=1", "split.test=2", "model.widths=[4,8,16,32,64]", "train.amp='off'", "train.threads=1",
         "train.device=cpu", "train.deterministic=true", "train.log_every=1", "train.eval_every=0"]


def exact(method: str, ckpt_every: int, *extra: str):
    # 8 steps, pre-training 0.25 -> self-training from step 2
    return load_config("phantom", [*SMALL, f"method.name={method}", "train.iterations=8",
                                   f"train.ckpt_every={ckpt_every}", *extra])


def run_rows(run: Path):
    with open(run / "metrics.csv") as f:
        return [r for r in csv.DictReader(f) if r["split"] == "train"]


@pytest.mark.parametrize("method,stop", [("bcp", 4), ("bcp", 2), ("abd", 4)],
                         ids=["bcp-inside-selftrain", "bcp-at-stage-change", "abd-inside-selftrain"])
def test_exact_resume(method, stop, tmp_path):
    """8 steps straight == `stop` steps + resume: bitwise-equal modules (student, EMA teacher, and ABD's second
    network) and identical training rows. Stopping at step 2 resumes exactly at the first self-training
    step, before the teacher was copied from the student."""
    straight = tmp_path / "straight"
    train(exact(method, 2), out=straight, progress=False, test_at_end=False)
    out = tmp_path / "resumed"
    train(exact(method, 2), out=out, progress=False, stop_after=stop, test_at_end=False)
    assert load_checkpoint(out / "checkpoints" / "last.pt")["step"] == stop
    train(exact(method, 2), out=out, resume=True, progress=False, test_at_end=False)
    a = load_checkpoint(straight / "checkpoints" / "last.pt")
    b = load_checkpoint(out / "checkpoints" / "last.pt")
    assert a["step"] == b["step"] == 8
    expected = {"student", "teacher"} | ({"student2"} if method == "abd" else set())
    assert set(a["modules"]) == expected
    assert_same(a["modules"], b["modules"], "modules")
    assert_same(a["optimizer"], b["optimizer"], "optimizer")
    assert a["method_state"] == b["method_state"] == {"entered_stage": "selftrain"}
    assert run_rows(straight) == run_rows(out)
    # the teacher is a genuine EMA of the student, so the comparison above is meaningful
    assert not torch.equal(a["modules"]["student"]["head.weight"], a["modules"]["teacher"]["module.head.weight"])


# ---- ABD 3: strong view --------------------------------------------------------------------------------------

def test_cutout_rectangle_values_and_strong_label():
    torch.manual_seed(0)
    n, hw = 300, 32
    image = torch.full((n, 1, hw, hw), 0.5)
    label = torch.randint(1, 4, (n, hw, hw))                               # no background: y_s == 0 <=> cut out
    img, lab, box = cutout(image, label, p=0.5)
    has = box.flatten(1).any(1)
    assert 110 < int(has.sum()) < 190                                      # p = 0.5 per sample
    for i in torch.nonzero(has).flatten().tolist():
        rows, cols = torch.nonzero(box[i], as_tuple=True)
        h, w = int(rows.max() - rows.min() + 1), int(cols.max() - cols.min() + 1)
        assert int(box[i].sum()) == h * w                                   # one filled rectangle
        assert h * w <= 0.4 * hw * hw and (h + 1) * (w + 1) >= 0.02 * hw * hw      # area U(0.02, 0.4)·HW, truncated
        assert h <= 3.34 * (w + 1) and h + 1 >= 0.3 * w                      # aspect h/w in [0.3, 3.33], truncated
        assert set(img[i, 0][box[i]].unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(img[:, 0][~box], image[:, 0][~box])
    assert torch.equal(lab == 0, box) and torch.equal(lab[~box], label[~box])


def test_strong_view_stays_in_range_and_keeps_the_geometry():
    torch.manual_seed(0)
    x = torch.rand(64, 1, 16, 16)
    y = torch.randint(1, 4, (64, 16, 16))
    xs, ys = strong_view(x, y)
    assert xs.shape == x.shape and xs.min() >= 0 and xs.max() <= 1
    assert not torch.equal(xs, x)
    assert torch.equal(ys[ys != 0], y[ys != 0])                            # labels only lose the cut-out pixels


# ---- ABD 4: schedules --------------------------------------------------------------------------------------

def test_cross_teaching_abd_i_switches_off_at_two_thirds():
    m, _ = make_method(ABD, total=300, host="cross_teaching")
    assert m.stages == ("train",) and m.stage_fractions() == (1.0,) and m.teacher is None
    assert m.abd_i_active(199) and not m.abd_i_active(200)                 # 20 000 of 30 000 -> 200 of 300
    m2, _ = make_method(ABD, total=2000, host="cross_teaching")
    assert m2.abd_i_active(1332) and not m2.abd_i_active(1333)
    lb, ub = batches()
    m.on_stage_start("train", False)
    early, late = m.train_step(lb, ub, 10), m.train_step(lb, ub, 250)
    assert "abd_i" in early.logs and "abd_i" not in late.logs
    # the cross terms ramp: λ(t) = 0.1·r(⌊t/150⌋, 300/150)
    assert early.logs["w"] == pytest.approx(0.1 * torch.exp(torch.tensor(-5.0)).item())
    assert late.logs["w"] == pytest.approx(0.1 * torch.exp(torch.tensor(-5 * 0.25)).item())


def test_bcp_host_cross_terms_have_weight_one_at_the_first_selftraining_step():
    m, ctx = make_method(ABD)
    m.on_stage_start("pretrain", False)
    m.on_stage_start("selftrain", False)
    lb, ub = batches()
    out = m.train_step(lb, ub, 10)
    assert out.loss.item() == pytest.approx((out.logs["mix1"] + out.logs["mix2"] + out.logs["cross"]).item(), rel=1e-6)
    assert out.logs["cross"] > 0
    # both networks get gradients (f2 on the strong mixed views, both on the displaced ones)
    out.loss.backward()
    for name in ("student", "student2"):
        assert all(p.grad is not None for p in ctx.modules[name].parameters()), name


def test_cross_dice_uses_the_other_networks_argmax():
    z1, z2 = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    ps1, ps2 = cross_dice(z1, z2)
    assert torch.equal(ps1, dice_loss(z1.softmax(1), z2.argmax(1)))
    assert torch.equal(ps2, dice_loss(z2.softmax(1), z1.argmax(1)))


def test_abd_pretraining_leaves_the_second_network_alone():
    cfg = load_config("phantom", [*SMALL, "method.name=abd", "train.iterations=8", "train.ckpt_every=8"])
    trainer = setup(cfg, None, log=lambda m: None)
    f2 = {k: v.clone() for k, v in trainer.ctx.modules["student2"].state_dict().items()}
    trainer.fit(None, progress=False, stop_after=2)                        # the two pre-training steps
    assert all(torch.equal(f2[k], v) for k, v in trainer.ctx.modules["student2"].state_dict().items())
    trainer.fit(None, progress=False, stop_after=3)
    assert not states_equal(trainer.ctx.modules["student2"], trainer.ctx.modules["student"])   # both trained on


# ---- configs -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,cls", [("bcp", BCP), ("abd", ABD)])
def test_method_configs_spell_out_the_defaults(name, cls):
    cfg = load_config(ROOT / "configs" / "methods" / f"{name}.yaml")
    assert cfg.method == cls.Config().model_dump()
    assert cfg.train.augment == "auto" and cls.default_augment == "bcp" and cfg.train.iterations == 2000 and cfg.data.patch_size == [128, 128]


# ---- learns on a tiny phantom --------------------------------------------------------------------------------

# "Learns" setting of test_learning.py (32×32 phantom, 8 patients: 2 labelled, 3 unlabelled, 1 val, 2 test;
# width-8 UNet; 300 steps, BCP-based methods split 75 + 225; batch 4 + 4; SGD 0.01 poly; fp32, 1 thread).
# Measured mean foreground test Dice (last checkpoint, torch 2.13 CPU), seeds 0 / 1 / 2:
#   supervised         0.711 / 0.757 / 0.540   mean 0.669   (test_learning.py)
#   bcp                0.863 / 0.835 / 0.578   mean 0.759   (>= D_sup + 0.02 on the 3-seed mean)
#   abd (BCP host)     0.845 / 0.787 / 0.519   mean 0.717   (>= D_sup + 0.02 on the 3-seed mean)
#   abd cross_teaching 0.862 (seed 0 only)
# Time on the shared 2-core machine (load 3-6): bcp 13-26 s; abd (BCP host) 45-63 s (two students + teacher,
# about 3x MT per self-training step), hence marked slow. The test runs seed 0 and asserts the absolute floor of
# methods.md (0.5) and the relative criterion D_sup + 0.02 against the recorded seed-0 supervised value.
LEARNS = {"bcp": 0.863, "abd": 0.845}
D_SUP_SEED0 = 0.711
MIN_DICE = 0.5


@pytest.mark.parametrize("method", [pytest.param("bcp"), pytest.param("abd", marks=pytest.mark.slow)])
def test_learns_on_the_phantom(method, tmp_path):
    cfg = load_config("phantom", ["data.phantom.size=32", "data.patch_size=[32,32]", "data.phantom.patients=8",
                                  "split.labeled=2", "split.val=1", "split.test=2", "model.widths=[8,16,32,64,128]",
                                  "train.iterations=300", "train.amp='off'", "train.eval_every=0", "train.threads=1",
                                  "train.device=cpu", f"method.name={method}", "seed=0"])
    r = train(cfg, out=tmp_path / method, progress=False)
    dice = r["test_last"]["mean"]["dice"]
    assert dice >= MIN_DICE, f"{method}: test Dice {dice:.3f} (measured {LEARNS[method]})"
    assert dice >= D_SUP_SEED0 + 0.02, f"{method}: test Dice {dice:.3f} not above supervised {D_SUP_SEED0} + 0.02"
    stages = {row["stage"] for row in run_rows(tmp_path / method)}
    assert stages == {"pretrain", "selftrain"}
