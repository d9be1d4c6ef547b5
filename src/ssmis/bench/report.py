"""Bench reports: results.csv (one row per run, checkpoint and class), results.md (protocol, fairness check,
mean ± std over seeds, best per column in bold) and plots (Dice bars, learning curves, qualitative slices)."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ssmis import __version__
from ssmis.atomic import atomic_write_text
from ssmis.bench.grid import CELL_RECORD, Cell, Suite, base_label, is_method_key, pretrain_runs, value_tag
from ssmis.bench.pretraining import pretraining_section
from ssmis.data.splits import PARTS, Splits
from ssmis.errors import UserError

METRICS = ("dice", "jaccard", "hd95_vox", "asd_vox", "hd95_mm", "asd_mm")
HC_METRICS = ("hc_err_mm", "hc_err_median_mm", "hc_measured", "hc_empty", "hc_failed_fits")   # HC18 cells only


def _hc_values(summ: dict) -> dict:
    """The HC columns of a cell's test summary (HC18: absolute head-circumference error); {} without them."""
    hc = summ.get("hc")
    if not hc:
        return {}
    e = hc["abs_err_mm"]
    return {"hc_err_mm": _num(e["mean"]), "hc_err_median_mm": _num(e["median"]), "hc_measured": hc["measured"],
            "hc_empty": hc["empty_predictions"], "hc_failed_fits": hc["failed_fits"]}


@dataclass
class RunResult:
    cell: Cell
    best: dict                   # eval/test-best/summary.json
    last: dict | None            # eval/test-last/summary.json
    train: dict                  # train_summary.json
    record: dict | None          # bench_cell.json (absent for cells trained outside the bench)
    splits: Splits

    @property
    def method(self) -> str:
        """The method's name, or for a grid over method configs (`base`) the config's name (metassl_mt)."""
        if "base" in self.cell.values:
            return base_label(self.cell.values["base"])
        if isinstance(self.cell.values.get("method"), dict):         # a grid over whole method sections
            return value_tag(self.cell.values["method"])
        return str(self.cell.cfg.method["name"])

    @property
    def labeled(self) -> float:
        """split.labeled, or the number of split.labeled_scans."""
        scans = self.cell.cfg.split.labeled_scans
        return float(len(scans)) if scans else float(self.cell.cfg.split.labeled)

    @property
    def setting(self) -> tuple:
        """What a row of the table aggregates over seeds: every grid value but the seed."""
        return tuple((k, json.dumps(v, sort_keys=True, default=str)) for k, v in self.cell.values.items() if k != "seed")

    @property
    def block(self) -> tuple:
        """Rows compared with each other (bold best): same grid values apart from the method and the seed."""
        return tuple(kv for kv in self.setting if not is_method_key(kv[0]))


def _json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def load_results(cells: Sequence[Cell]) -> list[RunResult]:
    out = []
    for c in cells:
        if c.state != "finished":
            continue
        d = c.dir
        out.append(RunResult(c, _json(d / "eval" / "test-best" / "summary.json"), _json(d / "eval" / "test-last" / "summary.json"),
                             _json(d / "train_summary.json"), _json(d / CELL_RECORD), Splits.read(d / "splits.json")))
    return out


def protocol(cfg) -> dict:
    """What cells compared in one table must share: the config without the method's own parts (method and plug-in
    sections, the run name, the augmentation a method chooses)."""
    d = {k: v for k, v in cfg.model_dump(mode="json").items() if k not in ("method", "name", "plugins")}
    d["train"] = {k: v for k, v in d["train"].items() if k != "augment"}
    return d


