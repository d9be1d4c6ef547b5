"""ACDC-lite table (methods.md "ACDC-lite"): methods x labelled slices x seeds, one cell at a time.

Each finished cell's small results (config, split, metrics.csv, test summaries) are copied to
docs/results/acdc_lite/<cell>/ so a re-run anywhere skips it; an interrupted cell resumes from its
run directory (runs/acdc_lite/<cell>, checkpoints are never committed). Then docs/acdc_lite.md is rewritten.

Usage: python benchmarks/acdc_lite.py [--methods supervised mean_teacher ua_mt] [--labeled 136] [--seeds 0]
                                      [--data ../shared/data/ACDC] [--iterations 2000] [--table-only]
"""

from __future__ import annotations

import argparse
import datetime
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "results" / "acdc_lite"
KEEP = ("config.yaml", "splits.json", "metrics.csv", "train_summary.json", "log.txt")


def cell_name(method: str, labeled: int, seed: int) -> str:
    return f"{method}-l{labeled}-s{seed}"


def run_cell(method: str, labeled: int, seed: int, data: str, iterations: int) -> None:
    from ssmis.config import load_config
    from ssmis.engine.run import train

    name = cell_name(method, labeled, seed)
    run_dir = ROOT / "runs" / "acdc_lite" / name
    cfg = load_config(ROOT / "configs" / "acdc_lite.yaml",
                      [f"data.root={data}", f"method.name={method}", f"split.labeled={labeled}", f"seed={seed}",
                       f"train.iterations={iterations}"])
    resume = (run_dir / "checkpoints" / "last.pt").is_file()
    if run_dir.exists() and not resume:
        shutil.rmtree(run_dir)
    train(cfg, out=run_dir, resume=resume, progress=True)
    dest = RESULTS / name
    dest.mkdir(parents=True, exist_ok=True)
    for f in KEEP:
        if (run_dir / f).is_file():
            shutil.copy2(run_dir / f, dest / f)
    for ck in ("best", "last"):
        src = run_dir / "eval" / f"test-{ck}"
        shutil.copy2(src / "summary.json", dest / f"test-{ck}.json")
        shutil.copy2(src / "per_case.csv", dest / f"test-{ck}-per_case.csv")


def cpu_model() -> str:
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    return next((l.split(":", 1)[1].strip() for l in out.splitlines() if l.startswith("Model name")), "unknown")


def write_table() -> Path:
    cells = sorted(p for p in RESULTS.glob("*") if (p / "test-best.json").is_file())
    groups: dict[tuple[str, int], list[Path]] = {}
    for p in cells:
        method, lab, seed = p.name.rsplit("-", 2)
        groups.setdefault((method, int(lab[1:])), []).append(p)
    cols = ("dice", "jaccard", "hd95_vox", "asd_vox")
    lines = ["# ACDC-lite results", "",
             "Protocol (methods.md, ACDC-lite): UNet-2D, slices resized (order 0) to 128x128, batch 4 labelled + "
             "4 unlabelled, SGD lr 0.01 poly, 2000 steps, labelled = first N slices of train_slices.list, validation "
             "every 200 steps on the 20 val volumes, **best-val checkpoint** (and last) scored on the 40 test volumes "
             "in 3D, mean of RV/Myo/LV; HD95/ASD in voxels (the SSL4MIS h5 has no spacing). Numbers are not "
             "comparable with published full-protocol numbers.", "",
             f"Produced by `python benchmarks/acdc_lite.py` (cells listed below); table written {datetime.date.today()}; "
             f"CPU: {cpu_model()}. Speed is measured separately (docs/benchmarks.md): these runs shared the CPU "
             "with other work.", "",
             "| method | labelled slices | seeds | Dice (best-val) | Jaccard | HD95 (vox) | ASD (vox) | Dice (last) | "
             "precision |", "|---|---|---|---|---|---|---|---|---|"]
    for (method, lab), ps in sorted(groups.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        best = [json.loads((p / "test-best.json").read_text())["mean"] for p in ps]
        last = [json.loads((p / "test-last.json").read_text())["mean"] for p in ps]
        summ = [json.loads((p / "train_summary.json").read_text()) for p in ps]

        def ms(vals, k, d):
            v = np.array([x[k] for x in vals], float)
            return f"{v.mean():.{d}f}" + (f" ± {v.std():.{d}f}" if len(v) > 1 else "")

        lines.append(f"| {method} | {lab} | {len(ps)} | {ms(best, 'dice', 4)} | {ms(best, 'jaccard', 4)} | "
                     f"{ms(best, 'hd95_vox', 2)} | {ms(best, 'asd_vox', 2)} | {ms(last, 'dice', 4)} | "
                     f"{summ[0]['precision']} |")
    lines += ["", "Cells (each folder holds config.yaml, splits.json, metrics.csv, test summaries and per-case CSVs):", ""]
    lines += [f"- `docs/results/acdc_lite/{p.name}/`" for p in cells]
    out = ROOT / "docs" / "acdc_lite.md"
    out.write_text("\n".join(lines) + "\n")
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--methods", nargs="+", default=["supervised", "mean_teacher", "ua_mt"])
    ap.add_argument("--labeled", nargs="+", type=int, default=[136])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0])
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "ACDC"))
    ap.add_argument("--iterations", type=int, default=2000)
    ap.add_argument("--table-only", action="store_true")
    a = ap.parse_args()
    if not a.table_only:
        for seed in a.seeds:
            for lab in a.labeled:
                for m in a.methods:
                    if (RESULTS / cell_name(m, lab, seed) / "test-best.json").is_file():
                        print(f"skip {cell_name(m, lab, seed)} (done)")
                        continue
                    run_cell(m, lab, seed, a.data, a.iterations)
                    print(write_table())
    print(write_table())


if __name__ == "__main__":
    main()
