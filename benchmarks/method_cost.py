"""Cost per iteration of every registered method relative to Mean Teacher, in one run on one machine:
ACDC-lite setting (128x128, 4 labelled + 4 unlabelled), the engine's whole iteration without validation.

Usage: python benchmarks/method_cost.py [--data ../shared/data/ACDC] [--iters 30] [--warmup 5] [--record]
Multi-stage methods are timed in their last (most expensive) stage.
"""

from __future__ import annotations

import argparse
import datetime
import time
from pathlib import Path

import torch

from ssmis.config import load_config
from ssmis.engine.run import setup
from ssmis.registry import METHODS
from _common import cpu_model, record  # noqa: E402  (benchmarks/ is the script folder)

ROOT = Path(__file__).resolve().parents[1]




def seconds_per_iteration(method: str, data: str, iters: int, warmup: int) -> tuple[float, str]:
    total = 1000
    cfg = load_config(ROOT / "configs" / "acdc_lite.yaml",
                      [f"data.root={data}", f"method.name={method}", f"train.iterations={total}",
                       "train.eval_every=0", "train.ckpt_every=100000"])
    trainer = setup(cfg, None, log=lambda m: None)
    trainer.val_cases = []
    start = max(trainer.stage_bounds().values())          # time the last stage
    trainer.step = start
    trainer.fit(progress=False, stop_after=start + warmup)
    t0 = time.perf_counter()
    trainer.fit(progress=False, stop_after=start + warmup + iters)
    return (time.perf_counter() - t0) / iters, trainer.precision.label


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "ACDC"))
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--methods", nargs="*", default=None)
    ap.add_argument("--record", action="store_true", help="append the table to docs/benchmarks.md")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    methods = a.methods or METHODS.list()
    if "mean_teacher" not in methods:
        methods = ["mean_teacher", *methods]
    times, precision = {}, ""
    for m in methods:
        times[m], precision = seconds_per_iteration(m, a.data, a.iters, a.warmup)
        print(f"{m:14s} {times[m]:.3f} s/it", flush=True)
    ref = times["mean_teacher"]
    rows = [f"| {m} | {t:.3f} | {t / ref:.2f} |" for m, t in times.items()]
    text = "\n".join([
        "", "## Cost per iteration relative to Mean Teacher (ACDC-lite: 128x128, 4 + 4)", "",
        f"- Command: `python benchmarks/method_cost.py --iters {a.iters} --warmup {a.warmup} --threads {a.threads}`",
        f"- Date: {datetime.date.today()}; CPU: {cpu_model()}, {a.threads} threads; torch {torch.__version__}; "
        f"precision {precision}",
        "- The engine's whole iteration (sampling, augmentation, forward/backward, teacher updates), no validation; "
        "multi-stage methods timed in their last stage.", "",
        "| method | s/it | relative to Mean Teacher |", "|---|---|---|", *rows, ""])
    print(text)
    if a.record:
        record(text)


if __name__ == "__main__":
    main()