def check_fair(results: Sequence[RunResult]) -> list[tuple[tuple, list[str], str]]:
    """All methods of one setting (labelled count, seed, any other grid value) must share one split and a config
    that differs only in the method section.

    Returns (block + seed, cells, split digest) per group; a differing splits.json is an error naming both cells.
    """
    groups: dict[tuple, list[RunResult]] = {}
    for r in results:
        key = r.block + tuple((k, json.dumps(v, default=str)) for k, v in r.cell.values.items() if k == "seed")
        groups.setdefault(key, []).append(r)
    out = []
    for key, rs in groups.items():
        same = [protocol(r.cell.cfg) for r in rs]
        for r, c in zip(rs[1:], same[1:]):
            if c != same[0]:
                raise UserError(str(r.cell.dir / "config.yaml"), f"differs from {rs[0].cell.dir / 'config.yaml'} in more "
                                "than the method (method, plugins, augmentation)",
                                "Fix the suite: only grid keys may differ between cells.")
        lists = [tuple(tuple(getattr(r.splits, p)) for p in PARTS) for r in rs]
        for r, lst in zip(rs[1:], lists[1:]):
            if lst != lists[0]:
                raise UserError(str(r.cell.dir / "splits.json"), f"differs from {rs[0].cell.dir / 'splits.json'} "
                                "although both cells share labelled count and seed: the comparison would be unfair",
                                "Delete the cell that is wrong and run the suite again.")
        digest = hashlib.sha256(json.dumps(lists[0]).encode()).hexdigest()[:12]
        out.append((key, [r.cell.name for r in rs], digest))
    return out


def _unit(results: Sequence[RunResult]) -> str:
    return "mm" if all(r.best["mean"].get("hd95_mm") is not None for r in results) else "vox"


def _val(x) -> float:
    return math.nan if x is None else float(x)


def _setting_label(key: tuple, labeled: float | None = None) -> str:
    """`labelled 136, seed 0` from (grid key, JSON value) pairs; `labeled` names a count the grid does not vary."""
    parts = [f"labelled {labeled:g}"] if labeled is not None and all(k != "split.labeled" for k, _ in key) else []
    for k, v in key:
        parts.append(("labelled " if k == "split.labeled" else k.rsplit(".", 1)[-1] + " ") + value_tag(json.loads(v)))
    return ", ".join(parts) or "all cells"


def _class_names(results: Sequence[RunResult]) -> dict[str, str]:
    from ssmis.data.adapter import make_adapter

    cfg = results[0].cell.cfg
    try:
        names = make_adapter(cfg.data.layout, cfg.data.root, cfg.data).info().class_names or []
    except (UserError, OSError, ValueError):
        names = []
    keys = sorted({k for r in results for k in r.best["per_class"]}, key=int)
    return {k: names[int(k)] if int(k) < len(names) else f"class {k}" for k in keys}


# ---- results.csv -----------------------------------------------------------------------------------------------
def results_csv(results: Sequence[RunResult], names: dict[str, str]) -> str:
    grid_keys = list(dict.fromkeys(k for r in results for k in r.cell.values))
    cols = (["cell", "method", "labeled", "seed", *[k for k in grid_keys if k not in ("method.name", "base", "split.labeled", "seed")],
             "checkpoint", "step", "class", "class_name", *METRICS,
             *(HC_METRICS if any(r.best.get("hc") for r in results) else ()),
             "cases", "iterations", "s_per_it", "median_step_s", "peak_rss_mib", "precision"])
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n")
    w.writeheader()
    for r in results:
        rec = r.record or {}
        common = {"cell": r.cell.name, "method": r.method, "labeled": f"{r.labeled:g}", "seed": r.cell.cfg.seed,
                  **{k: value_tag(v) for k, v in r.cell.values.items() if k not in ("method.name", "base", "split.labeled", "seed")},
                  "iterations": r.cell.cfg.train.iterations, "s_per_it": rec.get("s_per_it"),
                  "median_step_s": rec.get("median_step_s"), "peak_rss_mib": rec.get("peak_rss_mib"), "precision": r.train.get("precision")}
        for ck, summ in (("best", r.best), ("last", r.last)):
            if summ is None:
                continue
            step = summ.get("conventions", {}).get("step")
            for c, stats in summ["per_class"].items():
                w.writerow({**common, "checkpoint": ck, "step": step, "class": c, "class_name": names.get(c, c),
                            "cases": stats.get("cases"), **{m: _num(stats[m]["mean"]) for m in METRICS}})
            w.writerow({**common, "checkpoint": ck, "step": step, "class": "mean", "class_name": "mean",
                        "cases": summ.get("counts", {}).get("cases"), **{m: _num(summ["mean"][m]) for m in METRICS},
                        **_hc_values(summ)})
    return buf.getvalue()


