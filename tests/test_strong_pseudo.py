"""Building blocks of weak-to-strong methods: the strong view (intensity only, geometry kept, seeded), CutMix
boxes and pasting, confidence pseudo-labels and the losses masked by them."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from scipy import ndimage

from ssmis.data.strong import brightness_contrast, cutmix_box, gaussian_blur, paste, strong_view
from ssmis.losses.pseudo import masked_cross_entropy, pseudo_label, pseudo_label_loss



def images(b=6, c=1, size=32, seed=0):
    """Smooth structured images in [0, 1] (a bright disc on a ramp), plus a little noise."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32), indexing="ij")
    disc = (((yy - size * 0.4) ** 2 + (xx - size * 0.6) ** 2) < (size * 0.2) ** 2).float()
    base = 0.2 + 0.3 * xx / size + 0.4 * disc
    x = base.expand(b, c, size, size) + 0.02 * torch.rand(b, c, size, size, generator=g)
    return x.clamp(0, 1).contiguous()


# ---- strong view -----------------------------------------------------------------------------------

def test_strong_view_keeps_shape_dtype_and_is_seeded():
    x = images()
    torch.manual_seed(3)
    a = strong_view(x)
    torch.manual_seed(3)
    b = strong_view(x)
    torch.manual_seed(4)
    c = strong_view(x)
    assert a.shape == x.shape and a.dtype == x.dtype and a.device == x.device
    assert torch.equal(a, b)                       # deterministic under torch.manual_seed (global RNG)
    assert not torch.equal(a, c)
    assert not torch.equal(a, x)                   # intensities change
    assert a.min() >= 0 and a.max() <= 1           # clipped to [0, 1] like PIL's [0, 255]
    # channels_last input keeps its values
    torch.manual_seed(3)
    assert torch.allclose(strong_view(x.contiguous(memory_format=torch.channels_last)), a)


def test_jitter_is_a_per_sample_monotone_affine_map():
    """Brightness/contrast without clipping: s = a·x + b per sample with a > 0 (geometry and ordering kept)."""
    x = images(b=16)
    torch.manual_seed(0)
    s = brightness_contrast(x, 0.5, 0.5, p=1.0, clip=None)
    changed = 0
    for xi, si in zip(x.flatten(1), s.flatten(1)):
        design = torch.stack([xi, torch.ones_like(xi)], 1).double()
        coef = torch.linalg.lstsq(design, si[:, None].double()).solution.flatten()
        assert coef[0] > 0
        assert torch.allclose(design @ coef, si.double(), atol=1e-5)
        assert 0.25 - 1e-6 <= coef[0] <= 2.25 + 1e-6         # product of two factors in [0.5, 1.5]
        changed += not torch.allclose(si, xi)
    assert changed == 16


def test_brightness_and_contrast_factors():
    x = images(b=200)
    torch.manual_seed(0)
    bright = brightness_contrast(x, 0.5, 0.0, p=1.0, clip=None)
    ratio = (bright / x).flatten(1)
    assert torch.allclose(ratio, ratio[:, :1].expand_as(ratio), atol=1e-5)        # one factor per sample
    f = ratio[:, 0]
    assert f.min() >= 0.5 and f.max() <= 1.5 and f.min() < 0.6 and f.max() > 1.4
    torch.manual_seed(0)
    contr = brightness_contrast(x, 0.0, 0.5, p=1.0, clip=None)
    assert torch.allclose(contr.mean((1, 2, 3)), x.mean((1, 2, 3)), atol=1e-5)      # contrast keeps the mean
    fc = contr.std((1, 2, 3)) / x.std((1, 2, 3))
    assert fc.min() >= 0.5 - 1e-4 and fc.max() <= 1.5 + 1e-4
    # probability p: about 80 % of the samples are jittered
    torch.manual_seed(1)
    y = brightness_contrast(images(b=2000, size=8), p=0.8)
    frac = (y != images(b=2000, size=8)).flatten(1).any(1).float().mean()
    assert abs(float(frac) - 0.8) < 0.04


