"""`ssmis eval --run`: score a run's checkpoint on its val or test split, per case and class, in 3D."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from tqdm import tqdm

from ssmis.config import load_config
from ssmis.data.adapter import make_adapter
from ssmis.data.splits import Splits
from ssmis.errors import UserError
from ssmis.eval.hc_error import format_hc, hc_row
from ssmis.eval.metrics import case_metrics
from ssmis.eval.report import format_table, selection_rule, write_report
from ssmis.predict import load_trained_model


def load_run(run_dir: Path):
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise UserError(str(run_dir), "not an ssmis run directory (no config.yaml)", "Point --run to a training run.")
    import yaml

    raw = yaml.safe_load((run_dir / "config.yaml").read_text())
    raw.pop("ssmis", None)
    return load_config(None, data=raw), Splits.read(run_dir / "splits.json")


def restore_run(run_dir: Path, checkpoint: str = "last"):
    """(config, splits, trainer, checkpoint state) of a finished or stopped run, every module of the trainer holding
    the checkpoint's weights; for analyses of a run's networks (benchmarks/eval_mode_gap.py,
    c3s3_term_gradients.py). The trainer's optimiser, step, RNG and batch streams are as set up, not restored:
    `trainer.load_state_dict(state)` does that where a script needs the run's own stream positions."""
    from ssmis.engine.checkpoint import load_checkpoint
    from ssmis.engine.run import setup

    cfg, splits = load_run(run_dir)
    state = load_checkpoint(Path(run_dir) / "checkpoints" / f"{checkpoint}.pt")
    trainer = setup(cfg, Path(run_dir), resuming=True, log=lambda *_: None)
    trainer.load_modules(state["modules"])
    return cfg, splits, trainer, state


def evaluate_run(run_dir: str | Path, split: str = "test", checkpoint: str = "best", quiet: bool = False,
                 largest_component: bool | None = None, cases: list[str] | None = None,
                 max_cases: int | None = None, ensemble: bool = False) -> dict:
    """Score one checkpoint of a run on its `split`; writes eval/<split>-<checkpoint>/ and returns the summary.
    `largest_component` overrides the run's eval.largest_component; the report then goes to a folder
    ending in -lcc (on) or -raw (off), so the run's own report is never replaced. `cases` (ids of the split) or
    `max_cases` (its first N) score a subset, reported in a folder ending in -cases<N> or -first<N>. `ensemble`
    scores a two-network run's softmax average instead of network 1, reported in a folder ending in -ensemble."""
    return evaluate_checkpoints(run_dir, split, (checkpoint,), quiet, largest_component, cases, max_cases,
                                ensemble)[checkpoint]


def _subset(ids: list[str], split: str, cases: list[str] | None, max_cases: int | None) -> tuple[list[str], str, str]:
    """(case ids to score, report-folder suffix, description) for the whole split or a subset of it."""
    if cases and max_cases:
        raise UserError("ssmis eval", "--cases and --max-cases cannot be combined", "Use one of them.")
    if cases:
        unknown = [c for c in cases if c not in ids]
        if unknown:
            raise UserError("--cases", f"{unknown[:3]} not in the {split} split",
                            f"Choose among its {len(ids)} cases (splits.json), e.g. {ids[:3]}.")
        chosen = list(dict.fromkeys(cases))
        return chosen, f"-cases{len(chosen)}", f"subset: {len(chosen)} chosen of the {len(ids)} {split} cases"
    if max_cases is not None:
        if max_cases < 1:
            raise UserError("--max-cases", f"{max_cases} is not a case count", "Give N >= 1.")
        if max_cases < len(ids):
            what = f"subset: the first {max_cases} of the {len(ids)} {split} cases"
            return ids[:max_cases], f"-first{max_cases}", what
    return list(ids), "", f"all {len(ids)} {split} cases"


def _spacing_note(cfg, info) -> str:
    if cfg.data.spacing:
        return f"data.spacing {cfg.data.spacing} mm (stated in the config; the files carry none)"
    return "from the files" if info.spacing_known else "unknown (the files carry none; set data.spacing for mm)"


def _window(cfg) -> str:
    if len(cfg.data.patch_size) == 2:
        return (f"slice-wise at {cfg.data.patch_size}, image order {cfg.data.image_order}, "
                "labels resized back with order 0")
    step = f"stride {cfg.eval.stride}" if cfg.eval.stride else f"overlap {cfg.eval.overlap}"
    return f"sliding window {cfg.data.patch_size}, {step}, {cfg.eval.blend} weights"


def _same_weights(a, b) -> bool:
    sa, sb = a.net.state_dict(), b.net.state_dict()
    return sa.keys() == sb.keys() and all(sa[k].equal(sb[k]) for k in sa)


