"""Where the 2D augmentation acts, on the real ACDC training slices (issue 18): `data.augment_at=source` (SSL4MIS
RandomGenerator's order: rotation / rot90-flip at the slice's own size, then the zoom to the patch; one resample
per batch) against `patch` (slices resized at load, augmented at the patch size; ACDC-lite generation 1).

For every labelled slice drawn with a rotation, the share of foreground pixels (either map) whose class differs
between the two orders, with the same draws; and the time to make a batch of each kind on this machine.

Usage: python benchmarks/augment_geometry.py [--data ../shared/data/ACDC] [--labeled 136] [--batches 200]
       [--record]   (appends the section to docs/benchmarks.md)
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from ssmis.config import load_config
from ssmis.data.adapter import make_adapter
from ssmis.data.dataset import build_slice_set
from ssmis.data.resample import draw_geometry
from _common import record, section  # noqa: E402  (benchmarks/ is the script folder)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="../shared/data/ACDC")
    ap.add_argument("--labeled", type=int, default=136, help="the first N slices of train_slices.list")
    ap.add_argument("--batches", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--record", action="store_true")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    cfg = load_config(None, data={"data": {"layout": "ssl4mis_h5", "root": a.data}})
    adapter = make_adapter("ssl4mis_h5", a.data, cfg.data)
    items = adapter.items("train")[: a.labeled]
    patch = (a.size, a.size)
    sets = {at: build_slice_set(adapter, items, patch, True, augment_at=at) for at in ("patch", "source")}
    moved, times = [], {"patch": [], "source": []}
    for b in range(a.batches):
        idx = torch.randint(len(items), (a.batch_size,), generator=torch.Generator().manual_seed(b))
        out = {}
        for at, s in sets.items():
            t0 = time.perf_counter()
            out[at] = s.batch(idx, torch.Generator().manual_seed(b), "ssl4mis")[1]
            times[at].append(time.perf_counter() - t0)
        g = draw_geometry(a.batch_size, torch.Generator().manual_seed(b), "ssl4mis")
        for i in torch.nonzero(g.rotate).flatten().tolist():
            fg = (out["patch"][i] > 0) | (out["source"][i] > 0)
            if fg.any():
                moved.append(float((out["patch"][i] != out["source"][i])[fg].float().mean()))
    q = statistics.quantiles(moved, n=20)
    rows = [f"| foreground pixels of a rotated slice whose class differs | {statistics.median(moved):.3f} | "
            f"{q[0]:.3f} | {q[-1]:.3f} | {len(moved)} slices |",
            f"| making a batch of {a.batch_size}, `patch` (s) | {statistics.median(times['patch']):.4f} | | | |",
            f"| making a batch of {a.batch_size}, `source` (s) | {statistics.median(times['source']):.4f} | | | |"]
    text = section(f"Augmentation order on ACDC: rotate then zoom (`source`) vs zoom then rotate (`patch`), {a.size}x{a.size}",
                   f"python benchmarks/augment_geometry.py --labeled {a.labeled} --batches {a.batches} "
                   f"--batch-size {a.batch_size} --size {a.size} --threads {a.threads}",
                   f"{a.threads} threads; torch {torch.__version__}",
                   [f"the first {a.labeled} slices of train_slices.list, drawn with SSL4MIS RandomGenerator's "
                    "draws; the same draws for both orders; label maps compared",
                    "memory of the stored slices: " + ", ".join(
                        f"`{at}` {sum(t.numel() * t.element_size() for t in (s.images, s.labels)) / 2**20:.1f} MiB"
                        for at, s in sets.items())],
                   ["measure", "median", "5th pct", "95th pct", "n"], rows)
    print(text)
    if a.record:
        record(text)


if __name__ == "__main__":
    main()
