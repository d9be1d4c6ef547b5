"""Time the 2D U-Net forward+backward in the four CPU precision modes (fp32/bf16 x channels_last on/off).

Usage: python benchmarks/precision_modes.py [--iters 20] [--batch 8] [--size 128] [--threads 2]
Prints s/it per mode and which one `train.amp=auto` picks on this machine.
"""

from __future__ import annotations

import argparse
import time

import torch

from ssmis.engine.amp import resolve_precision
from ssmis.losses import ce_dice_loss
from ssmis.models.unet import UNet2D
from _common import cpu_model  # noqa: E402  (benchmarks/ is the script folder)




def time_mode(bf16: bool, cl: bool, iters: int, batch: int, size: int) -> float:
    torch.manual_seed(0)
    model = UNet2D()
    x = torch.randn(batch, 1, size, size)
    y = torch.randint(0, 4, (batch, size, size))
    if cl:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    times = []
    for i in range(iters + 3):
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = ce_dice_loss(model(x).logits, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= 3:
            times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    print(f"CPU: {cpu_model()}; torch {torch.__version__}; {a.threads} threads; batch {a.batch} at {a.size}²")
    for bf16 in (False, True):
        for cl in (False, True):
            s = time_mode(bf16, cl, a.iters, a.batch, a.size)
            print(f"{'bf16' if bf16 else 'fp32'}{' + channels_last' if cl else '':18s} {s:.3f} s/it (median of {a.iters})")
    print("auto picks:", resolve_precision("auto", "auto", torch.device("cpu")).label)


if __name__ == "__main__":
    main()