def evaluate_checkpoints(run_dir: str | Path, split: str = "test", checkpoints=("best", "last"),
                         quiet: bool = False, largest_component: bool | None = None, cases: list[str] | None = None,
                         max_cases: int | None = None, ensemble: bool = False) -> dict[str, dict]:
    """Score several checkpoints of a run; a checkpoint holding the same weights as one already scored (best
    validation at the last step) reuses its predictions instead of predicting every case again. Each case's
    time and Dice go to the run's log.txt (and to stderr unless `quiet`)."""
    run_dir = Path(run_dir)
    cfg, splits = load_run(run_dir)
    ids = getattr(splits, split)
    if not ids:
        raise UserError(f"{run_dir}/splits.json", f"the {split} split is empty", "Choose another --split.")
    ids, subset_suffix, scored_cases = _subset(ids, split, cases, max_cases)
    adapter = make_adapter(cfg.data.layout, cfg.data.root, cfg.data)
    info = adapter.info()
    by_id = {it.id: it for it in adapter.items("train") + adapter.items("eval")}
    num_classes = cfg.data.num_classes or info.num_classes
    suffix = ""
    if largest_component is not None and largest_component != cfg.eval.largest_component:
        suffix = "-lcc" if largest_component else "-raw"
    suffix += subset_suffix + ("-ensemble" if ensemble else "")
    lcc = cfg.eval.largest_component if largest_component is None else largest_component
    scored: list[tuple[object, list[dict]]] = []        # (model, rows) of the checkpoints predicted so far
    out = {}
    for checkpoint in checkpoints:
        model = load_trained_model(run_dir, checkpoint, device="cpu" if cfg.train.device == "cpu" else "auto",
                                   ensemble=ensemble)
        model.cfg.eval.largest_component = lcc
        rows = next((r for m, r in scored if m.state_step == model.state_step and _same_weights(m, model)), None)
        if rows is None:
            rows = []
            bar = tqdm(ids, desc=f"eval {split} ({checkpoint})", disable=quiet, file=sys.stderr)
            for i, cid in enumerate(bar, 1):
                start = time.perf_counter()
                it = by_id[cid]
                s = adapter.load(it)
                pred = model.predict(s["image"])
                case_rows = case_metrics(pred, s["label"], range(1, num_classes), s.get("spacing"), cfg.eval.hd95,
                                         cfg.eval.empty_both, cfg.eval.empty_one)
                if s.get("hc_ref_mm") is not None and pred.ndim == 2:      # HC18: head circumference in mm
                    case_rows[0].update(hc_row(pred == case_rows[0]["class"], s.get("spacing"), s["hc_ref_mm"]))
                rows += [{"case": cid, "patient": it.patient, **r} for r in case_rows]
                dice = [r["dice"] for r in case_rows if r["dice"] == r["dice"]]       # NaN (both empty) left out
                mean_dice = sum(dice) / len(dice) if dice else float("nan")
                line = (f"eval {split} ({checkpoint} checkpoint) case {i}/{len(ids)} {cid}: "
                        f"{time.perf_counter() - start:.1f} s, Dice {mean_dice:.4f}")
                _append_log(run_dir, line)
                if not quiet:
                    bar.write(line, file=sys.stderr)
            scored.append((model, rows))
        conventions = {"split": split, "checkpoint": checkpoint, "step": model.state_step,
                       "selection": selection_rule(bool(splits.val)) if checkpoint == "best" else "last step",
                       "cases": scored_cases,
                       "hd95": cfg.eval.hd95, "empty_both": cfg.eval.empty_both, "empty_one": cfg.eval.empty_one,
                       "inference": _window(cfg),
                       "postprocess": "largest connected component per class" if lcc else "none",
                       "precision": model.precision.label,
                       "spacing": _spacing_note(cfg, info),
                       "units": "vox and mm" if info.spacing_known else "vox (dataset has no spacing)"}
        if subset_suffix:
            conventions["case_ids"] = list(ids)
        if model.members:                       # a two-network run: say which prediction was scored
            conventions["network"] = (f"softmax average of {' + '.join(model.members)}" if model.averaged else
                                      f"{model.members[0]} (network 1; --ensemble scores the softmax average)")
        summary = write_report(rows, run_dir / "eval" / f"{split}-{checkpoint}{suffix}", conventions)
        if not quiet:
            names = dict(enumerate(info.class_names)) if info.class_names else None
            print(f"{run_dir} ({checkpoint} checkpoint = {conventions['selection']}, step {model.state_step}, "
                  f"{split}: {scored_cases}" + (f"; {conventions['network']})" if model.averaged else ")"))
            print(format_table(summary, names))
            if summary.get("hc"):
                print(format_hc(summary["hc"]))
        out[checkpoint] = summary
    return out


def _append_log(run_dir: Path, line: str) -> None:
    with open(run_dir / "log.txt", "a") as f:
        f.write(line + "\n")
