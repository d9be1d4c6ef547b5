"""Per-case, per-class segmentation metrics (Dice, Jaccard, HD95, ASD) following medpy's conventions.

Surfaces are a mask XOR its connectivity-1 erosion; distances come from `scipy.ndimage.distance_transform_edt`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import numpy as np
from scipy import ndimage

METRICS = ("dice", "jaccard", "hd95_vox", "asd_vox", "hd95_mm", "asd_mm")
NOTES = ("both_empty", "pred_empty", "ref_empty")


def surface(mask: np.ndarray) -> np.ndarray:
    """Boolean surface of a mask: voxels with a background face neighbour (the image outside counts as background)."""
    mask = np.asarray(mask, dtype=bool)
    structure = ndimage.generate_binary_structure(mask.ndim, 1)
    return mask ^ ndimage.binary_erosion(mask, structure=structure, border_value=0)


def case_metrics(
    pred: np.ndarray,
    ref: np.ndarray,
    classes: Sequence[int],
    spacing: Sequence[float] | None = None,
    hd95: Literal["pooled", "max_directed"] = "pooled",
    empty_both: Literal["skip", "perfect"] = "skip",
    empty_one: Literal["worst", "nan"] = "worst",
) -> list[dict]:
    """Score one case: a dict per class with `class`, the METRICS, `gt_voxels`, `pred_voxels` and `note`.

    `pred` and `ref` are label maps of the same 2D or 3D shape; `spacing` (mm, array axis order) fills the
    mm columns, which are NaN without it. See design section 5 for the HD95 and empty-mask rules.
    """
    pred, ref = np.asarray(pred), np.asarray(ref)
    _check_args(pred, ref, spacing, hd95, empty_both, empty_one)
    rows = []
    for c in classes:
        p, r = pred == c, ref == c
        m = _class_metrics(p, r, spacing, hd95, empty_both, empty_one)
        rows.append({"class": int(c), **{k: float(m[k]) for k in METRICS}, "gt_voxels": int(np.count_nonzero(r)),
                     "pred_voxels": int(np.count_nonzero(p)), "note": m["note"]})
    return rows


def aggregate(rows: Sequence[dict]) -> dict:
    """Per-class mean, std (ddof 0) and count of each metric, NaN excluded, plus headline means over classes.

    Returns ``{"per_class": {"1": {"cases", "empty": {note: n}, metric: {"mean", "std", "n"}}}, "mean": {metric}}``;
    statistics of no values are None, so the result is valid JSON.
    """
    by_class: dict[int, list[dict]] = {}
    for row in rows:
        by_class.setdefault(int(row["class"]), []).append(row)
    per_class = {str(c): _class_summary(by_class[c]) for c in sorted(by_class)}
    mean = {m: _mean_or_none([s[m]["mean"] for s in per_class.values() if s[m]["mean"] is not None]) for m in METRICS}
    return {"per_class": per_class, "mean": mean}


def _check_args(pred, ref, spacing, hd95, empty_both, empty_one) -> None:
    if pred.shape != ref.shape:
        raise ValueError(f"pred shape {pred.shape} differs from ref shape {ref.shape}")
    if pred.ndim not in (2, 3):
        raise ValueError(f"masks must be 2D or 3D, got shape {pred.shape}")
    if spacing is not None and len(spacing) != pred.ndim:
        raise ValueError(f"spacing {tuple(spacing)} does not match the {pred.ndim}D masks")
    for name, value, allowed in (
        ("hd95", hd95, ("pooled", "max_directed")),
        ("empty_both", empty_both, ("skip", "perfect")),
        ("empty_one", empty_one, ("worst", "nan")),
    ):
        if value not in allowed:
            raise ValueError(f"{name}={value!r}; expected one of {allowed}")


def _class_metrics(p, r, spacing, hd95, empty_both, empty_one) -> dict:
    p_any, r_any = p.any(), r.any()
    mm_known = spacing is not None
    if not (p_any or r_any):
        if empty_both == "skip":
            return _constant(math.nan, math.nan, math.nan, "both_empty")
        return _constant(1.0, 0.0, 0.0 if mm_known else math.nan, "both_empty")
    if not (p_any and r_any):
        note = "ref_empty" if p_any else "pred_empty"
        if empty_one == "nan":
            return _constant(0.0, math.nan, math.nan, note)
        return _constant(0.0, _diagonal(p.shape), _diagonal(p.shape, spacing) if mm_known else math.nan, note)
    crop = _union_crop(p | r)
    p, r = p[crop], r[crop]
    inter = np.count_nonzero(p & r)
    total = np.count_nonzero(p) + np.count_nonzero(r)
    row = {"dice": 2 * inter / total, "jaccard": inter / (total - inter), "note": ""}
    p_surf, r_surf = surface(p), surface(r)
    row["hd95_vox"], row["asd_vox"] = _hd95_asd(p_surf, r_surf, None, hd95)
    if not mm_known:
        row["hd95_mm"] = row["asd_mm"] = math.nan
    elif len(set(spacing)) == 1:  # isotropic: the nearest voxel is the same in both units
        row["hd95_mm"], row["asd_mm"] = row["hd95_vox"] * spacing[0], row["asd_vox"] * spacing[0]
    else:
        row["hd95_mm"], row["asd_mm"] = _hd95_asd(p_surf, r_surf, spacing, hd95)
    return row


def _constant(overlap: float, distance_vox: float, distance_mm: float, note: str) -> dict:
    return {"dice": overlap, "jaccard": overlap, "hd95_vox": distance_vox, "asd_vox": distance_vox,
            "hd95_mm": distance_mm, "asd_mm": distance_mm, "note": note}


def _diagonal(shape: tuple[int, ...], spacing: Sequence[float] | None = None) -> float:
    sampling = np.ones(len(shape)) if spacing is None else np.asarray(spacing, dtype=float)
    return float(np.sqrt(np.sum((np.asarray(shape) * sampling) ** 2)))


def _union_crop(union: np.ndarray) -> tuple[slice, ...]:
    """Bounding box of `union` plus one background voxel each side, clipped to the image.

    Exact for surface distances: every surface voxel lies inside, and erosion at a crop edge sees background
    there as in the full image (at the image border, the image outside counts as background in both).
    """
    crop = []
    for axis in range(union.ndim):
        hit = np.flatnonzero(union.any(axis=tuple(a for a in range(union.ndim) if a != axis)))
        crop.append(slice(max(hit[0] - 1, 0), min(hit[-1] + 2, union.shape[axis])))
    return tuple(crop)


def _hd95_asd(p_surf: np.ndarray, r_surf: np.ndarray, spacing, rule: str) -> tuple[float, float]:
    to_ref = ndimage.distance_transform_edt(~r_surf, sampling=spacing)[p_surf]
    to_pred = ndimage.distance_transform_edt(~p_surf, sampling=spacing)[r_surf]
    if rule == "pooled":
        hd = np.percentile(np.concatenate([to_ref, to_pred]), 95)
    else:
        hd = max(np.percentile(to_ref, 95), np.percentile(to_pred, 95))
    return float(hd), float(to_ref.mean())


def _class_summary(rows: list[dict]) -> dict:
    summary: dict = {"cases": len(rows), "empty": {n: sum(r["note"] == n for r in rows) for n in NOTES}}
    for m in METRICS:
        values = np.array([r[m] for r in rows], dtype=float)
        values = values[~np.isnan(values)]
        summary[m] = {"mean": _mean_or_none(values), "std": float(values.std()) if values.size else None,
                      "n": int(values.size)}
    return summary


def _mean_or_none(values) -> float | None:
    return float(np.mean(values)) if len(values) else None
