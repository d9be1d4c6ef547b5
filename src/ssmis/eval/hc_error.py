"""Head-circumference error of a predicted head mask against a reference HC in mm (HC18, methods.md "HC18-lite"):
largest component -> least-squares ellipse on its boundary -> Ramanujan perimeter × pixel size, the same code as
`ssmis predict` (`ssmis.eval.measure.head_circumference`). An empty prediction or a failed fit is counted and
reported, never scored as 0 mm."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

HC_COLUMNS = ("hc_mm", "hc_ref_mm", "hc_abs_err_mm", "hc_note")
EMPTY, NO_FIT = "empty prediction", "no ellipse fit"


def hc_row(head_mask: np.ndarray, spacing: Sequence[float] | None, hc_ref_mm: float) -> dict:
    """The HC columns of one image: measured HC, reference, absolute error (NaN when not measured) and a note."""
    from ssmis.eval.measure import head_circumference

    row = {"hc_mm": math.nan, "hc_ref_mm": float(hc_ref_mm), "hc_abs_err_mm": math.nan, "hc_note": ""}
    if not np.any(head_mask):
        row["hc_note"] = EMPTY
        return row
    fit = head_circumference(head_mask, spacing)
    if fit is None or fit.hc_mm is None or not math.isfinite(fit.hc_mm):
        row["hc_note"] = NO_FIT
        return row
    row["hc_mm"] = float(fit.hc_mm)
    row["hc_abs_err_mm"] = abs(row["hc_mm"] - row["hc_ref_mm"])
    return row


def hc_summary(rows: Sequence[dict]) -> dict | None:
    """mean / std (ddof 0) / median / max of the absolute HC error over the measured images, with the counts of
    images, measured ones, empty predictions and failed fits; None when no row has a reference HC."""
    rows = [r for r in rows if r.get("hc_ref_mm") not in (None, "") and math.isfinite(float(r["hc_ref_mm"]))]
    if not rows:
        return None
    err = np.array([r["hc_abs_err_mm"] for r in rows if math.isfinite(r["hc_abs_err_mm"])], float)
    stat = (lambda f: float(f(err))) if len(err) else (lambda f: None)
    return {"images": len(rows), "measured": int(len(err)),
            "empty_predictions": sum(r["hc_note"] == EMPTY for r in rows),
            "failed_fits": sum(r["hc_note"] == NO_FIT for r in rows),
            "abs_err_mm": {"mean": stat(np.mean), "std": stat(np.std), "median": stat(np.median), "max": stat(np.max)}}


def format_hc(summary: dict) -> str:
    """One line for the results table."""
    e = summary["abs_err_mm"]
    measured = f"{summary['measured']} of {summary['images']} images measured"
    if e["mean"] is None:
        return f"HC abs error (mm): n/a ({measured}; {summary['empty_predictions']} empty predictions, " \
               f"{summary['failed_fits']} failed fits)"
    return (f"HC abs error (mm): {e['mean']:.2f} ± {e['std']:.2f}, median {e['median']:.2f}, max {e['max']:.2f} "
            f"({measured}; {summary['empty_predictions']} empty predictions, {summary['failed_fits']} failed fits)")
