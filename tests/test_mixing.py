"""Copy-paste and patch-displacement building blocks (ssmis.data.mixing): BCP's box mask and bidirectional
mixing ("BCP", Test it by 1-2), ABD's patch grid, confidences, class profiles and displacements ("ABD",
Test it by 1-2, on tensors built by hand)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ssmis.data.mixing import (abd_i, abd_i_indices, abd_r, abd_r_indices, bidirectional_mix, box_mask, box_side,
                               from_patches, mix, patch_confidence, patch_logit_mean, profile_kl, random_box,
                               swap_patches, to_patches)



def zero_box(mask: torch.Tensor) -> tuple[slice, ...]:
    """The bounding box of the zeros of a mask, asserting that the zeros fill it exactly."""
    idx = torch.nonzero(mask == 0)
    lo, hi = idx.min(0).values, idx.max(0).values + 1
    box = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
    assert (mask[box] == 0).all() and int((mask == 0).sum()) == int((mask[box] == 0).numel())
    return box


# ---- BCP box mask --------------------------------------------------------------------------------------

@pytest.mark.parametrize("side,box", [(256, 170), (128, 85), (32, 21)])
def test_box_mask_has_one_zero_box_of_two_thirds_the_side(side, box):
    torch.manual_seed(0)
    for _ in range(20):
        m = box_mask((side, side))
        assert m.shape == (side, side) and m.dtype == torch.float32
        assert set(m.unique().tolist()) == {0.0, 1.0}
        b = zero_box(m)
        assert [s.stop - s.start for s in b] == [box, box]
        assert all(0 <= s.start and s.stop <= side for s in b)           # fully inside the image


def test_box_side_rule():
    """⌊⅔·side⌋ as the reference's int(side·2/3): ACDC 170, ACDC-lite 85, LA 74×74×53; 96 gives 64, not 63."""
    assert [box_side(s) for s in (256, 128, 112, 80, 96, 32)] == [170, 85, 74, 53, 64, 21]


@pytest.mark.parametrize("side,draws", [(32, 600), (128, 3000)])
def test_box_offsets_cover_all_valid_positions(side, draws):
    torch.manual_seed(0)
    box = box_side(side)
    starts = [set(), set()]
    for _ in range(draws):
        b = random_box((side, side))
        for axis in (0, 1):
            starts[axis].add(b[axis].start)
    assert starts[0] == starts[1] == set(range(side - box + 1))            # 0 … side − box, both ends included


def test_box_mask_3d_is_a_dxhxw_box():
    torch.manual_seed(0)
    m = box_mask((80, 112, 112))                                          # LA patch, array order D×H×W
    assert [s.stop - s.start for s in zero_box(m)] == [53, 74, 74]


def test_mix_swaps_exactly_the_box_in_both_directions():
    torch.manual_seed(0)
    a, b = torch.rand(3, 2, 16, 16), torch.rand(3, 2, 16, 16)
    m = box_mask((16, 16))
    box = (slice(None), slice(None)) + zero_box(m)
    ab, ba = mix(a, b, m), mix(b, a, m)
    inside = torch.zeros(16, 16, dtype=torch.bool)
    inside[zero_box(m)] = True
    # inside the box the other image, outside the own one, for every sample and channel (one shared box)
    assert torch.equal(ab[box], b[box]) and torch.equal(ba[box], a[box])
    assert torch.equal(ab[..., ~inside], a[..., ~inside]) and torch.equal(ba[..., ~inside], b[..., ~inside])
    assert torch.equal(ab, a * m + b * (1 - m))


def test_mixed_label_is_the_mask_weighted_combination():
    torch.manual_seed(0)
    y1, y2 = torch.randint(0, 4, (2, 12, 12)), torch.randint(0, 4, (2, 12, 12))
    m = box_mask((12, 12))
    out = mix(y1, y2, m)
    assert out.dtype == y1.dtype
    assert torch.equal(out, (y1 * m + y2 * (1 - m)).long())


