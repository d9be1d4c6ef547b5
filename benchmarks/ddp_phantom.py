"""DDP on CPU: one process (2 threads) against two gloo processes (1 thread each, via torchrun) with the same
global batch, on the phantom with Mean Teacher. Reports best validation Dice, test Dice and wall time of both.

Usage: python benchmarks/ddp_phantom.py [--iterations 300] [--record]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from _common import record, section  # noqa: E402  (benchmarks/ is the script folder)



def run(cmd: list[str], env: dict) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--iterations", type=int, default=300)
    ap.add_argument("--record", action="store_true")
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp())
    sets = ["method.name=mean_teacher", f"train.iterations={a.iterations}", "train.eval_every=100",
            "train.ckpt_every=100"]
    args = [x for s in sets for x in ("--set", s)]
    bindir = Path(sys.executable).parent
    rows = []
    for label, cmd, env in [
        ("1 process, 2 threads", [str(bindir / "ssmis"), "train", "phantom", "--out", str(tmp / "one"), *args,
                                  "--set", "train.threads=2"], dict(os.environ)),
        ("2 gloo processes, 1 thread each", [str(bindir / "torchrun"), "--standalone", "--nproc_per_node=2", "-m",
                                             "ssmis", "train", "phantom", "--out", str(tmp / "two"), *args,
                                             "--set", "train.threads=1"], {**os.environ, "OMP_NUM_THREADS": "1"}),
    ]:
        seconds = run(cmd, env)
        out = tmp / ("one" if label.startswith("1") else "two")
        summ = json.loads((out / "train_summary.json").read_text())
        test = json.loads((out / "eval" / "test-best" / "summary.json").read_text())["mean"]["dice"]
        rows.append(f"| {label} | {summ['best_val_dice']:.4f} (step {summ['best_step']}) | {test:.4f} | {seconds:.0f} |")
        print(rows[-1], flush=True)
    shutil.rmtree(tmp)
    text = section("DDP on CPU: 1 process vs 2 gloo processes (phantom, Mean Teacher, same global batch 4 + 4)",
                   f"python benchmarks/ddp_phantom.py --iterations {a.iterations}",
                   "2 cores; wall time includes start-up, data loading, validation every 100 steps and the final "
                   "test evaluation.", [],
                   ["setting", "best val Dice", "test Dice (best-val checkpoint)", "wall time (s)"], rows)
    print(text)
    if a.record:
        record(text)


if __name__ == "__main__":
    main()
