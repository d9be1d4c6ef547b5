"""`ssmis demo`: the built-in phantom -> labels-only and Mean Teacher -> test table and learning curves.

Needs no download; takes a few minutes on 2 CPU cores.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from ssmis.config import load_config
from ssmis.errors import UserError

METHODS = (("supervised", "Labels only"), ("mean_teacher", "Mean Teacher"))


def run_demo(out: str | Path = "runs/demo", iterations: int | None = None, overwrite: bool = False,
             progress: bool = True) -> int:
    from ssmis.engine.run import train
    from ssmis.eval.plots import plot_curves

    out = Path(out)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise UserError(str(out), "demo folder already exists", "Pass --overwrite to replace it, or --out DIR.")
        if not (out / "demo.json").is_file() and not any((out / m).is_dir() for m, _ in METHODS):
            raise UserError(str(out), "refusing to overwrite a folder that is not an ssmis demo", "Choose another --out.")
        shutil.rmtree(out)
    overrides = [f"train.iterations={iterations}"] if iterations else []
    results = {}
    for name, label in METHODS:
        print(f"\n== {label} ==", file=sys.stderr)
        cfg = load_config("phantom", overrides + [f"method.name={name}"])
        if iterations:
            cfg.train.eval_every = max(1, iterations // 6)
            cfg.train.ckpt_every = cfg.train.eval_every
        r = train(cfg, out=out / name, progress=progress)
        results[label] = {"run": name, "test": r["test_best"]["mean"], "best_val_dice": r["best_val_dice"],
                          "seconds": r["seconds"], "precision": r["precision"]}
    plot = plot_curves(out / METHODS[0][0] / "metrics.csv", out / "curves.png",
                       runs={label: out / name / "metrics.csv" for name, label in METHODS})
    table = format_demo_table(results)
    (out / "demo.json").write_text(json.dumps(results, indent=1))
    (out / "results.md").write_text(table + "\n")
    print("\nPhantom test set (best-val checkpoint; distances in mm):\n" + table)
    print(f"\nLearning curves: {plot}\nRuns, checkpoints and per-case CSVs: {out}/")
    return 0


def format_demo_table(results: dict) -> str:
    head = "| method | Dice | Jaccard | HD95 (mm) | ASD (mm) | train time (s) |"
    lines = [head, "|" + "---|" * 6]
    for label, r in results.items():
        m = r["test"]
        lines.append(f"| {label} | {m['dice']:.4f} | {m['jaccard']:.4f} | {m['hd95_mm']:.2f} | {m['asd_mm']:.2f} | "
                     f"{r['seconds']:.0f} |")
    return "\n".join(lines)