def _num(x) -> str:
    return "" if x is None else f"{float(x):.6g}"


# ---- results.md ------------------------------------------------------------------------------------------------
@dataclass
class _Column:
    title: str
    values: callable             # RunResult -> float
    digits: int
    better: str | None           # "high" | "low" | None (not bolded)


def _columns(results: Sequence[RunResult], names: dict[str, str], unit: str) -> list[_Column]:
    cols = [_Column(f"Dice {n}", lambda r, k=k: _val(r.best["per_class"][k]["dice"]["mean"]), 4, "high")
            for k, n in names.items()]
    cols += [_Column("**Dice**", lambda r: _val(r.best["mean"]["dice"]), 4, "high"),
             _Column("Jaccard", lambda r: _val(r.best["mean"]["jaccard"]), 4, "high"),
             _Column(f"HD95 ({unit})", lambda r: _val(r.best["mean"][f"hd95_{unit}"]), 2, "low"),
             _Column(f"ASD ({unit})", lambda r: _val(r.best["mean"][f"asd_{unit}"]), 2, "low"),
             _Column("Dice (last)", lambda r: _val(r.last["mean"]["dice"]) if r.last else math.nan, 4, "high")]
    if any(r.best.get("hc") for r in results):      # HC18: head-circumference error (mm) and unmeasured images
        cols += [_Column("HC err (mm)", lambda r: _val(r.best.get("hc", {}).get("abs_err_mm", {}).get("mean")), 2, "low"),
                 _Column("HC not measured", lambda r: _val(r.best["hc"]["images"] - r.best["hc"]["measured"])
                         if r.best.get("hc") else math.nan, 0, None)]
    cols += [_Column("s/it", lambda r: _val((r.record or {}).get("s_per_it")), 3, None),
             _Column("step s", lambda r: _val((r.record or {}).get("median_step_s")), 3, None),
             _Column("peak RSS (MiB)", lambda r: _val((r.record or {}).get("peak_rss_mib")), 0, None)]
    return cols


def _mean_std(vals: list[float], digits: int) -> tuple[float, str]:
    v = np.array([x for x in vals if not math.isnan(x)], float)
    if not len(v):
        return math.nan, "n/a"
    text = f"{v.mean():.{digits}f}" + (f" ± {v.std():.{digits}f}" if len(v) > 1 else "")
    return float(np.round(v.mean(), digits)), text


def _table(results: Sequence[RunResult], names: dict[str, str], unit: str) -> list[str]:
    rows: dict[tuple, list[RunResult]] = {}
    for r in results:
        rows.setdefault(r.setting, []).append(r)
    extra = list(dict.fromkeys(k for r in results for k in r.cell.values
                               if k not in ("seed", "split.labeled") and not is_method_key(k)))
    cols = _columns(results, names, unit)
    head = ["method", "labelled", *extra, "seeds", *[c.title for c in cols]]
    cells: dict[tuple, list] = {}
    for key, rs in rows.items():
        cells[key] = [_mean_std([c.values(r) for r in rs], c.digits) for c in cols]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    order = sorted(rows, key=lambda k: (rows[k][0].labeled, rows[k][0].block, results.index(rows[k][0])))
    for key in order:
        rs = rows[key]
        block = [k for k in rows if rows[k][0].block == rs[0].block]
        texts = []
        for i, c in enumerate(cols):
            mean, text = cells[key][i]
            others = [cells[k][i][0] for k in block if not math.isnan(cells[k][i][0])]
            best = (max if c.better == "high" else min)(others) if c.better and len(block) > 1 and others else None
            texts.append(f"**{text}**" if best is not None and mean == best else text)
        seeds = ", ".join(str(r.cell.cfg.seed) for r in rs)
        lines.append("| " + " | ".join([rs[0].method, f"{rs[0].labeled:g}",
                                        *[value_tag(rs[0].cell.values[k]) if k in rs[0].cell.values else "" for k in extra],
                                        f"{len(rs)} ({seeds})", *texts]) + " |")
    return lines


