"""Mean Teacher throughput on ACDC at 128x128 with 4 labelled + 4 unlabelled slices: the full ssmis iteration
(sampling, augmentation, forward/backward, EMA, logging) against the bare forward/backward step of the same
network, batch and precision, measured in one run in alternating blocks of 10 iterations (medians), for
fp32 + channels_last and bf16 + channels_last.

Usage: python benchmarks/throughput.py [--data ../shared/data/ACDC] [--iters 50] [--warmup 10] [--threads 2]
Appends its table to docs/benchmarks.md with --record.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from ssmis.config import load_config
from ssmis.engine.ema import EMA
from ssmis.engine.run import setup
from ssmis.losses import ce_dice_loss, softmax_mse
from ssmis.methods.base import teacher_noise
from ssmis.models.unet import UNet2D
from _common import record, section  # noqa: E402  (benchmarks/ is the script folder)




def bare_stepper(amp: str):
    """A function running n bare steps: student F+B on 8 images, teacher forward on 4, SGD step; nothing else."""
    torch.manual_seed(0)
    student = UNet2D().to(memory_format=torch.channels_last)
    teacher = EMA(student)
    opt = torch.optim.SGD(student.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    x = torch.rand(8, 1, 128, 128).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 4, (4, 128, 128))

    def run(n: int) -> None:
        for _ in range(n):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp == "bf16"):
                z = student(x).logits
                with torch.no_grad():
                    tp = teacher(teacher_noise(x[4:])).logits.float().softmax(1)
                loss = ce_dice_loss(z[:4], y) + 0.1 * softmax_mse(z[4:], tp).mean()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    return run


def ssmis_stepper(data: str, amp: str, total: int):
    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "acdc_lite.yaml",
                      [f"data.root={data}", f"train.amp={amp}", f"train.iterations={total}",
                       "train.eval_every=0", "train.ckpt_every=100000", "method.name=mean_teacher"])
    trainer = setup(cfg, None, log=lambda m: None)
    trainer.val_cases = []                       # validation is not part of an iteration

    def run(n: int) -> None:
        trainer.fit(progress=False, stop_after=trainer.step + n)
    return run


def interleaved(a, b, iters: int, warmup: int, block: int = 10) -> tuple[float, float]:
    """Median s/it of `a` and `b` over alternating blocks, so that drifts of the machine hit both alike."""
    a(warmup)
    b(warmup)
    ta, tb = [], []
    for _ in range(max(1, iters // block)):
        for f, acc in ((a, ta), (b, tb)):
            t0 = time.perf_counter()
            f(block)
            acc.append((time.perf_counter() - t0) / block)
    return statistics.median(ta), statistics.median(tb)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="../shared/data/ACDC")
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--record", action="store_true", help="append the table to docs/benchmarks.md")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    rows = []
    for amp, label in (("off", "fp32 + channels_last"), ("bf16", "bf16 + channels_last")):
        bare, full = interleaved(bare_stepper(amp), ssmis_stepper(a.data, amp, 10 * (a.iters + a.warmup)),
                                 a.iters, a.warmup)
        rows.append(f"| {label} | {bare:.3f} | {full:.3f} | {full / bare:.3f} |")
        print(rows[-1], flush=True)
    auto = load_config(Path(__file__).resolve().parents[1] / "configs" / "acdc_lite.yaml").train.amp
    from ssmis.engine.amp import resolve_precision

    picked = resolve_precision(auto, "auto", torch.device("cpu")).label
    text = section("Mean Teacher throughput, ACDC 128x128, 4 labelled + 4 unlabelled",
                   f"python benchmarks/throughput.py --iters {a.iters} --warmup {a.warmup} --threads {a.threads}",
                   f"{a.threads} threads; torch {torch.__version__}",
                   [f"`train.amp=auto` picks on this CPU: {picked}",
                    "bare = student forward+backward on 8 slices, teacher forward on 4, SGD step; ssmis = the engine's "
                    "whole iteration (two-stream sampling, augmentation, forward/backward, EMA update, logging), no "
                    "validation; medians over alternating blocks of 10 iterations."],
                   ["precision", "bare step (s/it)", "ssmis iteration (s/it)", "ratio"], rows)
    print(text)
    if a.record:
        record(text)


if __name__ == "__main__":
    main()
