"""Metrics against an independent brute-force reference (neighbour counts + all pairwise distances) and hand cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.ndimage import gaussian_filter
from scipy.spatial.distance import cdist

from ssmis.eval.metrics import aggregate, case_metrics, surface


def brute_surface(mask: np.ndarray) -> np.ndarray:
    """Mask voxels with fewer than 2*ndim foreground face neighbours; outside the image counts as background."""
    padded = np.pad(mask.astype(int), 1)
    inner = tuple(slice(1, -1) for _ in range(mask.ndim))
    count = np.zeros(mask.shape, int)
    for axis in range(mask.ndim):
        for step in (-1, 1):
            count += np.roll(padded, step, axis)[inner]
    return mask & (count < 2 * mask.ndim)


def brute_metrics(pred: np.ndarray, ref: np.ndarray, spacing=None, rule: str = "pooled") -> dict:
    """Dice, Jaccard, HD95 and ASD of two non-empty boolean masks from all pairwise surface distances."""
    sampling = np.ones(pred.ndim) if spacing is None else np.asarray(spacing)
    d = cdist(np.argwhere(brute_surface(pred)) * sampling, np.argwhere(brute_surface(ref)) * sampling)
    to_ref, to_pred = d.min(axis=1), d.min(axis=0)
    if rule == "pooled":
        hd = np.percentile(np.concatenate([to_ref, to_pred]), 95)
    else:
        hd = max(np.percentile(to_ref, 95), np.percentile(to_pred, 95))
    inter, total = np.sum(pred & ref), pred.sum() + ref.sum()
    return {"dice": 2 * inter / total, "jaccard": inter / (total - inter), "hd95": hd, "asd": to_ref.mean()}


def random_labels(shape, seed: int) -> np.ndarray:
    """Label map with two blobby classes, often touching the image border."""
    rng = np.random.default_rng(seed)
    a, b = (gaussian_filter(rng.random(shape), 1.5) for _ in range(2))
    one, two = a > np.quantile(a, 0.7), b > np.quantile(b, 0.75)
    return np.where(one, 1, np.where(two, 2, 0))


def by_class(rows):
    return {r["class"]: r for r in rows}


@pytest.mark.parametrize("shape,spacing", [((24, 28), (0.8, 1.3)), ((10, 14, 12), (2.5, 1.0, 0.7)),
                                           ((9, 11, 13), (1.5, 1.5, 1.5))])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_brute_force(shape, spacing, seed):
    pred, ref = random_labels(shape, seed), random_labels(shape, seed + 100)
    rows = by_class(case_metrics(pred, ref, [1, 2], spacing))
    for c in (1, 2):
        vox, mm = brute_metrics(pred == c, ref == c), brute_metrics(pred == c, ref == c, spacing)
        row = rows[c]
        assert row["dice"] == pytest.approx(vox["dice"]) and row["jaccard"] == pytest.approx(vox["jaccard"])
        assert row["hd95_vox"] == pytest.approx(vox["hd95"]) and row["asd_vox"] == pytest.approx(vox["asd"])
        assert row["hd95_mm"] == pytest.approx(mm["hd95"]) and row["asd_mm"] == pytest.approx(mm["asd"])
        assert (row["gt_voxels"], row["pred_voxels"], row["note"]) == ((ref == c).sum(), (pred == c).sum(), "")


def test_surface_matches_neighbour_count_at_image_border():
    for seed in range(3):
        mask = random_labels((8, 9, 10), seed) == 1
        assert mask[0].any() and np.array_equal(surface(mask), brute_surface(mask))


def test_small_object_far_from_a_large_one_is_exact():
    # the union's bounding box spans both; cropping must not change anything
    pred, ref = np.zeros((40, 40), int), np.zeros((40, 40), int)
    ref[5:9, 5:9] = 1
    pred[30:32, 33:36] = 1
    pred[0:3, 0:40] = 1
    want = brute_metrics(pred == 1, ref == 1)
    row = case_metrics(pred, ref, [1])[0]
    assert (row["hd95_vox"], row["asd_vox"]) == pytest.approx((want["hd95"], want["asd"]))


@pytest.mark.parametrize("shape,spacing", [((20, 22), (0.8, 1.3)), ((8, 20, 22), (2.5, 1.0, 0.7))])
def test_identical_masks_score_perfectly(shape, spacing):
    labels = random_labels(shape, 7)
    for row in case_metrics(labels, labels, [1, 2], spacing):
        assert (row["dice"], row["jaccard"], row["hd95_vox"], row["asd_vox"], row["hd95_mm"], row["asd_mm"]) == (
            1.0, 1.0, 0.0, 0.0, 0.0, 0.0)


@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("k", [1, 3])
def test_box_shifted_by_k_voxels(ndim, k):
    spacing = (2.5, 1.0, 0.7)[-ndim:]
    ref = np.zeros((12, 20, 20)[-ndim:], int)
    ref[tuple(slice(3, 8) for _ in range(ndim))] = 1
    for axis in range(ndim):
        pred = np.roll(ref, k, axis)
        row = case_metrics(pred, ref, [1], spacing)[0]
        assert row["hd95_vox"] == pytest.approx(k)
        assert row["hd95_mm"] == pytest.approx(k * spacing[axis])


def test_both_empty_rules():
    empty = np.zeros((5, 6, 7), int)
    skipped = case_metrics(empty, empty, [1], (2.0, 1.0, 1.0))[0]
    assert skipped["note"] == "both_empty"
    assert all(math.isnan(skipped[m]) for m in ("dice", "jaccard", "hd95_vox", "asd_vox", "hd95_mm", "asd_mm"))
    perfect = case_metrics(empty, empty, [1], (2.0, 1.0, 1.0), empty_both="perfect")[0]
    assert [perfect[m] for m in ("dice", "jaccard", "hd95_vox", "asd_vox", "hd95_mm", "asd_mm", "note")] == [
        1.0, 1.0, 0.0, 0.0, 0.0, 0.0, "both_empty"]


@pytest.mark.parametrize("empty_side", ["pred", "ref"])
def test_one_empty_scores_the_image_diagonal_never_zero(empty_side):
    shape, spacing = (10, 20, 30), (2.5, 1.0, 0.7)
    full, empty = np.zeros(shape, int), np.zeros(shape, int)
    full[2:5, 3:9, 4:12] = 1
    pred, ref = (empty, full) if empty_side == "pred" else (full, empty)
    worst = case_metrics(pred, ref, [1], spacing)[0]
    assert worst["note"] == f"{empty_side}_empty" and (worst["dice"], worst["jaccard"]) == (0.0, 0.0)
    assert worst["hd95_vox"] == worst["asd_vox"] == pytest.approx(math.sqrt(10**2 + 20**2 + 30**2))
    assert worst["hd95_mm"] == worst["asd_mm"] == pytest.approx(math.sqrt(25**2 + 20**2 + 21**2))
    nan = case_metrics(pred, ref, [1], spacing, empty_one="nan")[0]
    assert nan["note"] == f"{empty_side}_empty" and nan["dice"] == 0.0
    assert all(math.isnan(nan[m]) for m in ("hd95_vox", "asd_vox", "hd95_mm", "asd_mm"))


def test_mm_columns_are_nan_without_spacing():
    labels = random_labels((16, 16), 3)
    for row in case_metrics(labels, np.roll(labels, 1, 0), [1, 2], None):
        assert row["hd95_vox"] > 0 and math.isnan(row["hd95_mm"]) and math.isnan(row["asd_mm"])


def test_pooled_and_max_directed_differ_on_an_asymmetric_case():
    ref = np.zeros((50, 50), int)
    ref[5:25, 5:25] = 1
    pred = ref.copy()
    pred[40:43, 40:43] = 1  # a false-positive blob: 8 of 84 predicted surface voxels, 8 of 160 pooled
    pooled = case_metrics(pred, ref, [1])[0]["hd95_vox"]
    directed = case_metrics(pred, ref, [1], hd95="max_directed")[0]["hd95_vox"]
    assert pooled == pytest.approx(brute_metrics(pred == 1, ref == 1)["hd95"])
    assert directed == pytest.approx(brute_metrics(pred == 1, ref == 1, rule="max_directed")["hd95"])
    assert directed > 5 * pooled > 0


def test_invalid_arguments_raise():
    a = np.zeros((4, 4), int)
    with pytest.raises(ValueError, match="shape"):
        case_metrics(a, np.zeros((4, 5), int), [1])
    with pytest.raises(ValueError, match="spacing"):
        case_metrics(a, a, [1], (1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="hd95"):
        case_metrics(a, a, [1], hd95="mean")


def test_aggregate_excludes_nan_and_counts_empties():
    nan = math.nan
    rows = [
        {"class": 1, "dice": 0.5, "jaccard": 0.2, "hd95_vox": 2.0, "asd_vox": 1.0, "hd95_mm": nan, "asd_mm": nan, "note": ""},
        {"class": 1, "dice": 0.9, "jaccard": 0.6, "hd95_vox": 4.0, "asd_vox": 3.0, "hd95_mm": nan, "asd_mm": nan, "note": ""},
        {"class": 1, "dice": nan, "jaccard": nan, "hd95_vox": nan, "asd_vox": nan, "hd95_mm": nan, "asd_mm": nan,
         "note": "both_empty"},
        {"class": 2, "dice": 0.0, "jaccard": 0.0, "hd95_vox": 10.0, "asd_vox": 10.0, "hd95_mm": nan, "asd_mm": nan,
         "note": "pred_empty"},
    ]
    s = aggregate(rows)
    one, two = s["per_class"]["1"], s["per_class"]["2"]
    assert one["dice"] == {"mean": pytest.approx(0.7), "std": pytest.approx(0.2), "n": 2}
    assert one["cases"] == 3 and one["empty"] == {"both_empty": 1, "pred_empty": 0, "ref_empty": 0}
    assert two["empty"]["pred_empty"] == 1 and two["hd95_vox"]["std"] == 0.0
    assert s["mean"]["dice"] == pytest.approx(0.35) and s["mean"]["hd95_vox"] == pytest.approx(6.5)
    assert s["mean"]["hd95_mm"] is None and one["hd95_mm"] == {"mean": None, "std": None, "n": 0}
