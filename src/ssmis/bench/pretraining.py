"""Suites whose cells start from a pre-trained encoder (SPCL, `pretrain:` in a suite): one `ssmis pretrain` run per
seed of the grid, in the suite folder beside the cells (`pretrain-s0`), made before the cells that need it; every
cell's `init.encoder` points at its run.

The pre-training uses the cell's seed and split settings (so it never sees the cells' val/test cases) and must read
the cells' data (layout, root, patch size). It uses every training case, labelled or not, in sorted order, so one
pre-training serves every labelled count (as SPCL pre-trains once and fine-tunes each labelled ratio from it).
Its checkpoint is not committed: on a fresh clone a finished pre-training whose checkpoint is gone is run again (the
log says so) when an unfinished cell needs it; with `train.deterministic` on the same kind of CPU it is the same run.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ssmis.bench.locks import run_lock
from ssmis.errors import UserError

SUMMARY = "pretrain_summary.json"


@dataclass
class PretrainRun:
    name: str              # pretrain-s0
    cfg: Any               # RunConfig of `ssmis pretrain`
    dir: Path

    @property
    def state(self) -> str:
        """ready (checkpoint to load) | finished, checkpoint missing | interrupted | started | new."""
        ckpt = (self.dir / "checkpoints" / "last.pt").is_file()
        if (self.dir / SUMMARY).is_file():
            return "ready" if ckpt else "finished, checkpoint missing"
        if ckpt:
            return "interrupted"
        return "started" if self.dir.is_dir() and any(self.dir.iterdir()) else "new"

    def summary(self) -> dict | None:
        p = self.dir / SUMMARY
        return json.loads(p.read_text()) if p.is_file() else None


def pretrain_run_for(pretrain_ref: str, cell_cfg: Any, out: Path, where: str) -> PretrainRun:
    """The pre-training a cell starts from: the suite's pretrain config with the cell's seed and split settings."""
    from ssmis.config import load_config

    data = {"seed": cell_cfg.seed, "split": cell_cfg.split.model_dump(mode="json")}
    try:
        cfg = load_config(pretrain_ref, data=data)
    except UserError as e:
        raise UserError(f"{where}: pretrain", str(e).rstrip(".")) from None
    for key in ("layout", "root", "patch_size"):
        mine, theirs = getattr(cfg.data, key), getattr(cell_cfg.data, key)
        if mine != theirs:
            raise UserError(f"{where}: pretrain", f"the pre-training's data.{key} is {mine!r} but the cells' is "
                            f"{theirs!r}", "Pre-train on the cells' data: give both the same data section.")
    name = f"pretrain-s{cell_cfg.seed}"
    return PretrainRun(name, cfg, out / name)


def same_training_cases(a: Any, b: Any) -> bool:
    """Two split configs give the same training cases (labelled + unlabelled) and val/test, whatever is labelled."""
    ignore = {"labeled", "labeled_scans"}
    return a.model_dump(exclude=ignore) == b.model_dump(exclude=ignore)


def ensure_pretrained(runs: list[PretrainRun], threads: int | None, progress: bool) -> None:
    """Run (or resume, or re-make) every pre-training in `runs` that has no checkpoint to load, one after the other."""
    for r in runs:
        if r.state == "ready":
            continue
        with run_lock(r.dir, wait=True, what="pre-training"):      # another bench process may be making it
            make(r, threads, progress)


def make(r: PretrainRun, threads: int | None, progress: bool) -> None:
    from ssmis.engine import threads as thread_share
    from ssmis.spcl.pretrain import pretrain

    state = r.state           # again: another process may have made it while this one waited
    if state == "ready":
        return
    if threads:
        thread_share.assign(threads, f"ssmis bench --threads {threads}")
    why = {"new": "new", "started": "started without a checkpoint: restarting", "interrupted": "resuming",
           "finished, checkpoint missing": "finished, but its checkpoint is not here (not committed): "
                                           "running it again for the cells that need its encoder"}[state]
    print(f"\n== pre-training {r.name} ({why}) ==", file=sys.stderr)
    result = pretrain(r.cfg, out=r.dir, resume=state == "interrupted",
                      overwrite=state in ("started", "finished, checkpoint missing"), progress=progress)
    if result["step"] < result["total"]:
        raise UserError(str(r.dir), f"pre-training stopped at step {result['step']} of {result['total']}",
                        "See its log.txt; the cells that need it were not trained.")


def pretraining_section(runs: list[PretrainRun]) -> list[str]:
    """results.md lines: what each cell's encoder was pre-trained with, and what it cost."""
    if not runs:
        return []
    lines = ["## Pre-training", "",
             "Every cell starts from the encoder of the `ssmis pretrain` run of its seed (init.encoder; "
             "its last checkpoint). Its steps come on top of the cells' training steps.", "",
             "| run | steps | wall s | s/it | step s | final loss |", "|---|---|---|---|---|---|"]
    for r in runs:
        s = r.summary()
        if s is None:
            lines.append(f"| `{r.name}` | not finished | | | | |")
            continue
        step_s = s.get("median_step_seconds")
        loss = (s.get("last") or {}).get("loss")
        lines.append(f"| `{r.name}` | {s['step']} | {s['seconds']:.0f} | {s['seconds'] / max(s['step'], 1):.3f} | "
                     f"{'' if step_s is None else f'{step_s:.3f}'} | {'' if loss is None else f'{loss:.4f}'} |")
    p = runs[0].cfg.pretrain
    lines += ["", f"Config: meta-labels {', '.join(ml.name for ml in p.meta_labels)}; {p.sampler} sampler, "
              f"{p.scans_per_batch} scans per batch; {p.optimizer} lr {p.lr:g}; {p.epochs} epochs over "
              f"{runs[0].cfg.train.iterations} steps.", ""]
    return lines
