"""A compact markdown table of one or more bench suites (the README's results tables): per method and labelled
count, mean ± std (ddof 0) over the seeds run of the best-val checkpoint's mean foreground Dice, Jaccard, HD95 and
ASD, and the last checkpoint's Dice; for HC18 suites also the best-val checkpoint's mean absolute head-circumference
error in mm.

Usage: python benchmarks/summary_table.py benchmarks/results/acdc_lite_5pct [more suite folders ...]
"""

from __future__ import annotations

import argparse
import csv
from collections import defaultdict
from pathlib import Path

import numpy as np

NAMES = {"supervised": "supervised (labels only)", "mean_teacher": "Mean Teacher", "ua_mt": "UA-MT", "cps": "CPS",
         "fixmatch": "FixMatch", "unimatch": "UniMatch", "bcp": "BCP", "abd": "ABD (BCP host, UNet/UNet)",
         "ersr": "ERSR"}
ORDER = list(NAMES)


def _fmt(vals: list[float], digits: int) -> str:
    v = np.array(vals, float)
    return f"{v.mean():.{digits}f}" + (f" ± {v.std():.{digits}f}" if len(v) > 1 else "")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("suites", nargs="+", type=Path)
    rows: dict[tuple[float, str], dict[str, dict[int, dict[str, float]]]] = defaultdict(lambda: defaultdict(dict))
    unit, hc = "vox", False
    for suite in ap.parse_args().suites:
        with open(suite / "results.csv", newline="") as f:
            for r in csv.DictReader(f):
                if r["class"] != "mean":
                    continue
                unit = "mm" if r.get("hd95_mm") else "vox"
                hc = hc or bool(r.get("hc_err_mm"))
                rows[(float(r["labeled"]), r["method"])][r["checkpoint"]][int(r["seed"])] = {
                    "dice": float(r["dice"]), "jaccard": float(r["jaccard"]),
                    "hd95": float(r[f"hd95_{unit}"]), "asd": float(r[f"asd_{unit}"]),
                    "hc": float(r["hc_err_mm"]) if r.get("hc_err_mm") else float("nan")}
    print(f"| method | labelled | seeds | Dice | Jaccard | HD95 ({unit}) | ASD ({unit}) | Dice (last checkpoint) |"
          + (" HC err (mm) |" if hc else ""))
    print("|---|---|---|---|---|---|---|---|" + ("---|" if hc else ""))
    for (lab, method) in sorted(rows, key=lambda k: (k[0], ORDER.index(k[1]) if k[1] in ORDER else 99, k[1])):
        best, last = rows[(lab, method)]["best"], rows[(lab, method)].get("last", {})
        seeds = sorted(best)
        cells = [_fmt([best[s][m] for s in seeds], 4 if m in ("dice", "jaccard") else 2)
                 for m in ("dice", "jaccard", "hd95", "asd")]
        last_dice = _fmt([last[s]["dice"] for s in seeds if s in last], 4) if last else "n/a"
        hc_cell = f" {_fmt([best[s]['hc'] for s in seeds], 2)} |" if hc else ""
        print(f"| {NAMES.get(method, method)} | {lab:g} | {', '.join(map(str, seeds))} | " + " | ".join(cells)
              + f" | {last_dice} |" + hc_cell)


if __name__ == "__main__":
    main()
