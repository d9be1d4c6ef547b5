"""The 3D path: volume patches, 3D methods from the same method files, and its user errors."""

import numpy as np
import pytest
import torch
from scipy import ndimage

from ssmis.config import load_config
from ssmis.engine.run import train
from ssmis.errors import UserError

TINY3D = ["data.phantom.slices=16", "data.phantom.size=32", "data.phantom.patients=8", "data.patch_size=[16,32,32]",
          "model.name=vnet", "model.widths=[8,16,32,64,128]", "optim.lr=0.05", "split.labeled=2", "split.val=1", "split.test=2",
          "train.labeled_bs=2", "train.unlabeled_bs=2", "train.threads=1", "train.eval_every=0",
          "data.fg_fraction=0.5"]



def test_2d_model_on_3d_patch_is_a_clear_error(tmp_path):
    cfg = load_config("phantom", ["data.patch_size=[16,32,32]", "model.name=unet2d"])
    with pytest.raises(UserError, match="unet2d is a 2D model but data.patch_size .* is 3D.*slice-wise"):
        train(cfg, out=tmp_path / "r", progress=False)


def test_3d_model_on_2d_patch_is_a_clear_error(tmp_path):
    cfg = load_config("phantom", ["data.patch_size=[32,32]", "model.name=vnet"])
    with pytest.raises(UserError, match="vnet is a 3D model.*needs a 3D data.patch_size"):
        train(cfg, out=tmp_path / "r", progress=False)


def test_patch_larger_than_every_volume_is_a_clear_error(tmp_path):
    cfg = load_config("phantom", TINY3D + ["data.patch_size=[16,64,32]", "train.iterations=2"])
    with pytest.raises(UserError, match=r"larger than every volume along axis 1 \(largest 32\)"):
        train(cfg, out=tmp_path / "r", progress=False)


def test_small_volumes_are_padded_and_patches_centre_on_foreground():
    from ssmis.data.dataset import VolumeSet

    big = torch.zeros(1, 16, 32, 32)
    small = torch.ones(1, 6, 20, 32)               # smaller than the patch in D and H: zero-padded
    lab_big = torch.zeros(16, 32, 32, dtype=torch.long)
    lab_big[12, 28, 3] = 2                         # a single foreground voxel near a corner
    vs = VolumeSet([big, small], [lab_big, torch.ones(6, 20, 32, dtype=torch.long)], ["a", "b"], (8, 24, 16), 1.0)
    g = torch.Generator().manual_seed(0)
    for _ in range(10):
        img, lab = vs._crop(0, g)
        assert img.shape == (1, 8, 24, 16) and (lab == 2).sum() == 1      # fg_fraction 1: always contains it
        img, lab = vs._crop(1, g)
        assert img.shape == (1, 8, 24, 16)
        assert img.sum() == 6 * 20 * 16 and lab.sum() == 6 * 20 * 16   # all of the small volume, zeros around
    img, lab, pos, _ = vs.batch(torch.tensor([0, 1]), g, "ssl4mis")
    assert img.shape == (2, 1, 8, 24, 16) and lab.shape == (2, 8, 24, 16) and (pos == -1).all()


SPHERE = ["data.layout=sphere", "data.patch_size=[16,16,16]", "model.name=vnet", "model.widths=[4,8,16,32,64]",
          "train.labeled_bs=4", "train.unlabeled_bs=4", "train.threads=1", "train.eval_every=0",
          "data.fg_fraction=0.5", "train.iterations=300"]


def _sphere_dice(method: str, seed: int, tmp_path) -> float:
    cfg = load_config("phantom", SPHERE + [f"method.name={method}", f"seed={seed}"])
    r = train(cfg, out=tmp_path / f"{method}-{seed}", progress=False)
    assert r["precision"] == "fp32"                 # auto: fp32, contiguous for 3D on CPU
    return r["test_last"]["mean"]["dice"]


def test_sphere_phantom_follows_the_spec():
    from ssmis.data.adapter import make_adapter
    from ssmis.data.sphere import SHAPE

    ad = make_adapter("sphere", None)
    sp = ad.protocol_splits(2, 0)
    assert (len(sp.labeled), len(sp.unlabeled), len(sp.val), len(sp.test)) == (2, 32, 4, 16)
    items = {it.id: it for it in ad.items("train")}
    clean = ad.load(items[sp.labeled[0]])
    noisy = [ad.load(items[c]) for c in sp.test]
    assert clean["image"].shape == (1, *SHAPE) and set(np.unique(clean["label"])) == {0, 1}
    fg = clean["label"].mean()
    assert 0.02 < fg < 0.6                           # one ellipsoid of semi-axes 4-8 in 16x24x24

    def noise(s):                                     # residual around the blurred two-level image
        im, lab = s["image"][0], s["label"]
        inner = ndimage.binary_erosion(lab, iterations=2)
        outer = ~ndimage.binary_dilation(lab, iterations=2)
        return float(np.mean([im[inner].std(), im[outer].std()]))
    assert noise(clean) < 0.07 and np.mean([noise(s) for s in noisy]) > 0.1
    again = make_adapter("sphere", None).load(items[sp.labeled[0]])
    assert np.array_equal(again["image"], clean["image"])     # deterministic


@pytest.mark.slow
def test_bcp_beats_labels_only_in_3d_on_the_sphere_phantom(tmp_path):
    # methods.md "learns": 300 steps, 4 + 4, seeds 0-2, D_method >= D_sup + 0.02. Measured (1 thread, VNet n_filters 4,
    # patch 16^3): supervised 0.829 / 0.843 / 0.848 (10 s each), BCP 0.874 / 0.928 / 0.899 (16 s each).
    sup = np.mean([_sphere_dice("supervised", s, tmp_path) for s in (0, 1, 2)])
    bcp = np.mean([_sphere_dice("bcp", s, tmp_path) for s in (0, 1, 2)])
    assert sup >= 0.5 and bcp >= sup + 0.02, (sup, bcp)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["mean_teacher", "ua_mt", "cps"])
def test_3d_method_learns_on_the_sphere_phantom(method, tmp_path):
    # seed 1, measured: mean_teacher 0.892 (16 s), ua_mt 0.890 (27 s), cps 0.656 (25 s); labels-only 0.843.
    # On this easy binary task (and with the tiny cardiac phantom: seed 0 0.785, seeds 1-2 0.36 for labels-only)
    # single seeds are noisy, so these only assert the spec's floor: the method trains in 3D.
    assert _sphere_dice(method, 1, tmp_path) >= 0.5


@pytest.mark.parametrize("layout", ["la_h5", "nnunet"])
def test_la_and_nnunet_layouts_feed_3d_training_and_sliding_window_eval(layout, tmp_path):
    from ssmis.data.export import write_phantom

    root = write_phantom(tmp_path / "data", layout, patients=6, slices=16, size=32)
    cfg = load_config("phantom", [f"data.layout={layout}", f"data.root={root}", "data.patch_size=[16,16,16]",
                                  "model.name=vnet", "model.widths=[4,8,16,32,64]", "split.labeled=2",
                                  "split.val=1", "split.test=1", "train.labeled_bs=2", "train.unlabeled_bs=2",
                                  "train.threads=1", "train.iterations=4", "train.eval_every=2",
                                  "method.name=mean_teacher"])
    r = train(cfg, out=tmp_path / "r", progress=False)
    rows = r["test_last"]
    assert 0.0 <= rows["mean"]["dice"] <= 1.0
    if layout == "nnunet":                       # spacing known: distances also in mm
        assert rows["mean"]["hd95_mm"] == rows["mean"]["hd95_mm"]     # not NaN