def _varies(values: list[str]) -> str:
    uniq = list(dict.fromkeys(values))
    return uniq[0] if len(uniq) == 1 else "varies: " + ", ".join(uniq)


def _protocol(results: Sequence[RunResult], names: dict[str, str], unit: str, fair: list) -> list[str]:
    cfgs = [r.cell.cfg for r in results]
    c0 = cfgs[0]
    d = c0.data
    root = d.root or "built in"
    data = f"layout `{d.layout}` ({root}), {len(names) + 1} classes (background, {', '.join(names.values())})"
    if d.layout == "phantom":
        data += f"; phantom of {d.phantom.patients} patients, {d.phantom.slices} slices of {d.phantom.size}²"
    split_lines = []
    seen = set()
    for r in results:
        s = r.splits
        key = (len(s.labeled), len(s.unlabeled), len(s.val), len(s.test), s.meta.get("rule"))
        if key in seen:
            continue
        seen.add(key)
        pats = s.meta.get("labeled_patients")
        split_lines.append(f"labelled {len(s.labeled)} cases" + (f" ({pats} patient{'' if pats == 1 else 's'})" if pats is not None else "")
                           + f", unlabelled {len(s.unlabeled)}, val {len(s.val)}, test {len(s.test)}")
    rule = _varies([str(r.splits.meta.get("rule", "from split settings")) for r in results])
    n_val = {len(r.splits.val) for r in results}
    ev = _varies([str(c.train.eval_every) for c in cfgs])
    selection = ("best validation Dice (mean over foreground classes, validated every " + ev + f" steps on "
                 f"{_varies([str(n) for n in sorted(n_val)])} val cases); `Dice (last)` = the final checkpoint"
                 if all(n_val) else "final checkpoint (no validation cases)")
    t = c0.train
    o, sch = c0.optim, c0.sched
    machines = [r.record["machine"] for r in results if r.record and r.record.get("machine")]
    if machines:
        m = [f"{x['cpu']}, {x['cores']} cores, {x['threads']} torch threads"
             + (f", GPU {x['gpu']}" if x.get("gpu") else "") + f", torch {x['torch']}" for x in machines]
        machine = _varies(m)
    else:
        machine = "not recorded (cells trained outside `ssmis bench`)"
    selected = [r for r in results if r.best.get("conventions")]
    conv = selected[0].best["conventions"] if selected else {}
    groups = "; ".join(f"{_setting_label(key)}: {', '.join(f'`{c}`' for c in cells)} share split {digest}"
                       for key, cells, digest in fair)
    return [
        "## Protocol", "",
        f"- **Data**: {data}.",
        f"- **Split**: {rule}; " + "; ".join(split_lines) + f"; split seed {_varies([str(c.split.seed) for c in cfgs])}.",
        f"- **Fair by construction**: every method of a labelled count and seed trained on an identical `splits.json` "
        f"(checked: {groups}), with the same model, iterations, batch, evaluation and selection.",
        f"- **Selection**: {selection}; scored on the test split.",
        f"- **Iterations**: {_varies([str(c.train.iterations) for c in cfgs])} optimiser steps per run (all stages), "
        f"batch {t.labeled_bs} labelled + {t.unlabeled_bs} unlabelled, {o.name} lr {o.lr:g} ({sch.name} schedule), "
        f"model `{c0.model.name}` widths {c0.model.widths}.",
        f"- **Patch size**: {'×'.join(map(str, d.patch_size))} (images resized with order {d.image_order}); "
        f"evaluation {conv.get('inference', 'slice-wise')}; HD95 {conv.get('hd95', c0.eval.hd95)}; distances in {unit}.",
        f"- **Precision**: {_varies([str(r.train.get('precision')) for r in results])}.",
        f"- **Machine**: {machine}.",
        "",
    ]


