"""SPCL pieces (methods.md "SPCL", Test it by 1-3): self-paced weights and their schedule, the supervised contrastive
loss against a brute-force loop, meta-labels (partition groups, patient and phase) and the partition sampler; the
encoder split and projection head; the semi-supervised regime (method `spcl`)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import TINY_UNET, random_batches, tiny_method
from ssmis.data.adapter import Item
from ssmis.data.meta_labels import meta_label_values, partition_labels, slice_origin
from ssmis.data.partition_sampler import PartitionSampler, view_generators
from ssmis.errors import UserError
from ssmis.losses.supcon import (epoch_of, gamma_at, pair_losses, self_paced_weights, supcon_loss, supcon_views,
                                 weighted_average)

ELL = torch.tensor([0.5, 1.0, 2.0, 4.0, 8.0])


# ---- 1. self-paced weights and schedule --------------------------------------------------------------

def test_hard_and_soft_weights_admit_more_pairs_as_gamma_grows():
    hard = [int(self_paced_weights(ELL, g, "hard").gt(0).sum()) for g in (1, 2, 4, 8)]
    soft = [int(self_paced_weights(ELL, g, "soft").gt(0).sum()) for g in (1, 2, 4, 8)]
    assert hard == [2, 3, 4, 5]
    assert soft == [1, 2, 3, 4]
    assert torch.allclose(self_paced_weights(ELL, 4, "soft"), torch.tensor([0.875, 0.75, 0.5, 0.0, 0.0]))
    # along a schedule the admitted count never decreases
    counts = [int(self_paced_weights(ELL, gamma_at(e, 80, 0.4, 9.0), w).gt(0).sum())
              for w in ("hard", "soft") for e in range(80)]
    assert all(b >= a for a, b in zip(counts[:80], counts[1:80])) and all(b >= a for a, b in zip(counts[80:], counts[81:]))
    assert self_paced_weights(ELL, 1.0, "none").eq(1).all()


def test_inversesquare_schedule_and_last_epoch():
    assert gamma_at(0, 80, 5, 60) == 5
    assert gamma_at(20, 80, 5, 60) == pytest.approx(32.5)
    assert gamma_at(79, 80, 5, 60) == pytest.approx(59.655, abs=5e-4)
    assert gamma_at(40, 80, 0, 1, "linear") == 0.5 and gamma_at(40, 80, 0, 1, "square") == 0.25
    # an 80-epoch run of T steps evaluates epochs 0 ... 79 only: gamma(80) = 60 is never used
    total = 1143
    epochs = [epoch_of(t, total, 80) for t in range(total)]
    assert epochs[0] == 0 and epochs[-1] == 79 and sorted(set(epochs)) == list(range(80))
    assert max(gamma_at(e, 80, 5, 60) for e in epochs) < 60


def test_large_gamma_hard_weights_equal_plain_supcon():
    g = torch.Generator().manual_seed(0)
    z1, z2 = (F.normalize(torch.randn(5, 8, generator=g), dim=1) for _ in range(2))
    labels = torch.tensor([0, 1, 0, 2, 1])
    plain = supcon_loss(z1, z2, labels, 0.07)
    ell, pos = pair_losses(torch.cat([z1, z2]), torch.cat([labels, labels]), 0.07)
    hard = supcon_loss(z1, z2, labels, 0.07, gamma=float(ell[pos].max()) + 1e-3, weighting="hard")
    assert torch.equal(plain.loss, hard.loss) and hard.admitted == 1.0
    low = supcon_loss(z1, z2, labels, 0.07, gamma=float(ell[pos].median()), weighting="hard")
    assert 0 < low.admitted < 1 and low.loss < plain.loss


def test_weighted_average_of_meta_label_losses():
    assert weighted_average([2.0, 4.0, 4.0], [1, 0.1, 0.1]) == pytest.approx(2.8 / 1.2, abs=1e-4)
    assert weighted_average([2.0, 4.0, 4.0], [1, 0.1, 0.1]) == pytest.approx(2.3333, abs=1e-4)


# ---- 2. SupCon value ---------------------------------------------------------------------------------

def test_supcon_equals_brute_force_loop():
    g = torch.Generator().manual_seed(3)
    z = F.normalize(torch.randn(6, 5, generator=g, dtype=torch.float64), dim=1)
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    tau = 0.07
    for gamma, weighting in ((math.inf, "none"), (3.0, "hard"), (6.0, "soft")):
        total = 0.0
        for i in range(6):
            den = sum(math.exp(float(z[i] @ z[a]) / tau) for a in range(6) if a != i)
            positives = [j for j in range(6) if j != i and labels[j] == labels[i]]
            acc = 0.0
            for j in positives:
                ell = -math.log(math.exp(float(z[i] @ z[j]) / tau) / den)
                w = {"none": 1.0, "hard": float(ell <= gamma), "soft": max(0.0, 1 - ell / gamma)}[weighting]
                acc += w * ell
            total += acc / len(positives)
        r = supcon_views(z, labels, tau, gamma, weighting)
        assert r.loss.dtype == torch.float64
        assert float(r.loss) == pytest.approx(total / 6, abs=1e-8)


def test_supcon_gradient_flows_and_weights_do_not():
    g = torch.Generator().manual_seed(1)
    z1 = torch.randn(4, 8, generator=g, requires_grad=True)
    z2 = torch.randn(4, 8, generator=g, requires_grad=True)
    r = supcon_loss(F.normalize(z1, dim=1), F.normalize(z2, dim=1), torch.tensor([0, 0, 1, 1]), weighting="soft",
                    gamma=5.0)
    r.loss.backward()
    assert z1.grad.abs().sum() > 0 and z2.grad.abs().sum() > 0
    assert 0 < r.mean_weight <= 1 and r.plain > float(r.loss.detach())


# ---- 3. meta-labels and sampler ----------------------------------------------------------------------

def test_partition_groups():
    assert partition_labels(np.arange(10), np.full(10, 10), 3).tolist() == [0, 0, 0, 1, 1, 1, 1, 2, 2, 2]
    assert partition_labels(np.arange(10), np.full(10, 10), 3, "floor").tolist() == [0, 0, 0, 0, 1, 1, 1, 1, 2, 2]
    assert partition_labels(np.arange(16), np.full(16, 16), 8).tolist() == [i // 3 for i in range(16)]
    with pytest.raises(ValueError):
        partition_labels([-1], [1], 3)


def test_partition_labels_of_a_constructed_phantom_volume():
    """A 10-slice phantom volume cut into training slices carries exactly the spec's groups."""
    from ssmis.config import load_config
    from ssmis.data.adapter import make_adapter
    from ssmis.data.dataset import build_slice_set

    cfg = load_config("phantom", ["data.phantom.slices=10", "data.phantom.size=16", "data.phantom.patients=4"])
    adapter = make_adapter("phantom", None, cfg.data)
    items = adapter.items("train")[:2]
    for at in ("source", "patch"):
        data = build_slice_set(adapter, items, (16, 16), False, augment_at=at)
        origins = [slice_origin(next(i for i in items if i.id == c)) for c in data.cases]
        part = meta_label_values("partition", origins, data.slice_index, data.num_slices)
        assert part.tolist() == [0, 0, 0, 1, 1, 1, 1, 2, 2, 2] * 2
        assert meta_label_values("scan", origins, data.slice_index, data.num_slices).tolist() == [0] * 10 + [1] * 10
        assert meta_label_values("self", origins, data.slice_index, data.num_slices).tolist() == list(range(20))
        assert meta_label_values("item.index", origins, data.slice_index, data.num_slices).tolist() == [0] * 10 + [1] * 10
        with pytest.raises(UserError, match="no cardiac phase"):
            meta_label_values("phase", origins, data.slice_index, data.num_slices)


