"""How much of the predicted foreground does a displacement take out of a view? CAD's LLCR box against ABD's grid
patch, at DTE progress t/T = 0, 0.5, 1 (issue 16's investigation of CAD (reconstruction) < ABD at ACDC-lite 5 %).

Usage: python benchmarks/cad_llcr_coverage.py RUN_DIR [RUN_DIR ...] [--checkpoint last] [--views 48] [--sides 16 32]
For each trained run (CAD or ABD; only its network 1 and its data are used), `2 x --views` unlabelled slices of the
run's split (a fixed random draw) are resized to the patch size and predicted; view i (first half) is displaced
from view i of the second half, as LLCR and ABD-R pair the two views of a sample. Per rule it prints the box's
share of the image, the share of view i's predicted foreground inside the box (removed), and the foreground share
of the source window put in its place. The thresholds and sizes are CAD's defaults (`configs/methods/cad.yaml`);
`--sides` adds LLCR with s_max fixed at those pixel sides. Unmixed slices, unlike training (where the views are
BCP-mixed images): a proxy for what the displaced images keep, not the training batches themselves.
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

import numpy as np
import torch

from ssmis.data.adapter import make_adapter
from ssmis.data.mixing import patch_confidence
from ssmis.data.resize import resize2d
from ssmis.eval.run_eval import load_run
from ssmis.methods.cad import CAD, dte, llcr_regions, pixels
from ssmis.predict import load_trained_model


def views(run: Path, n: int, size: tuple[int, int]) -> torch.Tensor:
    cfg, splits = load_run(run)
    adapter = make_adapter(cfg.data.layout, cfg.data.root, cfg.data)
    by_id = {it.id: it for it in adapter.items("train")}
    ids = random.Random(0).sample(sorted(splits.unlabeled), 2 * n)
    imgs = [resize2d(np.asarray(adapter.load(by_id[i])["image"], np.float32).squeeze(), size, 0) for i in ids]
    return torch.from_numpy(np.stack(imgs))[:, None]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--checkpoint", default="last")
    ap.add_argument("--views", type=int, default=48)
    ap.add_argument("--sides", type=int, nargs="*", default=[32])
    a = ap.parse_args()
    torch.set_num_threads(1)
    d = CAD.Config()
    print("| run | rule | box share of the image | predicted foreground removed | source window foreground |")
    print("|---|---|---|---|---|")
    for run in a.runs:
        model = load_trained_model(run, a.checkpoint, "cpu")
        h, w = model.cfg.data.patch_size
        x = views(run, a.views, (h, w))
        with torch.no_grad():
            p = torch.cat([model.net(x[k:k + 16]).logits.float() for k in range(0, len(x), 16)]).softmax(1)
        conf, fg = p.amax(1), p.argmax(1) > 0
        c1, c2, f1, f2 = conf[:a.views], conf[a.views:], fg[:a.views], fg[a.views:]
        g, side = d.grid, h // d.grid
        s1, s2 = patch_confidence(c1[:, None], g), patch_confidence(c2[:, None], g)

        def cell(k: int):
            return slice((k // g) * side, (k // g + 1) * side), slice((k % g) * side, (k % g + 1) * side)

        grid = [(cell(int(i)), cell(int(j))) for i, j in zip(s1.argmin(1), s2.argmax(1))]
        rules = [(f"ABD grid patch ({side} px)", grid)]
        settings = [(t, pixels(dte(t, d.size_start, d.size_end), h), "DTE") for t in (0.0, 0.5, 1.0)]
        settings += [(t, s, "fixed") for s in a.sides for t in (0.0, 0.5, 1.0)]
        for t, s_max, kind in settings:
            tau = dte(t, d.tau_start, d.tau_end)
            regions = llcr_regions(c1, c2, tau, (s_max, s_max), (pixels(d.size_min, h), pixels(d.size_min, w)),
                                   pixels(d.pool_stride, min(h, w)))
            pairs = [grid[i] if r is None else r for i, r in enumerate(regions)]
            rules.append((f"LLCR t/T {t:g}: tau {tau:.2f}, s_max {s_max} px ({kind})", pairs))
        for name, pairs in rules:
            area = np.mean([(r.stop - r.start) * (c.stop - c.start) / (h * w) for (r, c), _ in pairs])
            removed = [f1[i][r, c].sum().item() / f1[i].sum().item() for i, ((r, c), _) in enumerate(pairs)
                       if f1[i].any()]
            source = np.mean([f2[i][r, c].float().mean().item() for i, (_, (r, c)) in enumerate(pairs)])
            print(f"| {run.name} ({a.checkpoint}) | {name} | {area:.3f} | {np.mean(removed):.2f} "
                  f"({len(removed)} views with foreground) | {source:.3f} |")


if __name__ == "__main__":
    main()
