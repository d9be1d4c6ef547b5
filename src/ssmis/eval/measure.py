"""Measurements on label maps: voxel counts and volumes per class, ejection fraction from an ED and an ES
frame of one patient (ACDC classes, 3 = LV), and head circumference from an ellipse fit (HC18)."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from skimage import measure

from ssmis.data.hc18 import fit_ellipse, ramanujan_perimeter

LV_CLASS = 3                                   # ACDC: 1 = RV, 2 = Myo, 3 = LV
_FRAME = re.compile(r"(?P<patient>.+?)_frame(?P<frame>\d+)")


def class_volumes(mask: np.ndarray, classes: Sequence[int], spacing: Sequence[float] | None) -> dict[int, dict]:
    """Per class: `voxels` and, where the spacing (mm, array axis order) is known, `ml` (3D) or `mm2` (2D)."""
    counts = np.bincount(mask.ravel().astype(np.int64), minlength=max(classes, default=0) + 1)
    unit = "ml" if mask.ndim == 3 else "mm2"
    cell = None if spacing is None else float(np.prod(spacing)) / (1000.0 if mask.ndim == 3 else 1.0)
    return {c: {"voxels": int(counts[c]), unit: None if cell is None else float(counts[c]) * cell} for c in classes}


def ejection_fraction(edv: float, esv: float) -> float:
    """EF in percent, (EDV - ESV) / EDV * 100; NaN for an empty end-diastolic LV."""
    return (edv - esv) / edv * 100.0 if edv > 0 else math.nan


def frame_of(case: str) -> tuple[str, int] | None:
    """(patient, frame) of an ACDC-style case name `patientNNN_frameMM`, else None."""
    m = _FRAME.fullmatch(case)
    return (m["patient"], int(m["frame"])) if m else None


def ejection_fractions(lv_volumes: Mapping[str, float]) -> dict[str, dict]:
    """EF per patient from the LV volumes of its frames (case name -> volume, any one unit).

    Only patients with two or more frames are measured: ED is the frame with the largest LV volume, ES the one with
    the smallest (ACDC gives exactly the two). Returns case -> {patient, phase (ED/ES/""), edv, esv, ef_pct}
    for every case of such a patient.
    """
    by_patient: dict[str, list[str]] = {}
    for case in lv_volumes:
        pf = frame_of(case)
        if pf:
            by_patient.setdefault(pf[0], []).append(case)
    out = {}
    for patient, cases in by_patient.items():
        if len(cases) < 2:
            continue
        ed = max(cases, key=lambda c: lv_volumes[c])
        es = min(cases, key=lambda c: lv_volumes[c])
        edv, esv = lv_volumes[ed], lv_volumes[es]
        for c in cases:
            phase = "ED" if c == ed else "ES" if c == es else ""
            out[c] = {"patient": patient, "phase": phase, "edv": edv, "esv": esv, "ef_pct": ejection_fraction(edv, esv)}
    return out


@dataclass
class HeadCircumference:
    """Ellipse fitted to the head's boundary: centre and semi-axes in pixels (x = column, y = row)."""

    hc_px: float
    a_px: float
    b_px: float
    center_x_px: float
    center_y_px: float
    angle_rad: float
    hc_mm: float | None = None       # None when the pixel size is unknown
    a_mm: float | None = None
    b_mm: float | None = None


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest connected foreground component (holes filled) of a 2D mask; all False when it is empty."""
    lab, n = ndimage.label(mask > 0)
    if n == 0:
        return np.zeros(mask.shape, bool)
    sizes = np.bincount(lab.ravel())[1:]
    return ndimage.binary_fill_holes(lab == 1 + int(np.argmax(sizes)))


def head_contour(mask: np.ndarray) -> np.ndarray | None:
    """Boundary points (x = column, y = row; pixel centres at integers) of the largest component of a 2D mask
    (holes filled), or None when it has fewer than 5 pixels."""
    if mask.ndim != 2:
        raise ValueError(f"head circumference needs a 2D mask, got shape {mask.shape}")
    region = largest_component(mask)
    if region.sum() < 5:
        return None
    # the 0.5 iso-line lies half-way between inside and outside pixel centres: unbiased, where the outer pixel
    # centres (mask XOR erosion) sit about half a pixel inside the edge (-0.9 % HC at a 60x40 px ellipse)
    contour = max(measure.find_contours(np.pad(region, 1).astype(np.float32), 0.5), key=len)
    return contour[:, ::-1] - 1.0


def fit_head_ellipse(mask: np.ndarray) -> tuple[float, float, float, float, float] | None:
    """Least-squares ellipse (xc, yc, a, b, theta; scikit-image's EllipseModel convention: semi-axis a lies along
    the direction theta, which may be the shorter one) on the boundary of the largest component of a 2D mask:
    what `head_circumference` measures and ERSR refines its pseudo-labels with. None when nothing fits."""
    xy = head_contour(mask)
    return None if xy is None else fit_ellipse(xy)


def head_circumference(mask: np.ndarray, pixel_size: float | Sequence[float] | None = None) -> HeadCircumference | None:
    """HC of the largest component of a 2D mask: least-squares ellipse on its boundary, Ramanujan perimeter.

    `pixel_size` in mm (one value, or (row, column)) gives the mm fields; with two different values the fit is
    repeated on physical coordinates. None when the mask is empty or no ellipse fits (never a 0 mm circumference).
    """
    xy = head_contour(mask)
    fit = None if xy is None else fit_ellipse(xy)
    if fit is None:
        return None
    xc, yc, a, b, theta = fit
    out = HeadCircumference(ramanujan_perimeter(a, b), a, b, xc, yc, theta)
    if pixel_size is not None:
        sy, sx = (float(pixel_size),) * 2 if np.isscalar(pixel_size) else map(float, pixel_size)
        if sy == sx:
            out.hc_mm, out.a_mm, out.b_mm = out.hc_px * sx, a * sx, b * sx
        else:
            fit_mm = fit_ellipse(xy * [sx, sy])
            if fit_mm is not None:
                out.a_mm, out.b_mm = fit_mm[2], fit_mm[3]
                out.hc_mm = ramanujan_perimeter(out.a_mm, out.b_mm)
    return out
