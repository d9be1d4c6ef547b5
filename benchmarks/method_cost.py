"""Cost per iteration of every registered method relative to Mean Teacher, in one run on one machine:
by default the ACDC-lite setting (128x128, 4 labelled + 4 unlabelled), the engine's whole iteration without
validation; --config picks another setting (e.g. configs/acdc3d.yaml for 3D patches).

Usage: python benchmarks/method_cost.py [--config configs/acdc_lite.yaml] [--data ../shared/data/ACDC]
           [--iters 30] [--warmup 5] [--methods ...] [--cpu-allocator heap|system] [--record]
A --methods entry is a registered method name or a method config file (configs/methods/metassl_mt.yaml: a method
with its plug-ins), labelled by the file name; config files bring their own setting, which must match --config's
patch and batch sizes.
Multi-stage methods are timed in their last (most expensive) stage. images/s counts the training images (or 3D
patches) a step draws: labelled + unlabelled, labelled only for methods that use no unlabelled data.
"""

from __future__ import annotations

import argparse
import multiprocessing
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

from ssmis.bench.grid import peak_memory, reset_peak_memory
from ssmis.config import load_config
from ssmis.engine import threads
from ssmis.engine.run import setup
from ssmis.registry import METHODS
from _common import record, section  # noqa: E402  (benchmarks/ is the script folder)

ROOT = Path(__file__).resolve().parents[1]




def seconds_per_iteration(method: str, data: str, iters: int, warmup: int, config: str = "configs/acdc_lite.yaml",
                          n_threads: int | None = None,
                          allocator: str = "heap") -> tuple[float, str, int, float | None]:
    """(s/it, precision, images per step, peak memory in MiB of this method's setup and steps). Meant to run in a
    fresh process per method (see `measure`), so that the peak is this method's alone."""
    if n_threads:
        threads.assign(n_threads, f"--threads {n_threads}")
    total = 1000
    run = [f"data.root={data}", f"train.iterations={total}", "train.eval_every=0", "train.ckpt_every=100000",
           f"train.cpu_allocator={allocator}"]
    if method.endswith((".yaml", ".yml")):
        cfg = load_config(ROOT / method, run)
        base = load_config(ROOT / config)
        if (cfg.data.patch_size, cfg.train.labeled_bs, cfg.train.unlabeled_bs) != (
                base.data.patch_size, base.train.labeled_bs, base.train.unlabeled_bs):
            raise SystemExit(f"{method}: patch or batch sizes differ from {config}")
        method = cfg.method["name"]
    else:
        cfg = load_config(ROOT / config, [*run, f"method.name={method}"])
    reset_peak_memory()
    trainer = setup(cfg, None, log=lambda m: None)
    trainer.val_cases = []
    start = max(trainer.stage_bounds().values())          # time the last stage
    trainer.step = start
    trainer.fit(progress=False, stop_after=start + warmup)
    t0 = time.perf_counter()
    trainer.fit(progress=False, stop_after=start + warmup + iters)
    seconds = (time.perf_counter() - t0) / iters
    precision = trainer.precision.label
    images = cfg.train.labeled_bs + (cfg.train.unlabeled_bs if METHODS.get(method).uses_unlabeled else 0)
    memory = peak_memory()
    peak = memory["peak_cuda_mib"] if memory["peak_cuda_mib"] is not None else memory["peak_rss_mib"]
    return seconds, precision, images, peak


def measure(method: str, data: str, iters: int, warmup: int, config: str, n_threads: int, allocator: str = "heap"):
    """seconds_per_iteration in a fresh process: memory freed by one method would otherwise stay in the process's
    resident set and count towards the next one's peak."""
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"),
                             initializer=sys.path.insert, initargs=(0, str(Path(__file__).parent))) as pool:
        return pool.submit(seconds_per_iteration, method, data, iters, warmup, config, n_threads,
                           allocator).result()


def _mib(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.0f}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="configs/acdc_lite.yaml", help="run config, relative to the repository")
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "ACDC"))
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--methods", nargs="*", default=None)
    ap.add_argument("--cpu-allocator", default="heap", choices=["heap", "system"],
                    help="train.cpu_allocator of every run (heap: the default; system: glibc's)")
    ap.add_argument("--record", action="store_true", help="append the table to docs/benchmarks.md")
    a = ap.parse_args()
    threads.assign(a.threads, f"--threads {a.threads}")   # runs set up below keep this share
    methods = a.methods or METHODS.list()
    if "mean_teacher" not in methods:
        methods = ["mean_teacher", *methods]
    times, images, peaks, precision = {}, {}, {}, ""
    for m in methods:
        label = Path(m).stem if m.endswith((".yaml", ".yml")) else m
        times[label], precision, images[label], peaks[label] = measure(m, a.data, a.iters, a.warmup, a.config,
                                                                       a.threads, a.cpu_allocator)
        print(f"{label:16s} {times[label]:.3f} s/it, peak {peaks[label]} MiB", flush=True)
    ref = times["mean_teacher"]
    rows = [f"| {m} | {t:.3f} | {images[m] / t:.2f} | {t / ref:.2f} | {_mib(peaks[m])} |" for m, t in times.items()]
    cfg = load_config(ROOT / a.config)
    setting = (f"{a.config}: patch {'x'.join(map(str, cfg.data.patch_size))}, {cfg.model.name}, "
               f"{cfg.train.labeled_bs} + {cfg.train.unlabeled_bs}")
    command = (f"python benchmarks/method_cost.py --config {a.config} --iters {a.iters} --warmup {a.warmup} "
               f"--threads {a.threads} --cpu-allocator {a.cpu_allocator}"
               + (f" --methods {' '.join(a.methods)}" if a.methods else ""))
    text = section(f"Cost per iteration relative to Mean Teacher ({setting})", command,
                   (f"{a.threads} threads; torch {torch.__version__}; precision {precision}; "
                    f"train.cpu_allocator={a.cpu_allocator}"),
                   ["The engine's whole iteration (sampling, augmentation, forward/backward, teacher updates), no "
                    "validation; multi-stage methods timed in their last stage. Each method runs in a fresh process, one "
                    "after the other; peak memory: that process's peak resident set (GPU: peak allocated tensors) "
                    "from the method's setup (data loading included) through its timed steps."],
                   ["method", "s/it", "images or patches / s", "relative to Mean Teacher", "peak memory (MiB)"], rows)
    print(text)
    if a.record:
        record(text)


if __name__ == "__main__":
    main()
