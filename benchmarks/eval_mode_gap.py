"""Validation Dice of a run's networks in eval mode (BatchNorm running statistics, as validation and test use) beside
the same weights normalised with each volume's own batch statistics, and with running statistics re-estimated on
clean training batches with dropout off (issue 20's investigation of C3S3-2D collapsing at ACDC-lite 5 %,
docs/pairs.md). A large gap means the network works in training mode but not in inference mode.

Usage:
  python benchmarks/eval_mode_gap.py RUN_DIR [--checkpoint last] [--cases 10] [--split val|labelled]
  python benchmarks/eval_mode_gap.py --probe NAME --steps 600 [--set key=value ...]   # short C3S3 5 % run first

--probe trains `configs/methods/c3s3.yaml` at 68 labelled slices, seed 0, one thread, for --steps of its 2000-step
schedule (poly lr and ramps as in the full run) into runs/eval_mode_gap/NAME, with the --set overrides, then
measures that run. --split labelled scores the labelled training volumes (restacked from their slices) instead of
the first --cases validation volumes. Slice-wise at the run's patch, float32, every module of the run that is a
network (net1, net2, student, ...).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ssmis.config.load import load_config
from ssmis.data.adapter import make_adapter
from ssmis.engine.run import train
from ssmis.eval.inference import dice_per_class, predict_slicewise
from ssmis.eval.run_eval import restore_run

DROPOUTS = (nn.Dropout, nn.Dropout2d, nn.Dropout3d)


class BatchStatistics(nn.Module):
    """Inference with every BatchNorm normalising by the current batch (one volume) and dropout off; the running
    statistics are left untouched (momentum 0 while wrapped)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def train(self, mode: bool = True):
        super().train(False)
        for m in self.net.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.train(True)
                m.momentum = 0.0
        return self

    def forward(self, x, **kw):
        return self.net(x, **kw)


def volumes(trainer, cfg, labelled_ids: list[str], split: str, count: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(image C×D×H×W, label) of the first `count` validation volumes (as the run's setup loaded them), or of the
    labelled training volumes, restacked from their slices by the data adapter (`data.restack_volumes`)."""
    if split == "val":
        return [(vc.image, vc.label) for vc in trainer.val_cases[:count]]
    adapter = make_adapter(cfg.data.layout, cfg.data.root, cfg.data.model_copy(update={"restack_volumes": True}))
    wanted = set(labelled_ids)
    vols = [it for it in adapter.items("train") if any(Path(p).stem in wanted for p in it.meta.get("slices", []))]
    return [(s["image"], s["label"]) for s in map(adapter.load, vols)]


def mean_dice(model: nn.Module, vols, patch, classes: int) -> float:
    return float(np.mean([np.nanmean(dice_per_class(predict_slicewise(model, img.astype(np.float32), patch,
                                                                      batch_size=64), lab, classes))
                          for img, lab in vols]))


@torch.no_grad()
def recalibrated(net: nn.Module, batches) -> nn.Module:
    """The network with running statistics re-estimated (cumulative average) on clean training batches, dropout off."""
    for m in net.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None
    net.train()
    for m in net.modules():
        if isinstance(m, DROPOUTS):
            m.eval()
    for lb, ub in batches:
        net(torch.cat([lb.image, ub.image]) if ub is not None else lb.image)
    return net


def measure(run: Path, checkpoint: str, split: str, count: int) -> dict:
    cfg, splits, trainer, state = restore_run(run, checkpoint)
    vols = volumes(trainer, cfg, splits.labeled, split, count)
    batches = [trainer._batches() for _ in range(40)]
    patch, classes = tuple(cfg.data.patch_size), trainer.ctx.num_classes
    result = {"step": int(state.get("step", 0))}
    for name, net in trainer.ctx.modules.items():
        if not hasattr(net, "init_args"):            # projectors and other heads: not networks
            continue
        result[f"{name} eval"] = mean_dice(net, vols, patch, classes)
        result[f"{name} volume batch stats"] = mean_dice(BatchStatistics(net), vols, patch, classes)
        result[f"{name} eval, stats re-estimated without dropout"] = mean_dice(recalibrated(net, batches), vols,
                                                                              patch, classes)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path, nargs="?")
    ap.add_argument("--checkpoint", default="last")
    ap.add_argument("--split", choices=("val", "labelled"), default="val")
    ap.add_argument("--cases", type=int, default=10)
    ap.add_argument("--probe")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--set", action="append", default=[])
    a = ap.parse_args()
    torch.set_num_threads(1)
    run = a.run
    if a.probe:
        run = Path("runs/eval_mode_gap") / a.probe
        cfg = load_config("configs/methods/c3s3.yaml", ["split.labeled=68", "seed=0", "train.threads=1", *a.set])
        train(cfg, run, resume=(run / "config.yaml").exists(), progress=False, stop_after=a.steps, test_at_end=False)
    if run is None:
        ap.error("give RUN_DIR or --probe NAME")
    res = measure(run, a.checkpoint, a.split, a.cases)
    print(f"{run} ({a.checkpoint}, step {res.pop('step')}, {a.split}): "
          + ", ".join(f"{k} {v:.4f}" for k, v in res.items()))


if __name__ == "__main__":
    main()