def _acdc_slice(patient: str, frame: int, k: int, n: int) -> Item:
    return Item(f"{patient}_frame{frame:02d}_slice_{k + 1}", patient, True, "x.h5",
                {"slice_index": k, "num_slices": n, "frame": frame})


def test_ed_and_es_scans_share_the_patient_label():
    items = [_acdc_slice("patient001", 1, k, 4) for k in range(4)] + [_acdc_slice("patient001", 12, k, 4)
                                                                       for k in range(4)]
    items += [_acdc_slice("patient002", 1, k, 3) for k in range(3)] + [_acdc_slice("patient002", 9, k, 3)
                                                                       for k in range(3)]
    origins = [slice_origin(i) for i in items]
    pos = torch.tensor([i.meta["slice_index"] for i in items])
    num = torch.tensor([i.meta["num_slices"] for i in items])
    patient = meta_label_values("patient", origins, pos, num).tolist()
    scan = meta_label_values("scan", origins, pos, num).tolist()
    phase = meta_label_values("phase", origins, pos, num).tolist()
    assert patient == [0] * 8 + [1] * 6
    assert scan == [0] * 4 + [1] * 4 + [2] * 3 + [3] * 3
    assert phase == [0] * 4 + [1] * 4 + [0] * 3 + [1] * 3
    # nnU-Net-style volume ids: the patient is the part before _frame
    vol = slice_origin(Item("patient007_frame04", "patient007_frame04", True, "x.nii.gz", {}))
    assert (vol.scan, vol.patient, vol.frame) == ("patient007_frame04", "patient007", 4)