def test_gaussian_blur_matches_scipy_and_keeps_geometry():
    x = images(b=2, c=2)
    torch.manual_seed(0)
    y = gaussian_blur(x, sigma=(1.3, 1.3), p=1.0)
    ref = torch.from_numpy(ndimage.gaussian_filter(x.numpy(), sigma=(0, 0, 1.3, 1.3), mode="nearest", truncate=3.0))
    assert torch.allclose(y, ref, atol=1e-5)
    # the centre of mass of a blob does not move
    blob = torch.zeros(1, 1, 33, 33)
    blob[0, 0, 10:15, 20:23] = 1
    yy, xx = torch.meshgrid(torch.arange(33.0), torch.arange(33.0), indexing="ij")
    for _ in range(5):
        b = gaussian_blur(blob, sigma=(0.1, 2.0), p=1.0)
        com = lambda t: torch.stack([(t * yy).sum() / t.sum(), (t * xx).sum() / t.sum()])  # noqa: E731
        assert torch.allclose(com(b[0, 0]), com(blob[0, 0]), atol=1e-4)
    # probability p and float32 arithmetic under bf16 autocast
    torch.manual_seed(0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z = gaussian_blur(images(b=1000, size=8), p=0.5)
    assert z.dtype == torch.float32
    assert abs(float((z != images(b=1000, size=8)).flatten(1).any(1).float().mean()) - 0.5) < 0.05


# ---- CutMix ----------------------------------------------------------------------------------------

def test_cutmix_boxes_area_aspect_probability():
    """Over 10^4 draws: ≈ 50 % of the samples get a box; each box is a rectangle whose area lies in
    [0.02, 0.4]·HW and aspect h/w in [0.3, 1/0.3] up to the integer truncation of its sides; corners cover
    the image."""
    h, w = 48, 64
    torch.manual_seed(0)
    box = cutmix_box(10_000, (h, w), p=0.5)
    assert box.shape == (10_000, h, w) and box.dtype == torch.bool
    has = box.flatten(1).any(1)
    assert abs(float(has.float().mean()) - 0.5) < 0.02
    b = box[has]
    bh = b.any(2).sum(1).double()
    bw = b.any(1).sum(1).double()
    area = b.flatten(1).sum(1).double()
    assert torch.equal(area, bh * bw)                                  # a filled rectangle
    hw = h * w
    # the continuous box (w_c, h_c) with w ≤ w_c < w + 1, h ≤ h_c < h + 1 has area and aspect in range
    assert (area <= 0.4 * hw + 1e-9).all() and ((bw + 1) * (bh + 1) > 0.02 * hw).all()
    assert (bh / (bw + 1) < 1 / 0.3).all() and ((bh + 1) / bw > 0.3).all()
    frac = area / hw
    assert frac.min() < 0.03 and frac.max() > 0.37 and 0.17 < float(frac.mean()) < 0.22   # ~U(0.02, 0.4)
    assert box.any(0).all()                                            # every pixel is covered by some box
    torch.manual_seed(0)
    assert torch.equal(cutmix_box(10_000, (h, w), p=0.5), box)        # seeded


def test_paste_swaps_exactly_the_box():
    torch.manual_seed(0)
    box = cutmix_box(8, (16, 16), p=1.0)
    img, other = torch.rand(8, 3, 16, 16), torch.rand(8, 3, 16, 16) + 2
    out = paste(img, other, box)
    inside = box[:, None].expand_as(img)
    assert torch.equal(out[inside], other[inside]) and torch.equal(out[~inside], img[~inside])
    lab, lab2 = torch.zeros(8, 16, 16, dtype=torch.long), torch.ones(8, 16, 16, dtype=torch.long)
    assert torch.equal(paste(lab, lab2, box), box.long())
    assert torch.equal(paste(img, other, torch.zeros_like(box)), img)


# ---- pseudo-labels and masked losses --------------------------------------------------------------

def test_pseudo_label_mask_is_max_prob_at_least_tau():
    torch.manual_seed(0)
    probs = torch.rand(3, 4, 5, 6).softmax(1) ** 0.2
    probs = probs / probs.sum(1, keepdim=True)
    probs[0, :, 0, 0] = torch.tensor([0.95, 0.05, 0.0, 0.0])          # exactly at τ: kept
    probs.requires_grad_(True)
    labels, mask = pseudo_label(probs, 0.95)
    assert torch.equal(labels, probs.argmax(1)) and mask.dtype == torch.bool
    assert torch.equal(mask, probs.max(1).values >= 0.95) and bool(mask[0, 0, 0])
    assert not labels.requires_grad and not mask.requires_grad
    tau = float(probs.detach().max(1).values.median())
    assert 0.2 < float(pseudo_label(probs, tau)[1].float().mean()) < 0.8


def test_masked_cross_entropy_and_zero_gradient_outside_the_mask():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 4, 4, requires_grad=True)
    target = torch.randint(0, 3, (2, 4, 4))
    mask = torch.rand(2, 4, 4) > 0.5
    loss = masked_cross_entropy(logits, target, mask)
    ce = F.cross_entropy(logits, target, reduction="none")
    assert torch.allclose(loss, (ce * mask).sum() / 32)                 # denominator: all pixels
    loss.backward()
    assert (logits.grad.movedim(1, -1)[~mask] == 0).all() and (logits.grad.movedim(1, -1)[mask] != 0).any()
    assert torch.allclose(pseudo_label_loss(logits, target, mask, "ce"), loss)
    with pytest.raises(ValueError):
        pseudo_label_loss(logits, target, mask, "mse")


def test_ignore_dice_equals_reference_code_and_kept_pixels_only():
    """pseudo_label_loss('dice') = UniMatch's DiceLoss(ignore=...) (re-written from its formula) = the SSL4MIS
    Dice on the kept pixels only."""
    from ssmis.losses.seg import dice_loss

    torch.manual_seed(0)
    logits = torch.randn(2, 4, 6, 6)
    labels = torch.randint(0, 4, (2, 6, 6))
    keep = torch.rand(2, 6, 6) > 0.4
    got = pseudo_label_loss(logits, labels, keep)
    probs = logits.softmax(1)
    ignore = ~keep
    ref = 0.0
    for k in range(4):
        p, g = probs[:, k][~ignore], (labels == k).float()[~ignore]
        ref += 1 - (2 * (p * g).sum() + 1e-5) / ((g * g).sum() + (p * p).sum() + 1e-5)
    assert math.isclose(float(got), float(ref) / 4, rel_tol=1e-6)
    kept_probs = probs.movedim(1, -1)[keep].T[None, :, :, None]          # 1×K×N×1 of the kept pixels
    assert math.isclose(float(got), float(dice_loss(kept_probs, labels[keep][None, :, None])), rel_tol=1e-6)
