"""Training slices at their own size, augmented in SSL4MIS RandomGenerator's order by one resample per batch
(data/resample.py), checked against scipy's rotate/rot90/flip-then-zoom on constructed non-square slices."""

import numpy as np
import pytest
import torch
from scipy import ndimage

from ssmis.data.augment import random_geometry
from ssmis.data.resample import build_source_slice_set, draw_geometry
from ssmis.data.resize import pad_to_square, resize2d

SHAPES = [(216, 256), (154, 224), (256, 216), (97, 131), (128, 128)]
PATCH = (128, 128)


class _Item:
    def __init__(self, i):
        self.id, self.source = f"case{i}", f"case{i}.h5"


def _slices(seed=0, shapes=SHAPES):
    """Noise images and label maps of two off-centre ellipses (classes 1, 2) at several non-square sizes."""
    rng = np.random.default_rng(seed)
    out = []
    for i, (h, w) in enumerate(shapes):
        yy, xx = np.mgrid[:h, :w]
        lab = (((yy - 0.4 * h) / (0.2 * h)) ** 2 + ((xx - 0.55 * w) / (0.15 * w)) ** 2 < 1).astype(np.uint8)
        lab[(yy - 0.65 * h) ** 2 + (xx - 0.35 * w) ** 2 < (0.12 * min(h, w)) ** 2] = 2
        out.append((_Item(i), rng.random((1, h, w)).astype(np.float32), lab, i, len(shapes)))
    return out


def _reference(img, lab, g, i, patch=PATCH, order=0):
    """SSL4MIS RandomGenerator for sample i of the draw g: geometry at the slice's own size, then zoom."""
    if bool(g.rotflip[i]):
        k, ax = int(g.k[i]), int(g.axis[i])
        img, lab = np.flip(np.rot90(img, k), ax), np.flip(np.rot90(lab, k), ax)
    elif bool(g.rotate[i]):
        a = int(g.angle[i])
        img = ndimage.rotate(img, a, order=0, reshape=False)
        lab = ndimage.rotate(lab, a, order=0, reshape=False)
    h, w = img.shape
    return ndimage.zoom(img, (patch[0] / h, patch[1] / w), order=order), ndimage.zoom(lab, (patch[0] / h, patch[1] / w), order=0)


@pytest.mark.parametrize("kind", ["ssl4mis", "bcp"])
def test_matches_rotate_then_zoom_of_the_reference(kind):
    data = _slices()
    s = build_source_slice_set(iter(data), PATCH, labeled=True)
    idx = torch.arange(len(data))
    seen_rot = seen_flip = 0
    for seed in range(30):
        img, lab, _, _ = s.batch(idx, torch.Generator().manual_seed(seed), kind)
        g = draw_geometry(len(idx), torch.Generator().manual_seed(seed), kind)
        seen_rot += int(g.rotate.sum())
        seen_flip += int(g.rotflip.sum())
        assert lab.dtype == torch.int64 and img.shape == (len(data), 1, *PATCH)
        for i, (_, im, lb, _, _) in enumerate(data):
            ref_img, ref_lab = _reference(im[0], lb, g, i)
            assert (lab[i].numpy() == ref_lab).mean() >= 0.999, (seed, i)
            assert (img[i, 0].numpy() == ref_img).mean() >= 0.999, (seed, i)
    assert seen_rot > 20 and seen_flip > 20           # both branches were exercised


def test_resizing_first_moves_foreground_of_rotated_slices():
    """Why augment_at=source exists: resize (anisotropic) then rotate is another map than rotate then resize."""
    data = _slices(shapes=[(154, 224)])
    _, im, lb, _, _ = data[0]
    changed = []
    for angle in (-20, -12, 12, 19):
        ref = ndimage.zoom(ndimage.rotate(lb, angle, order=0, reshape=False), (128 / 154, 128 / 224), order=0)
        old = ndimage.rotate(resize2d(lb, PATCH, 0), angle, order=0, reshape=False)
        fg = (ref > 0) | (old > 0)
        changed.append((ref != old)[fg].mean())
    assert min(changed) > 0.05


def test_no_augmentation_is_the_load_time_resize_and_pad_square_a_shift():
    data = _slices()
    idx = torch.arange(len(data))
    plain = build_source_slice_set(iter(data), PATCH, labeled=True)
    img, lab, _, _ = plain.batch(idx, torch.Generator().manual_seed(0), "none")
    padded = build_source_slice_set(iter(data), PATCH, labeled=True, pad_square=True)
    pimg, plab, _, _ = padded.batch(idx, torch.Generator().manual_seed(0), "none")
    for i, (_, im, lb, _, _) in enumerate(data):
        assert np.array_equal(lab[i].numpy(), resize2d(lb, PATCH, 0))
        assert np.array_equal(img[i].numpy(), resize2d(im, PATCH, 0))
        assert np.array_equal(plab[i].numpy(), resize2d(pad_to_square(lb)[0], PATCH, 0))
        assert np.array_equal(pimg[i].numpy(), resize2d(pad_to_square(im)[0], PATCH, 0))


def test_bilinear_images_keep_integer_labels():
    data = _slices()
    s = build_source_slice_set(iter(data), PATCH, labeled=True, image_order=1)
    idx = torch.arange(len(data))
    img, lab, _, _ = s.batch(idx, torch.Generator().manual_seed(0), "none")
    for i, (_, im, lb, _, _) in enumerate(data):        # zoom only: scipy's order-1 zoom, corners aligned
        ref = ndimage.zoom(im[0].astype(np.float64), (128 / im.shape[1], 128 / im.shape[2]), order=1)
        assert np.allclose(img[i, 0].numpy(), ref, atol=1e-5)
    for seed in range(5):
        img, lab, _, _ = s.batch(idx, torch.Generator().manual_seed(seed), "ssl4mis")
        assert lab.dtype == torch.int64 and set(lab.unique().tolist()) <= {0, 1, 2}
        assert torch.isfinite(img).all() and img.min() >= 0 and img.max() <= 1


def test_a_batch_is_a_function_of_its_generator_only():
    data = _slices()
    s = build_source_slice_set(iter(data), PATCH, labeled=True)
    idx = torch.tensor([3, 0, 0, 4])
    torch.manual_seed(1)
    a = s.batch(idx, torch.Generator().manual_seed(7), "ssl4mis", intensity=0.1)
    torch.manual_seed(2)                                 # the global RNG plays no part
    b = s.to(torch.device("cpu")).batch(idx, torch.Generator().manual_seed(7), "ssl4mis", intensity=0.1)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    assert not torch.equal(a[0], s.batch(idx, torch.Generator().manual_seed(8), "ssl4mis", intensity=0.1)[0])


def test_draws_are_those_of_the_patch_path():
    """Same generator, same draws: slices already at the patch size get the patch path's rot90/flips."""
    data = _slices(shapes=[PATCH] * 8)
    s = build_source_slice_set(iter(data), PATCH, labeled=True)
    idx = torch.arange(8)
    img, lab, _, _ = s.batch(idx, torch.Generator().manual_seed(3), "ssl4mis")
    old_img, old_lab = random_geometry(torch.from_numpy(np.stack([d[1] for d in data])),
                                       torch.from_numpy(np.stack([d[2] for d in data])).long(),
                                       torch.Generator().manual_seed(3), "ssl4mis")
    g = draw_geometry(8, torch.Generator().manual_seed(3), "ssl4mis")
    flips = torch.nonzero(g.rotflip).flatten()
    assert len(flips) > 0
    assert torch.equal(lab[flips], old_lab[flips]) and torch.equal(img[flips], old_img[flips])
