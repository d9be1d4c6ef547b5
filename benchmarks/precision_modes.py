"""Time the U-Net forward+backward in the four CPU precision modes (fp32/bf16 x channels_last on/off).

Usage: python benchmarks/precision_modes.py [--iters 20] [--batch 8] [--size 128] [--threads 2]
       python benchmarks/precision_modes.py --3d [--iters 5] [--batch 4] [--size 128] [--depth 16] [--base 16]
Prints s/it per mode and which one `train.amp=auto` picks on this machine (2D: UNet2D; --3d: UNet3D patches).
"""

from __future__ import annotations

import argparse
import time

import torch

from ssmis.engine.amp import resolve_precision
from ssmis.losses import ce_dice_loss
from ssmis.models.unet import UNet2D
from ssmis.models.unet3d import UNet3D
from _common import cpu_model  # noqa: E402  (benchmarks/ is the script folder)




def time_mode(bf16: bool, cl: bool, iters: int, batch: int, size: int, depth: int = 0, base: int = 16) -> float:
    torch.manual_seed(0)
    spatial = (depth, size, size) if depth else (size, size)
    model = UNet3D(1, 4, widths=[base * 2 ** i for i in range(5)]) if depth else UNet2D()
    x = torch.randn(batch, 1, *spatial)
    y = torch.randint(0, 4, (batch, *spatial))
    if cl:
        fmt = torch.channels_last_3d if depth else torch.channels_last
        model = model.to(memory_format=fmt)
        x = x.contiguous(memory_format=fmt)
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
    ap.add_argument("--3d", dest="three_d", action="store_true", help="time UNet3D on depth x size x size patches")
    ap.add_argument("--depth", type=int, default=16)
    ap.add_argument("--base", type=int, default=16, help="3D: first width of UNet3D (32 = M&N's size)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    depth = a.depth if a.three_d else 0
    shape = f"{depth}x{a.size}x{a.size} (UNet3D base {a.base})" if depth else f"{a.size}²"
    print(f"CPU: {cpu_model()}; torch {torch.__version__}; {a.threads} threads; batch {a.batch} at {shape}")
    # 3D: fp32 only, since bf16 3D gradients were found unreliable on CPU (engine/amp.py) and auto never picks them
    for bf16 in (False,) if depth else (False, True):
        for cl in (False, True):
            s = time_mode(bf16, cl, a.iters, a.batch, a.size, depth, a.base)
            print(f"{'bf16' if bf16 else 'fp32'}{' + channels_last' if cl else '':18s} {s:.3f} s/it (median of {a.iters})")
    print("auto picks:", resolve_precision("auto", "auto", torch.device("cpu"), 3 if depth else 2).label)


if __name__ == "__main__":
    main()
