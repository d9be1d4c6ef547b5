"""The 3D path: volume patches, 3D methods from the same method files, and its user errors."""

import pytest
import torch

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


@pytest.mark.slow
@pytest.mark.parametrize("method,floor", [("supervised", 0.5), ("mean_teacher", 0.5), ("ua_mt", 0.2), ("bcp", 0.15)])
def test_3d_method_learns_on_the_phantom(method, floor, tmp_path):
    # measured (1 thread, fp32, VNet widths 8-128, lr 0.05, 150 steps, seed 0), test Dice of the last checkpoint:
    # supervised 0.785 (15 s), mean_teacher 0.684 (23 s), ua_mt 0.352 (44 s), bcp 0.299 (41 s); an untrained
    # network scores about 0. UA-MT and BCP need more steps than a test can afford to pass 0.5: their floors
    # only show that the 3D path trains them.
    cfg = load_config("phantom", TINY3D + [f"method.name={method}", "train.iterations=150"])
    r = train(cfg, out=tmp_path / "r", progress=False)
    assert r["precision"].startswith("fp32")          # auto picks fp32 for 3D on CPU
    assert r["test_last"]["mean"]["dice"] >= floor
