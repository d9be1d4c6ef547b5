"""`ssmis demo`: the built-in phantom -> labels-only and BCP -> test table, the gap, and learning curves.

BCP (bidirectional copy-paste) is the semi-supervised method whose margin over labels-only on this phantom is the
largest and most stable: +0.11 to +0.20 test Dice at seeds 0, 1, 2 at 400 steps (docs/demo.md, `python
benchmarks/demo_seeds.py`; tests/test_demo.py asserts at least +0.03 at every seed). Needs no download; about
a minute on 2 CPU cores.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from ssmis.atomic import json_text
from ssmis.config import load_config
from ssmis.errors import UserError

METHODS = (("supervised", "Labels only"), ("bcp", "BCP"))
SEMI = "BCP"
DEMO_ITERATIONS = 400      # BCP: 100 pre-training + 300 self-training steps; its margin was larger at 400 than at 600


def demo_config(method: str, iterations: int | None = None, seed: int | None = None):
    """The demo's run config: the `phantom` preset (64x64 slices, 24 patients: 2 labelled, 12 unlabelled, 4 val,
    6 test; UNet-2D; validation every 100 steps) with `method`, for DEMO_ITERATIONS steps (`iterations` overrides
    them and validates 6 times)."""
    overrides = [f"method.name={method}", f"train.iterations={iterations or DEMO_ITERATIONS}"]
    if seed is not None:
        overrides.append(f"seed={seed}")
    cfg = load_config("phantom", overrides)
    if iterations:
        cfg.train.eval_every = max(1, iterations // 6)
        cfg.train.ckpt_every = cfg.train.eval_every
    return cfg


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
    results = {}
    for name, label in METHODS:
        print(f"\n== {label} ==", file=sys.stderr)
        r = train(demo_config(name, iterations), out=out / name, progress=progress)
        results[label] = {"run": name, "test": r["test_best"]["mean"], "best_val_dice": r["best_val_dice"],
                          "seconds": r["seconds"], "precision": r["precision"]}
    plot = plot_curves(out / METHODS[0][0] / "metrics.csv", out / "curves.png",
                       runs={label: out / name / "metrics.csv" for name, label in METHODS})
    table = format_demo_table(results)
    (out / "demo.json").write_text(json_text(results) + "\n")        # strict JSON: non-finite values as null
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
    base, semi = results.get(METHODS[0][1]), results.get(SEMI)
    if base and semi:
        gap = semi["test"]["dice"] - base["test"]["dice"]
        lines += ["", f"{SEMI} − labels only: {gap:+.4f} test Dice. Both see the same 2 labelled patients; {SEMI} also "
                  "learns from the 12 unlabelled ones (copy-paste mixing with an EMA teacher's pseudo-labels). On this "
                  "phantom the gap was +0.11 to +0.20 at seeds 0, 1, 2 (docs/demo.md)."]
    return "\n".join(lines)