def val_curve(metrics_csv: Path) -> dict[int, float]:
    """Validation Dice per step from a run's metrics.csv."""
    with open(metrics_csv, newline="") as f:
        return {int(r["step"]): float(r["value"]) for r in csv.DictReader(f)
                if r["split"] == "val" and r["name"] == "dice"}


def val_curves_table(runs: dict[str, Path]) -> list[str]:
    """Markdown table of validation Dice by step, one row per run (name -> metrics.csv); best of a row in bold."""
    curves = {name: val_curve(p) for name, p in runs.items() if Path(p).is_file()}
    steps = sorted({s for c in curves.values() for s in c})
    if not steps:
        return []
    lines = ["| cell | " + " | ".join(map(str, steps)) + " |", "|---" * (len(steps) + 1) + "|"]
    for name, c in curves.items():
        best = max(c.values(), default=None)
        vals = [("**{:.3f}**" if c[s] == best else "{:.3f}").format(c[s]) if s in c else "" for s in steps]
        lines.append(f"| {name} | " + " | ".join(vals) + " |")
    return lines


def ordering_section(results: Sequence[RunResult]) -> list[str]:
    """methods.md's ordering check on this suite's cells (best-val test Dice, means over the seeds run)."""
    from ssmis.bench.ordering import check_ordering, ordering_table, summary

    dice: dict[tuple[str, float], dict[int, float]] = {}
    for r in results:
        dice.setdefault((r.method, r.labeled), {})[r.cell.cfg.seed] = float(r.best["mean"]["dice"])
    checks = check_ordering(dice)
    return ["### Ordering check (methods.md, ACDC-lite)", "",
            "\"A ≥ B\" fails when mean(A) < mean(B) − max(std_A, std_B, 1 Dice point); rules: 1 every semi-supervised "
            "method ≥ labels only, 2 BCP/ABD/UniMatch ≥ MT/UA-MT/CPS, 3 each add-on ≥ its host, 4 more labels ≥ fewer. "
            f"Result: {summary(checks)}.", "", *(ordering_table(checks) if checks else []), ""]


def results_md(suite: Suite, suite_path: Path, cells: Sequence[Cell], results: Sequence[RunResult],
               names: dict[str, str], fair: list, plots: dict[str, Path], shown: list[str]) -> str:
    unit = _unit(results)
    title = suite.name or suite_path.stem
    n_seeds = sorted({r.cell.cfg.seed for r in results})
    lines = [f"# Bench: {title}", "",
             f"Made by `ssmis bench {suite_path.as_posix()}` (ssmis {__version__}, {time.strftime('%Y-%m-%d')}): "
             f"{len(results)} of {len(cells)} cells finished.", ""]
    lines += _protocol(results, names, unit, fair)
    lines += ["## Test results", "",
              f"Best-validation checkpoint on the test split: mean ± std (ddof 0) over seeds ({', '.join(map(str, n_seeds))}) "
              "of each run's mean over test cases; **Dice** is the mean over the foreground classes. Best per column "
              "within each labelled count in bold. s/it: training wall time per step including validation; step s: median "
              "time of one training step (data, forward, backward, optimiser, teacher update), which a paused or "
              "shared CPU does not inflate (empty for cells recorded before ssmis recorded it); "
              "peak RSS: the training process's.", ""]
    lines += _table(results, names, unit)
    lines += [""]
    for title_, key in (("Test Dice per method and labelled count", "dice"), ("Learning curves", "curves"),
                        ("Qualitative test slices", "qualitative")):
        if key in plots:
            lines += [f"### {title_}", "", f"![{title_}]({plots[key].relative_to(plots[key].parents[1]).as_posix()})", ""]
            if key == "qualitative" and shown:
                lines += ["Slices: " + ", ".join(shown) + ". Columns: image, reference, each method's prediction "
                          "(Dice of the slice in the title).", ""]
    if suite.ordering:
        lines += ordering_section(results)
    lines += pretraining_section(pretrain_runs(list(cells)))
    table = val_curves_table({r.cell.name: r.cell.dir / "metrics.csv" for r in results})
    if table:
        lines += ["### Validation Dice by step", "", "Mean foreground Dice on the val split at each validation "
                  "(the best of each run in bold; the best-val checkpoint is the one tested above).", "", *table, ""]
    unfinished = [c.name for c in cells if c.state != "finished"]
    lines += ["## Cells", "", "Each cell is an ordinary run directory (config.yaml, splits.json, metrics.csv, checkpoints, "
              "eval/) in the suite folder; `results.csv` has one row per run, checkpoint and class.", ""]
    lines += [f"- `{r.cell.name}`: best val Dice {_val(r.train.get('best_val_dice')):.4f} at step "
              f"{r.train.get('best_step')}" for r in results]
    if unfinished:
        lines += ["", "Not finished (not in the table): " + ", ".join(f"`{n}`" for n in unfinished) + "."]
    return "\n".join(lines) + "\n"


