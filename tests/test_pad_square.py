"""HC18-lite geometry: slices padded to a square keep their aspect ratio at the patch, and predictions are
cropped back to the input's size (labels resized with nearest neighbour, or logits bilinearly)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from skimage import draw
from torch import nn

from ssmis.data.adapter import Adapter, DatasetInfo, Item
from ssmis.data.dataset import build_slice_set
from ssmis.data.resize import crop_box, pad_to_square
from ssmis.eval.inference import label_at_patch, predict_slicewise
from ssmis.models.output import SegOutput


def disc_image(h=60, w=100, r=20):
    mask = np.zeros((h, w), np.int64)
    rr, cc = draw.disk((h // 2, w // 3), r, shape=(h, w))
    mask[rr, cc] = 1
    return mask.astype(np.float32)[None], mask


class OneImage(Adapter):
    name = "one"

    def __init__(self, image, label):
        super().__init__(None)
        self.image, self.label = image, label

    def info(self):
        return DatasetInfo("one", 2, 2, 1, False)

    def items(self, role):
        return [Item("a", "a", True, "a")]

    def load(self, item):
        return {"image": self.image, "label": self.label, "case": "a", "patient": "a", "spacing": None}


class Identity(nn.Module):
    """Logits (−k·x, k·x): the prediction is the thresholded image, so geometry errors show up exactly."""

    def forward(self, x):
        return SegOutput(logits=torch.cat([-8 * (x - 0.5), 8 * (x - 0.5)], 1))


def test_pad_to_square_is_symmetric_and_crop_inverts_it():
    a = np.arange(2 * 3 * 7, dtype=float).reshape(2, 3, 7)
    sq, box = pad_to_square(a)
    assert sq.shape == (2, 7, 7) and box == (2, 0, 3, 7)
    assert (sq[:, :2] == 0).all() and (sq[:, 5:] == 0).all()
    np.testing.assert_array_equal(crop_box(sq, box), a)
    same, box = pad_to_square(np.ones((4, 4)))
    assert box == (0, 0, 4, 4) and same.shape == (4, 4)


def _extent(lab):
    ys, xs = np.nonzero(lab)
    return ys.max() - ys.min() + 1, xs.max() - xs.min() + 1


def test_padded_slices_keep_the_disc_round_and_plain_resizing_does_not():
    img, lab = disc_image()
    kept = build_slice_set(OneImage(img, lab), [Item("a", "a", True, "a")], (64, 64), True, pad_square=True)
    h, w = _extent(kept.labels[0].numpy())
    assert abs(h - w) <= 1 and abs(h - 41 * 64 / 100) <= 2       # one isotropic scale 64/max(H, W)
    squashed = build_slice_set(OneImage(img, lab), [Item("a", "a", True, "a")], (64, 64), True)
    h, w = _extent(squashed.labels[0].numpy())
    assert h > 1.4 * w                                            # 60x100 -> 64x64 stretches it vertically


@pytest.mark.parametrize("upsample", ["labels", "logits"])
def test_prediction_returns_to_the_input_size_through_the_padding(upsample):
    img, lab = disc_image()
    pred = predict_slicewise(Identity(), img, (64, 64), image_order=1, pad_square=True, upsample=upsample)
    assert pred.shape == lab.shape
    dice = 2 * (pred * lab).sum() / (pred.sum() + lab.sum())
    assert dice > 0.97
    vol = np.stack([img[0], img[0]])[None]                         # a 2-slice volume, C×D×H×W
    pred3 = predict_slicewise(Identity(), vol, (64, 64), image_order=1, pad_square=True, upsample=upsample)
    assert pred3.shape == (2, *lab.shape) and (pred3[0] == pred).all()


def test_validation_at_the_patch_scores_the_mask_as_training_sees_it():
    img, lab = disc_image()
    kept = build_slice_set(OneImage(img, lab), [Item("a", "a", True, "a")], (64, 64), True, pad_square=True)
    ref = label_at_patch(lab, (64, 64), pad_square=True)
    np.testing.assert_array_equal(ref, kept.labels[0].numpy())          # the same mask as the training set's
    pred = predict_slicewise(Identity(), img, (64, 64), image_order=0, pad_square=True, at_patch=True)
    assert pred.shape == (64, 64) and (pred == ref).mean() > 0.99
    vol_lab = np.stack([lab, lab, lab], axis=1)                          # H×D×W volume, slices along axis 1
    vol = np.stack([img[0]] * 3, axis=1)[None]
    pred3 = predict_slicewise(Identity(), vol, (64, 64), slice_axis=1, pad_square=True, at_patch=True)
    ref3 = label_at_patch(vol_lab, (64, 64), slice_axis=1, pad_square=True)
    assert pred3.shape == ref3.shape == (64, 3, 64) and (ref3[:, 1] == ref).all()


def test_training_validates_at_the_patch_when_asked():
    from conftest import small_config
    from ssmis.engine.run import setup
    from ssmis.eval.inference import dice_per_class, predict_case

    for where, side in (("original", 32), ("patch", 16)):            # phantom slices are 32², the patch 16²
        cfg = small_config("supervised", 4, f"train.val_at={where}", "data.patch_size=[16,16]")
        trainer = setup(cfg, None, log=lambda m: None)
        vc = trainer.val_cases[0]
        assert vc.label.shape[-2:] == (side, side) and vc.image.shape[-2:] == (32, 32)
        model = trainer.method.eval_model()
        pred = predict_case(model, vc.image, cfg, trainer.device, trainer.precision, at_patch=where == "patch")
        expected = float(np.nanmean(dice_per_class(pred, vc.label, 4)))
        got = trainer.validate()
        assert got == pytest.approx(expected) or (np.isnan(got) and np.isnan(expected))