def test_bidirectional_mix_with_constant_images():
    """BCP Test it by 2 (images): u_a = 1, l_a = 2, u_b = 3, l_b = 4 -> X_in is 2 inside the box and 1
    outside; X_out is 3 inside and 4 outside."""
    torch.manual_seed(1)
    u_a, l_a, u_b, l_b = (torch.full((2, 1, 32, 32), v) for v in (1.0, 2.0, 3.0, 4.0))
    m = box_mask((32, 32))
    x_in, x_out = bidirectional_mix(l_a, l_b, u_a, u_b, m)
    inside = m == 0
    assert (x_in[..., inside] == 2).all() and (x_in[..., ~inside] == 1).all()
    assert (x_out[..., inside] == 3).all() and (x_out[..., ~inside] == 4).all()


def test_mix_keeps_channels_last():
    a = torch.rand(2, 3, 8, 8).contiguous(memory_format=torch.channels_last)
    out = mix(a, torch.zeros_like(a), box_mask((8, 8)))
    assert out.is_contiguous(memory_format=torch.channels_last)


# ---- ABD patch grid ------------------------------------------------------------------------------------

def test_patches_round_trip_and_row_major_order():
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).view(2, 3, 8, 8)
    p = to_patches(x, 4)                                                  # 16 patches of 2×2
    assert p.shape == (2, 16, 3, 2, 2)
    assert torch.equal(p[:, 1], x[:, :, 0:2, 2:4])                         # k = row·4 + col
    assert torch.equal(p[:, 6], x[:, :, 2:4, 4:6])
    assert torch.equal(from_patches(p, 4), x)
    v = torch.rand(1, 1, 4, 6, 8)                                         # 3D, per-axis grid
    assert torch.equal(from_patches(to_patches(v, (2, 3, 4)), (2, 3, 4)), v)
    with pytest.raises(ValueError, match="divide"):
        to_patches(torch.rand(1, 1, 10, 10), 4)


def test_patch_confidence_on_a_constructed_probability_map():
    """s_k = mean over patch k of max_c p_c: a 2×2 grid of 2×2 patches with known maxima."""
    probs = torch.zeros(1, 2, 4, 4)
    probs[0, 0] = torch.tensor([[0.9, 0.7, 0.5, 0.5],
                                [0.8, 0.6, 0.5, 0.5],
                                [0.1, 0.2, 0.4, 0.3],
                                [0.3, 0.4, 0.6, 0.6]])
    probs[0, 1] = 1 - probs[0, 0]
    s = patch_confidence(probs, 2)
    # patch 0: max(.9,.1) .7 .8 .6 -> .75; patch 1: all .5; patch 2: .9 .8 .7 .6 -> .75; patch 3: .6 .7 .6 .6
    assert torch.allclose(s, torch.tensor([[0.75, 0.5, 0.75, 0.625]]))
    assert torch.allclose(patch_logit_mean(probs, 2)[0, :, 0], torch.tensor([0.75, 0.5, 0.25, 0.475]))


def test_profile_kl_is_kl_of_softmaxed_mean_logits():
    torch.manual_seed(0)
    p, q = torch.randn(3, 4), torch.randn(3, 5, 4)
    ref = torch.stack([torch.stack([F.kl_div(q[i, j].softmax(-1).log(), p[i].softmax(-1), reduction="sum")
                                    for j in range(5)]) for i in range(3)])
    assert torch.allclose(profile_kl(p, q), ref, atol=1e-6)