# ---- plots -----------------------------------------------------------------------------------------------------
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_dice(results: Sequence[RunResult], path: Path) -> Path:
    """Grouped bars: one group per labelled count (and other grid values), one bar per method, error bar = std."""
    plt = _plt()
    methods = list(dict.fromkeys(r.method for r in results))
    blocks = sorted(dict.fromkeys(r.block for r in results), key=lambda b: next(r.labeled for r in results if r.block == b))

    def label(b):
        return _setting_label(b, next(r.labeled for r in results if r.block == b))

    fig, ax = plt.subplots(figsize=(max(4.0, 1.2 + 1.1 * len(blocks) * len(methods) * 0.6), 3.6))
    width = 0.8 / len(methods)
    for i, m in enumerate(methods):
        means, stds, xs = [], [], []
        for j, b in enumerate(blocks):
            vals = [_val(r.best["mean"]["dice"]) for r in results if r.method == m and r.block == b]
            if not vals:
                continue
            x = j - 0.4 + width * (i + 0.5)
            means.append(np.nanmean(vals))
            stds.append(np.nanstd(vals))
            xs.append(x)
            ax.scatter([x] * len(vals), vals, s=10, color="k", zorder=3)
        ax.bar(xs, means, width * 0.9, yerr=stds, capsize=3, label=m, zorder=2)
    ax.set_xticks(range(len(blocks)), [label(b) for b in blocks])
    ax.set_ylabel("test Dice (best-val checkpoint)")
    ax.set_ylim(0, 1)
    ax.grid(axis="y", alpha=0.3, zorder=0)
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title("Dice: mean ± std over seeds (dots: seeds)", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _pick_slices(adapter, items: list, spec, slice_axis: int) -> list[tuple[str, dict, int | None]]:
    """(case, sample, slice index or None for 2D) with the most reference foreground, one per case in turn."""
    samples = [(it.id, adapter.load(it)) for it in items]
    ranked = []
    for cid, s in samples:
        lab = s["label"]
        if lab.ndim == 2:
            ranked.append([(cid, s, None)])
        else:
            area = np.moveaxis(lab, slice_axis, 0).reshape(lab.shape[slice_axis], -1).astype(bool).sum(1)
            ranked.append([(cid, s, int(k)) for k in np.argsort(-area, kind="stable")])
    picks = []
    for depth in range(max(len(r) for r in ranked)):
        for r in ranked:
            if depth < len(r) and len(picks) < spec.slices:
                picks.append(r[depth])
    return picks


def plot_qualitative(results: Sequence[RunResult], spec, path: Path) -> tuple[Path, list[str]] | None:
    """Rows: chosen test slices; columns: image, reference, each method's prediction (best checkpoint)."""
    from ssmis.data.adapter import make_adapter
    from ssmis.eval.inference import dice_per_class
    from ssmis.predict import load_trained_model, overlay_rgb

    labeled = spec.labeled if spec.labeled is not None else min(r.labeled for r in results)
    group = [r for r in results if r.labeled == float(labeled)]
    if not group:
        raise UserError("qualitative.labeled", f"no finished cell has {labeled:g} labelled", "Pick a labelled count of the grid.")
    seed = spec.seed if spec.seed is not None else group[0].cell.cfg.seed
    block = group[0].block
    group = [r for r in group if r.cell.cfg.seed == seed and r.block == block]
    if not group:
        raise UserError("qualitative.seed", f"no finished cell has seed {seed}", "Pick a seed of the grid.")
    cfg = group[0].cell.cfg
    test = group[0].splits.test
    if spec.cases:
        unknown = [c for c in spec.cases if c not in test]
        if unknown:
            raise UserError("qualitative.cases", f"{unknown[:3]} are not test cases", f"Choose among {test[:5]} ...")
        ids = list(spec.cases)
    else:
        ids = test[: spec.slices]
    if not ids:
        return None
    adapter = make_adapter(cfg.data.layout, cfg.data.root, cfg.data)
    by_id = {it.id: it for it in adapter.items("eval") + adapter.items("train")}
    picks = _pick_slices(adapter, [by_id[i] for i in ids], spec, cfg.data.slice_axis)
    # cells restored from the repository carry no checkpoints (never committed): they are left out here
    models = [(r.method, load_trained_model(r.cell.dir, "best", device="cpu")) for r in group
              if (r.cell.dir / "checkpoints" / "best.pt").is_file()]
    if not models:
        return None
    plt = _plt()
    ncol = 2 + len(models)
    fig, axes = plt.subplots(len(picks), ncol, figsize=(1.9 * ncol, 1.9 * len(picks) + 0.3), squeeze=False)
    shown, volumes = [], {}
    for row, (cid, s, k) in enumerate(picks):
        image = s["image"] if k is None else np.take(s["image"], k, axis=1 + cfg.data.slice_axis)
        ref = s["label"] if k is None else np.take(s["label"], k, axis=cfg.data.slice_axis)
        shown.append(f"`{cid}`" + ("" if k is None else f" slice {k}"))
        panels = [("image", overlay_rgb(image[0], np.zeros_like(ref))), ("reference", overlay_rgb(image[0], ref))]
        for name, model in models:
            if k is not None and len(model.cfg.data.patch_size) == 3:     # a 3D model sees the whole volume
                if (name, cid) not in volumes:
                    volumes[name, cid] = model.predict(s["image"])
                pred = np.take(volumes[name, cid], k, axis=cfg.data.slice_axis)
            else:
                pred = model.predict(image)
            dice = np.nanmean(dice_per_class(pred, ref, model.num_classes)) if (pred.any() or ref.any()) else math.nan
            panels.append((f"{name}\nDice {dice:.3f}", overlay_rgb(image[0], pred)))
        for col, (title, rgb) in enumerate(panels):
            ax = axes[row, col]
            ax.imshow(rgb, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if col >= 2 or row == 0:
                ax.set_title(title, fontsize=8)
            if col == 0:
                ax.set_ylabel(cid + ("" if k is None else f" [{k}]"), fontsize=7)
    fig.suptitle(f"Test slices, labelled {labeled:g}, seed {seed} (best-val checkpoints)", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path, shown


# ---- entry -----------------------------------------------------------------------------------------------------
def write_report(suite: Suite, suite_path: Path, cells: Sequence[Cell], out: Path) -> list[Path]:
    """Write results.csv, results.md and plots/*.png for the finished cells; returns the written paths."""
    from ssmis.eval.plots import plot_curves

    results = load_results(cells)
    fair = check_fair(results)
    names = _class_names(results)
    plots = {"dice": plot_dice(results, out / "plots" / "dice.png")}
    runs = {r.cell.name: r.cell.dir / "metrics.csv" for r in results}
    plots["curves"] = plot_curves(next(iter(runs.values())), out / "plots" / "curves.png", runs=runs)
    shown: list[str] = []
    q = plot_qualitative(results, suite.qualitative, out / "plots" / "qualitative.png")
    if q is not None:
        plots["qualitative"], shown = q
    atomic_write_text(out / "results.csv", results_csv(results, names))
    atomic_write_text(out / "results.md", results_md(suite, suite_path, cells, results, names, fair, plots, shown))
    return [out / "results.md", out / "results.csv", *plots.values()]
