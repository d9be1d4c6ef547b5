"""Mean Teacher throughput on ACDC at 128x128 with 4 labelled + 4 unlabelled slices: the full ssmis iteration
(sampling, augmentation, forward/backward, EMA, logging) against the bare forward/backward step of the same
network, batch and precision, measured in one run in alternating blocks of 10 iterations (medians), for
fp32 + channels_last and bf16 + channels_last.
With --device cuda (the GPU protocol: 256x256, 12 labelled + 12 unlabelled by default), bf16 only: the bare step
contiguous and channels_last, and the whole iteration of Mean Teacher, BCP and labels-only, with
torch.cuda.synchronize() around every timed block; the GPU's name is printed and recorded.

Usage: python benchmarks/throughput.py [--data ../shared/data/ACDC] [--iters 50] [--warmup 10] [--threads 2]
           [--device cpu|cuda] [--size 256 --labeled-bs 12 --unlabeled-bs 12]
Appends its table to docs/benchmarks.md with --record.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch

from ssmis.config import load_config
from ssmis.engine.ema import EMA
from ssmis.engine.run import setup
from ssmis.engine.threads import thread_budget
from ssmis.losses import ce_dice_loss, softmax_mse
from ssmis.methods.base import teacher_noise
from ssmis.models.unet import UNet2D
from _common import record, section  # noqa: E402  (benchmarks/ is the script folder)




def bare_stepper(amp: str, device: torch.device = torch.device("cpu"), size: int = 128, lb: int = 4, ub: int = 4,
                 channels_last: bool = True):
    """A function running n bare steps: student F+B on lb + ub images, teacher forward on the ub, SGD step; nothing
    else."""
    torch.manual_seed(0)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    student = UNet2D().to(device, memory_format=fmt)
    teacher = EMA(student)
    opt = torch.optim.SGD(student.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    x = torch.rand(lb + ub, 1, size, size, device=device).contiguous(memory_format=fmt)
    y = torch.randint(0, 4, (lb, size, size), device=device)

    def run(n: int) -> None:
        for _ in range(n):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp == "bf16"):
                z = student(x).logits
                with torch.no_grad():
                    tp = teacher(teacher_noise(x[lb:])).logits.float().softmax(1)
                loss = ce_dice_loss(z[:lb], y) + 0.1 * softmax_mse(z[lb:], tp).mean()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    return run


def ssmis_stepper(data: str, amp: str, total: int, threads: int, method: str = "mean_teacher", device: str = "cpu",
                  size: int = 128, lb: int = 4, ub: int = 4, augment_at: str = "source"):
    """A function running n whole ssmis iterations of `method` (multi-stage methods in their last stage)."""
    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "acdc_lite.yaml",
                      [f"data.root={data}", f"train.amp={amp}", f"train.iterations={total}",
                       "train.eval_every=0", "train.ckpt_every=100000", f"method.name={method}",
                       f"train.threads={threads}", f"train.device={device}", f"data.patch_size=[{size},{size}]",
                       f"train.labeled_bs={lb}", f"train.unlabeled_bs={ub}", f"data.augment_at={augment_at}"])
    trainer = setup(cfg, None, log=lambda m: None)
    trainer.val_cases = []                       # validation is not part of an iteration
    trainer.step = max(trainer.stage_bounds().values())

    def run(n: int) -> None:
        trainer.fit(progress=False, stop_after=trainer.step + n)
    return run


def interleaved(fns, iters: int, warmup: int, block: int = 10, sync=lambda: None) -> list[float]:
    """Median s/it of each of `fns` over alternating blocks, so that drifts of the machine hit all alike; `sync`
    waits for queued device work (torch.cuda.synchronize) before and after each timed block."""
    for f in fns:
        f(warmup)
    times = [[] for _ in fns]
    for _ in range(max(1, iters // block)):
        for f, acc in zip(fns, times):
            sync()
            t0 = time.perf_counter()
            f(block)
            sync()
            acc.append((time.perf_counter() - t0) / block)
    return [statistics.median(t) for t in times]


def cuda_main(a, size: int, lb: int, ub: int) -> None:
    """bf16 + channels_last on the GPU: the bare Mean Teacher step (also contiguous), and the whole ssmis iteration
    of Mean Teacher, BCP (self-training stage) and labels-only, all in the same alternating blocks."""
    dev, gpu = torch.device("cuda"), torch.cuda.get_device_name(0)
    print(f"device: {gpu}; {a.threads} threads", flush=True)
    total = 10 * (a.iters + a.warmup)
    runs = {"bare Mean Teacher step, contiguous": bare_stepper("bf16", dev, size, lb, ub, channels_last=False),
            "bare Mean Teacher step, channels_last": bare_stepper("bf16", dev, size, lb, ub)}
    for method, label in (("mean_teacher", "Mean Teacher"), ("bcp", "BCP (self-training)"),
                          ("supervised", "labels-only")):
        runs[f"ssmis {label} iteration"] = ssmis_stepper(a.data, "bf16", total, a.threads, method, "cuda", size, lb, ub)
    times = interleaved(list(runs.values()), a.iters, a.warmup, sync=torch.cuda.synchronize)
    ref = times[1]
    rows = [f"| {k} | {t:.3f} | {t / ref:.2f} |" for k, t in zip(runs, times)]
    print("\n".join(rows), flush=True)
    from ssmis.engine.amp import resolve_precision

    picked = resolve_precision("auto", "auto", dev).label
    text = section(f"GPU throughput, ACDC {size}x{size}, {lb} labelled + {ub} unlabelled",
                   f"python benchmarks/throughput.py --device cuda --size {size} --labeled-bs {lb} "
                   f"--unlabeled-bs {ub} --iters {a.iters} --warmup {a.warmup} --threads {a.threads}",
                   f"GPU: {gpu}; {a.threads} threads; torch {torch.__version__}, CUDA {torch.version.cuda}",
                   [f"`train.amp=auto` and `train.channels_last=auto` pick on this GPU: {picked}; every row runs bf16 "
                    "autocast, the ssmis iterations channels_last",
                    f"bare = student forward+backward on {lb + ub} slices, teacher forward on {ub}, SGD step; ssmis = "
                    "the engine's whole iteration (sampling, augmentation, forward/backward, teacher update, logging), "
                    "no validation, BCP in its self-training stage; medians over alternating blocks of 10 iterations, "
                    "torch.cuda.synchronize() before and after each block."],
                   ["run", "s/it", "relative to the bare channels_last step"], rows)
    print(text)
    if a.record:
        record(text)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="../shared/data/ACDC")
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--threads", type=int, default=None,
                    help="CPU threads (default: 2 on cpu; on cuda the engine's rule, ssmis.engine.threads)")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--size", type=int, default=None, help="patch side (default: 128 on cpu, 256 on cuda)")
    ap.add_argument("--labeled-bs", type=int, default=None, help="default: 4 on cpu, 12 on cuda")
    ap.add_argument("--unlabeled-bs", type=int, default=None, help="default: 4 on cpu, 12 on cuda")
    ap.add_argument("--record", action="store_true", help="append the table to docs/benchmarks.md")
    a = ap.parse_args()
    cuda = a.device == "cuda"
    if cuda and not torch.cuda.is_available():
        raise SystemExit("throughput.py: --device cuda: no CUDA device (torch.cuda.is_available() is False). "
                         "Run it on a GPU machine, or without --device cuda.")
    size, lb, ub = (a.size or (256 if cuda else 128), a.labeled_bs or (12 if cuda else 4),
                    a.unlabeled_bs or (12 if cuda else 4))
    if a.threads is None:
        a.threads = thread_budget("cuda", os.cpu_count() or 1, 1, None)[0] if cuda else 2
    torch.set_num_threads(a.threads)
    if cuda:
        return cuda_main(a, size, lb, ub)
    rows = []
    for amp, label in (("off", "fp32 + channels_last"), ("bf16", "bf16 + channels_last")):
        total = 10 * (a.iters + a.warmup)
        bare, source, patch = interleaved(
            [bare_stepper(amp, size=size, lb=lb, ub=ub)]
            + [ssmis_stepper(a.data, amp, total, a.threads, size=size, lb=lb, ub=ub, augment_at=at)
               for at in ("source", "patch")], a.iters, a.warmup)
        rows.append(f"| {label} | {bare:.3f} | {source:.3f} | {source / bare:.3f} | {patch:.3f} | {patch / bare:.3f} |")
        print(rows[-1], flush=True)
    auto = load_config(Path(__file__).resolve().parents[1] / "configs" / "acdc_lite.yaml").train.amp
    from ssmis.engine.amp import resolve_precision

    picked = resolve_precision(auto, "auto", torch.device("cpu")).label
    shape = "" if (size, lb, ub) == (128, 4, 4) else f" --size {size} --labeled-bs {lb} --unlabeled-bs {ub}"
    text = section(f"Mean Teacher throughput, ACDC {size}x{size}, {lb} labelled + {ub} unlabelled",
                   f"python benchmarks/throughput.py --iters {a.iters} --warmup {a.warmup} --threads {a.threads}{shape}",
                   f"{a.threads} threads; torch {torch.__version__}",
                   [f"`train.amp=auto` picks on this CPU: {picked}",
                    f"bare = student forward+backward on {lb + ub} slices, teacher forward on {ub}, SGD step; ssmis = "
                    "the engine's whole iteration (two-stream sampling, augmentation, forward/backward, EMA update, "
                    "logging), no validation; medians over alternating blocks of 10 iterations.",
                    "`source`: data.augment_at=source (slices at their own size, rotate then zoom, the default); "
                    "`patch`: slices resized at load, augmented at the patch (ACDC-lite's benchmark cells)."],
                   ["precision", "bare step (s/it)", "ssmis, source (s/it)", "ratio", "ssmis, patch (s/it)", "ratio"],
                   rows)
    print(text)
    if a.record:
        record(text)


if __name__ == "__main__":
    main()