def test_swap_patches_reads_both_sources_before_writing():
    x1 = torch.arange(16, dtype=torch.float32).view(1, 1, 4, 4)
    x2 = 100 + x1
    # x1's patch 0 <- x2's patch 3, x2's patch 3 <- x1's patch 0: a true exchange, from the original values
    y1, y2 = swap_patches(x1, x2, torch.tensor([0]), torch.tensor([3]), torch.tensor([3]), torch.tensor([0]), 2)
    assert torch.equal(to_patches(y1, 2)[0, 0], to_patches(x2, 2)[0, 3])
    assert torch.equal(to_patches(y2, 2)[0, 3], to_patches(x1, 2)[0, 0])
    assert torch.equal(to_patches(y1, 2)[0, 1:], to_patches(x1, 2)[0, 1:])
    # `apply` leaves the other samples untouched
    z1, z2 = swap_patches(x1.repeat(2, 1, 1, 1), x2.repeat(2, 1, 1, 1), torch.tensor([0, 0]), torch.tensor([3, 3]),
                          torch.tensor([3, 3]), torch.tensor([0, 0]), 2, apply=torch.tensor([False, True]))
    assert torch.equal(z1[0], x1[0]) and torch.equal(z2[0], x2[0]) and torch.equal(z1[1], y1[0])


def _patch_logits(per_patch: dict[int, torch.Tensor], default: torch.Tensor, grid: int = 4,
                  side: int = 2) -> torch.Tensor:
    """1×C×(grid·side)² logits, constant inside each patch."""
    c = default.numel()
    p = default.view(1, 1, c, 1, 1).repeat(1, grid * grid, 1, side, side)
    for k, v in per_patch.items():
        p[0, k] = v.view(c, 1, 1)
    return from_patches(p, grid)


def e(k: int, scale: float) -> torch.Tensor:
    v = torch.zeros(4)
    v[k] = scale
    return v


def abd_r_case():
    """View 1: least confident patch b = 5 (uniform logits), top-4 = {0, 2, 7, 9} with 0 the most confident and
    2 the one whose profile (peaked at class 3) is closest to view 2's least confident patch d = 10 (slightly
    peaked at class 3) -> a = 2. View 2: top-4 = {15, 12, 3, 6}, 15 the most confident, 12 the least peaked of
    them and so the closest to view 1's uniform patch 5 -> c = 12."""
    z1 = _patch_logits({5: torch.zeros(4), 0: e(0, 4.0), 2: e(3, 3.0), 7: e(1, 3.5), 9: e(2, 3.5)}, e(0, 1.0))
    z2 = _patch_logits({10: e(3, 0.5), 15: e(1, 4.0), 12: e(2, 2.5), 3: e(0, 3.0), 6: e(3, 3.5)}, e(0, 1.0))
    torch.manual_seed(0)
    x1, x2 = torch.rand(1, 1, 8, 8), torch.rand(1, 1, 8, 8)
    return x1, x2, z1, z2


def test_abd_r_kl_matched_displacement():
    """ABD Test it by 1: displaced image 1 = image 1 except patch 5 = image 2's patch 12; displaced image 2 =
    image 2 except patch 10 = image 1's patch 2; all other pixels bit-identical."""
    x1, x2, z1, z2 = abd_r_case()
    s1, s2 = patch_confidence(z1.softmax(1), 4), patch_confidence(z2.softmax(1), 4)
    assert int(s1.argmin()) == 5 and int(s2.argmin()) == 10
    assert set(s1.topk(4).indices[0].tolist()) == {0, 2, 7, 9} and int(s1.argmax()) == 0
    assert set(s2.topk(4).indices[0].tolist()) == {15, 12, 3, 6} and int(s2.argmax()) == 15
    b, c, d, a = abd_r_indices(s1, s2, patch_logit_mean(z1, 4), patch_logit_mean(z2, 4), 4, True)
    assert (int(b), int(c), int(d), int(a)) == (5, 12, 10, 2)
    y1, y2 = abd_r(x1, x2, z1, z2, grid=4, top_k=4, kl_prob=1.0)
    p1, p2, q1, q2 = to_patches(x1, 4), to_patches(x2, 4), to_patches(y1, 4), to_patches(y2, 4)
    exp1, exp2 = p1.clone(), p2.clone()
    exp1[0, 5], exp2[0, 10] = p2[0, 12], p1[0, 2]
    assert torch.equal(q1, exp1) and torch.equal(q2, exp2)


