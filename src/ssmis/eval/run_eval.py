"""`ssmis eval --run`: score a run's checkpoint on its val or test split, per case and class, in 3D."""

from __future__ import annotations

import sys
from pathlib import Path

from tqdm import tqdm

from ssmis.config import load_config
from ssmis.data.adapter import make_adapter
from ssmis.data.splits import Splits
from ssmis.errors import UserError
from ssmis.eval.metrics import case_metrics
from ssmis.eval.report import format_table, write_report
from ssmis.predict import load_trained_model


def load_run(run_dir: Path):
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise UserError(str(run_dir), "not an ssmis run directory (no config.yaml)", "Point --run to a training run.")
    import yaml

    raw = yaml.safe_load((run_dir / "config.yaml").read_text())
    raw.pop("ssmis", None)
    return load_config(None, data=raw), Splits.read(run_dir / "splits.json")


def evaluate_run(run_dir: str | Path, split: str = "test", checkpoint: str = "best", quiet: bool = False,
                 largest_component: bool | None = None) -> dict:
    """Score one checkpoint of a run on its `split`; writes eval/<split>-<checkpoint>/ and returns the summary.
    `largest_component` overrides the run's eval.largest_component; the report then goes to a folder
    ending in -lcc (on) or -raw (off), so the run's own report is never replaced."""
    return evaluate_checkpoints(run_dir, split, (checkpoint,), quiet, largest_component)[checkpoint]


def _same_weights(a, b) -> bool:
    sa, sb = a.net.state_dict(), b.net.state_dict()
    return sa.keys() == sb.keys() and all(sa[k].equal(sb[k]) for k in sa)


def evaluate_checkpoints(run_dir: str | Path, split: str = "test", checkpoints=("best", "last"),
                         quiet: bool = False, largest_component: bool | None = None) -> dict[str, dict]:
    """Score several checkpoints of a run; a checkpoint holding the same weights as one already scored (best
    validation at the last step) reuses its predictions instead of predicting every case again."""
    run_dir = Path(run_dir)
    cfg, splits = load_run(run_dir)
    adapter = make_adapter(cfg.data.layout, cfg.data.root, cfg.data)
    info = adapter.info()
    by_id = {it.id: it for it in adapter.items("train") + adapter.items("eval")}
    ids = getattr(splits, split)
    if not ids:
        raise UserError(f"{run_dir}/splits.json", f"the {split} split is empty", "Choose another --split.")
    num_classes = cfg.data.num_classes or info.num_classes
    suffix = ""
    if largest_component is not None and largest_component != cfg.eval.largest_component:
        suffix = "-lcc" if largest_component else "-raw"
    lcc = cfg.eval.largest_component if largest_component is None else largest_component
    scored: list[tuple[object, list[dict]]] = []        # (model, rows) of the checkpoints predicted so far
    out = {}
    for checkpoint in checkpoints:
        model = load_trained_model(run_dir, checkpoint, device="cpu" if cfg.train.device == "cpu" else "auto")
        model.cfg.eval.largest_component = lcc
        rows = next((r for m, r in scored if m.state_step == model.state_step and _same_weights(m, model)), None)
        if rows is None:
            rows = []
            for cid in tqdm(ids, desc=f"eval {split} ({checkpoint})", disable=quiet, file=sys.stderr):
                it = by_id[cid]
                s = adapter.load(it)
                pred = model.predict(s["image"])
                for r in case_metrics(pred, s["label"], range(1, num_classes), s.get("spacing"), cfg.eval.hd95,
                                      cfg.eval.empty_both, cfg.eval.empty_one):
                    rows.append({"case": cid, "patient": it.patient, **r})
            scored.append((model, rows))
        conventions = {"split": split, "checkpoint": checkpoint, "step": model.state_step,
                       "selection": "best validation Dice" if checkpoint == "best" else "last step",
                       "hd95": cfg.eval.hd95, "empty_both": cfg.eval.empty_both, "empty_one": cfg.eval.empty_one,
                       "inference": (f"slice-wise at {cfg.data.patch_size}, image order {cfg.data.image_order}, "
                                     "labels resized back with order 0") if len(cfg.data.patch_size) == 2 else
                                    (f"sliding window {cfg.data.patch_size}, overlap {cfg.eval.overlap}, Gaussian weights"),
                       "postprocess": "largest connected component per class" if lcc else "none",
                       "precision": model.precision.label,
                       "units": "vox and mm" if info.spacing_known else "vox (dataset has no spacing)"}
        summary = write_report(rows, run_dir / "eval" / f"{split}-{checkpoint}{suffix}", conventions)
        if not quiet:
            names = dict(enumerate(info.class_names)) if info.class_names else None
            print(f"{run_dir} ({checkpoint} checkpoint, step {model.state_step}, {split}: {len(ids)} cases)")
            print(format_table(summary, names))
        out[checkpoint] = summary
    return out
