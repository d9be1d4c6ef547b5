"""Evaluation reports: `per_case.csv` and `summary.json` (written atomically), and a plain-text results table."""

from __future__ import annotations

import csv
import io
from collections.abc import Mapping, Sequence
from pathlib import Path

from ssmis import __version__
from ssmis.atomic import atomic_write_json, atomic_write_text
from ssmis.eval.hc_error import HC_COLUMNS, hc_summary
from ssmis.eval.metrics import NOTES, aggregate

CSV_COLUMNS = ("case", "patient", "class", "dice", "jaccard", "hd95_vox", "asd_vox", "hd95_mm", "asd_mm",
               "gt_voxels", "pred_voxels", "note")


def selection_rule(validated: bool) -> str:
    """How checkpoints/best.pt was chosen: by validation Dice, or (no validation cases) the last step."""
    return "best validation Dice" if validated else "last step (no validation cases)"


def write_report(rows: Sequence[dict], out_dir: Path, conventions: Mapping) -> dict:
    """Write `per_case.csv` and `summary.json` into `out_dir` and return the summary.

    `rows` are `case_metrics` rows plus `case` and `patient`; `conventions` (HD95 rule, empty rules, units,
    spacing source, ...) is stored as given. The summary is `aggregate(rows)` plus `written_by`, `conventions`
    and `counts`, and `hc` (head-circumference error, `hc_summary`) when the rows carry a reference HC (HC18);
    per_case.csv then has the HC columns too.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = {"written_by": f"ssmis {__version__}", "conventions": dict(conventions), "counts": _counts(rows),
               **aggregate(rows)}
    hc = hc_summary(rows)
    if hc is not None:
        summary["hc"] = hc
    atomic_write_text(out_dir / "per_case.csv", _csv_text(rows, CSV_COLUMNS + HC_COLUMNS if hc else CSV_COLUMNS))
    atomic_write_json(out_dir / "summary.json", summary, indent=2)     # NaN/Infinity written as null
    return summary


def format_table(summary: Mapping, class_names: Mapping[int, str] | None = None) -> str:
    """Table with one row per class and a `mean` row; Dice, Jaccard, HD95 and ASD as mean ± std.

    Distances are in mm when the summary has them, else in voxels.
    """
    unit = "mm" if summary["mean"]["hd95_mm"] is not None else "vox"
    columns = [("Dice", "dice", 4), ("Jaccard", "jaccard", 4),
               (f"HD95 ({unit})", f"hd95_{unit}", 2), (f"ASD ({unit})", f"asd_{unit}", 2)]
    table = [["class"] + [title for title, _, _ in columns]]
    for c, stats in summary["per_class"].items():
        name = (class_names or {}).get(int(c), c)
        table.append([str(name)] + [_mean_std(stats[key], digits) for _, key, digits in columns])
    table.append(["mean"] + [_number(summary["mean"][key], digits) for _, key, digits in columns])
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    lines = ["  ".join([row[0].ljust(widths[0])] + [v.rjust(w) for v, w in zip(row[1:], widths[1:])])
             for row in table]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def _counts(rows: Sequence[dict]) -> dict:
    return {"cases": len({r.get("case") for r in rows}), "rows": len(rows),
            **{note: sum(r["note"] == note for r in rows) for note in NOTES}}


def _csv_text(rows: Sequence[dict], columns: Sequence[str] = CSV_COLUMNS) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, restval="", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def _mean_std(stats: Mapping, digits: int) -> str:
    if stats["mean"] is None:
        return "n/a"
    return f"{stats['mean']:.{digits}f} ± {stats['std']:.{digits}f}"


def _number(value: float | None, digits: int) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"