def test_sampler_one_slice_per_partition_per_scan():
    # 6 scans of 7-12 slices
    scans, parts = [], []
    for s, n in enumerate([7, 8, 9, 10, 11, 12]):
        scans += [s] * n
        parts += partition_labels(np.arange(n), np.full(n, n), 3).tolist()
    scans, parts = torch.tensor(scans), torch.tensor(parts)
    sampler = PartitionSampler(scans, parts, 4, seed=0)
    seen = set()
    for step in range(20):
        idx = sampler.at(step)
        assert len(idx) == 4 * 3 == sampler.max_batch
        picked = scans[idx].tolist()
        assert len(set(picked)) == 4
        for s in set(picked):
            assert sorted(parts[idx][scans[idx] == s].tolist()) == [0, 1, 2]
        assert torch.equal(idx, PartitionSampler(scans, parts, 4, seed=0).at(step))     # a function of the step
        seen.add(tuple(idx.tolist()))
    assert len(seen) == 20
    assert not torch.equal(sampler.at(0), PartitionSampler(scans, parts, 4, seed=1).at(0))
    g1, g2 = view_generators(0, 5)
    assert not torch.equal(torch.rand(3, generator=g1), torch.rand(3, generator=g2))
    with pytest.raises(ValueError):
        PartitionSampler(scans, parts, 7, seed=0)


# ---- encoder split and head --------------------------------------------------------------------------

@pytest.mark.parametrize("name,prefix", [("unet2d", "enc."), ("resnet34_unet", "encoder.")])
def test_encoder_keys_are_the_encoder(name, prefix):
    from ssmis.models.resnet import ResNet34UNet
    from ssmis.models.unet import UNet2D
    from ssmis.spcl.encoder import encoder_keys

    net = UNet2D(1, 4, **TINY_UNET) if name == "unet2d" else ResNet34UNet(1, 4, widths=(4, 8, 16, 32, 64),
                                                                            blocks=(1, 1, 1, 1))
    keys = encoder_keys(net, torch.zeros(2, 1, 32, 32))
    sd = net.state_dict()
    assert keys and all(k.startswith(prefix) for k in keys)
    assert set(keys) == {k for k in sd if k.startswith(prefix)}
    assert net.training                       # mode restored


def test_projection_head_is_normalised():
    from ssmis.spcl.encoder import ProjectionHead

    head = ProjectionHead(16, 32)
    z = head(torch.randn(3, 16, 4, 4))
    assert z.shape == (3, 32) and torch.allclose(z.norm(dim=1), torch.ones(3))


# ---- the semi-supervised regime (method spcl) --------------------------------------------------------

def test_spcl_method_step_trains_encoder_and_heads():
    from ssmis.methods.spcl import SPCL

    method, ctx = tiny_method(SPCL, meta_labels=[{"name": "partition"}, {"name": "self", "weight": 0.5}])
    assert set(ctx.modules) == {"student", "head_partition", "head_self"}
    lb, ub = random_batches(nl=2, nu=4, size=32)
    ub.slice_index, ub.num_slices = torch.tensor([0, 3, 5, 9]), torch.full((4,), 10)
    out = method.train_step(lb, ub, 0)
    out.loss.backward()
    assert math.isfinite(float(out.loss.detach())) and float(out.logs["con"]) > 0
    for name in ("student", "head_partition", "head_self"):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in ctx.modules[name].parameters()), name
    assert method.labels("partition", ub).tolist() == [0, 1, 1, 2]
    ub.slice_index = torch.full((4,), -1)
    with pytest.raises(UserError, match="partition"):
        method.train_step(lb, ub, 1)
    with pytest.raises(UserError, match="unlabelled"):
        method.train_step(lb, None, 1)


def test_spcl_method_rejects_meta_labels_a_batch_does_not_carry():
    from ssmis.config import load_config

    with pytest.raises(UserError, match="method.meta_labels"):
        load_config("phantom", ["method.name=spcl", "method.meta_labels=[{name: patient}]"])