def test_abd_r_simple_variant_swaps_lowest_for_highest():
    """BCP host's simple variant: image 1's lowest-confidence patch (5) receives image 2's highest-confidence
    patch (15), image 2's lowest (10) receives image 1's highest (0)."""
    x1, x2, z1, z2 = abd_r_case()
    y1, y2 = abd_r(x1, x2, z1, z2, grid=4, top_k=4, kl_prob=0.0)
    p1, p2 = to_patches(x1, 4), to_patches(x2, 4)
    exp1, exp2 = p1.clone(), p2.clone()
    exp1[0, 5], exp2[0, 10] = p2[0, 15], p1[0, 0]
    assert torch.equal(to_patches(y1, 4), exp1) and torch.equal(to_patches(y2, 4), exp2)


def test_abd_r_kl_probability_mixes_the_two_choices():
    x1, x2, z1, z2 = abd_r_case()
    n = 400
    torch.manual_seed(3)
    y1, _ = abd_r(x1.repeat(n, 1, 1, 1), x2.repeat(n, 1, 1, 1), z1.repeat(n, 1, 1, 1), z2.repeat(n, 1, 1, 1),
                  grid=4, top_k=4, kl_prob=0.5)
    got_kl = (to_patches(y1, 4)[:, 5] == to_patches(x2, 4)[0, 12]).flatten(1).all(1)
    got_simple = (to_patches(y1, 4)[:, 5] == to_patches(x2, 4)[0, 15]).flatten(1).all(1)
    assert bool((got_kl ^ got_simple).all())
    assert 150 < int(got_kl.sum()) < 250


def test_abd_i_moves_patches_and_labels_together():
    """ABD Test it by 2 (probability forced to 1): image 1's most confident patch e holds image 2's least
    confident patch h, image 2's most confident patch g holds image 1's least confident patch f, and the
    labels y (weak) and y_s (strong) move identically; with probability 0 nothing moves."""
    torch.manual_seed(0)
    z1, z2 = torch.randn(2, 4, 8, 8) * 3, torch.randn(2, 4, 8, 8) * 3
    x1, x2 = torch.rand(2, 1, 8, 8), torch.rand(2, 1, 8, 8)
    y1, y2 = torch.randint(0, 4, (2, 8, 8)), torch.randint(0, 4, (2, 8, 8))
    s1, s2 = patch_confidence(z1.softmax(1), 4), patch_confidence(z2.softmax(1), 4)
    e_, h, g, f = abd_i_indices(s1, s2)
    assert torch.equal(e_, s1.argmax(1)) and torch.equal(f, s1.argmin(1))
    assert torch.equal(g, s2.argmax(1)) and torch.equal(h, s2.argmin(1))
    x1n, x2n, y1n, y2n = abd_i(x1, x2, y1, y2, z1, z2, grid=4, prob=1.0)
    for i in range(2):
        for img, new, lab, newlab, dst, src, other, otherlab in (
                (x1, x1n, y1, y1n, e_, h, x2, y2), (x2, x2n, y2, y2n, g, f, x1, y1)):
            exp, expl = to_patches(img, 4)[i].clone(), to_patches(lab[:, None], 4)[i].clone()
            exp[dst[i]] = to_patches(other, 4)[i, src[i]]
            expl[dst[i]] = to_patches(otherlab[:, None], 4)[i, src[i]]
            assert torch.equal(to_patches(new, 4)[i], exp)
            assert torch.equal(to_patches(newlab[:, None], 4)[i], expl)
    assert y1n.dtype == y1.dtype and y1n.shape == y1.shape
    same = abd_i(x1, x2, y1, y2, z1, z2, grid=4, prob=0.0)
    assert all(torch.equal(a, b) for a, b in zip(same, (x1, x2, y1, y2)))
