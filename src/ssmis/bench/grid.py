"""Bench suites: a base config x a grid of config values -> one ordinary run directory per cell. Finished cells
are skipped, interrupted ones resumed; `--jobs N` trains N cells side by side, one process each."""

from __future__ import annotations

import fnmatch
import itertools
import json
import os
import platform
import re
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ssmis.atomic import atomic_write_text
from ssmis.bench.locks import run_lock
from ssmis.bench.pretraining import ensure_pretrained, pretrain_run_for, same_training_cases
from ssmis.errors import UserError

CELL_RECORD = "bench_cell.json"          # written by the bench beside a finished cell: speed, memory, machine


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class QualitativeSpec(_Strict):
    slices: int = Field(3, ge=1, le=12, description="Test slices shown (the slice with most reference foreground of a case).")
    cases: list[str] | None = Field(None, description="Test case ids to show (default: the first test cases).")
    labeled: float | None = Field(None, description="Labelled count whose methods are shown (default: the smallest).")
    seed: int | None = Field(None, description="Training seed whose runs are shown (default: the first).")


class Suite(_Strict):
    name: str | None = Field(None, description="Suite name (default: the file name).")
    base: str | None = Field(None, description="Base config: a YAML path relative to the suite file, or a preset "
                             "name. Or give the grid key `base`: a list of such configs (method variants, e.g. "
                             "configs/methods/metassl_mt.yaml), each a method row named by its file name.")
    grid: dict[str, list[Any]] = Field(description="Config key -> values; every combination is one run (cell).")
    set: dict[str, Any] = Field(default_factory=dict, description="Config key -> value for every cell (under the grid).")
    out: str | None = Field(None, description="Suite folder, relative to the current directory (default runs/bench/<name>).")
    publish: str | None = Field(None, description="Also copy results.md, results.csv and the plots here (no checkpoints).")
    qualitative: QualitativeSpec = Field(default_factory=QualitativeSpec)
    ordering: bool = Field(False, description="Add methods.md's ACDC-lite ordering check (rules 1-4, its tolerance "
                           "rule) on the best-val test Dice to results.md.")
    pretrain: str | None = Field(None, description="An `ssmis pretrain` config (relative to the suite file, e.g. "
                                 "../configs/spcl_pretrain.yaml): each seed of the grid is pre-trained once, on "
                                 "the cells' training cases, into <out>/pretrain-s<seed> before the cells, and every "
                                 "cell starts from its encoder (init.encoder).")

    @field_validator("grid")
    @classmethod
    def _grid(cls, grid: dict) -> dict:
        if not grid:
            raise ValueError("the grid is empty")
        for key, values in grid.items():
            if not values:
                raise ValueError(f"{key} has no values")
            if len({json.dumps(v, sort_keys=True, default=str) for v in values}) != len(values):
                raise ValueError(f"{key} lists a value twice")
        return grid


@dataclass
class Cell:
    name: str
    values: dict[str, Any]               # grid key -> this cell's value
    cfg: Any                             # RunConfig
    dir: Path
    pretrain: Any = None                 # PretrainRun its encoder comes from (suites with `pretrain:`)

    @property
    def state(self) -> str:
        return cell_state(self.dir)


def cell_state(run_dir: Path) -> str:
    """finished | trained (test evaluation missing) | interrupted (checkpoint to resume) | started | new."""
    if (run_dir / "train_summary.json").is_file():
        return "finished" if (run_dir / "eval" / "test-best" / "summary.json").is_file() else "trained"
    if (run_dir / "checkpoints" / "last.pt").is_file():
        return "interrupted"
    return "started" if run_dir.is_dir() and any(run_dir.iterdir()) else "new"


# ---- suite -> cells --------------------------------------------------------------------------------------------
def load_suite(path: str | Path) -> Suite:
    from ssmis.config.load import validation_to_user_error

    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise UserError(str(path), "suite file not found", "Check the path (suites live in benchmarks/).") from None
    except yaml.YAMLError as e:
        raise UserError(str(path), f"not valid YAML ({str(e).splitlines()[0]})", "Fix the syntax.") from None
    if not isinstance(raw, dict):
        raise UserError(str(path), "a suite must be a mapping (base, grid, ...)", "See benchmarks/phantom_suite.yaml.")
    try:
        suite = Suite.model_validate(raw)
    except ValidationError as err:
        raise validation_to_user_error(err, Suite, str(path)) from None
    if (suite.base is None) == ("base" not in suite.grid):
        raise UserError(f"{path}: base", "give the base config either as `base` or as the grid key `base`, once",
                        "See benchmarks/acdc_lite_5pct_seed_methods.yaml for a grid over method configs.")
    both = sorted(set(suite.grid) & set(suite.set))
    if both:
        raise UserError(f"{path}: set.{both[0]}", "is also a grid key", "Give each key in `grid` or in `set`, not both.")
    if suite.pretrain and "init.encoder" in {**suite.grid, **suite.set}:
        raise UserError(f"{path}: pretrain", "the cells' init.encoder comes from `pretrain`; the suite also sets it",
                        "Remove init.encoder from grid/set, or remove `pretrain`.")
    return suite


def nest(dotted: dict[str, Any], where: str) -> dict:
    """{"a.b": 1} -> {"a": {"b": 1}}."""
    out: dict = {}
    for key, value in dotted.items():
        parts = str(key).split(".")
        if any(not p or p.isdigit() for p in parts):
            raise UserError(f"{where}: {key}", "not a key path of config sections",
                            "Use section.key (list items are set by giving the whole list).")
        node = out
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise UserError(f"{where}: {key}", f"{p!r} is set both as a value and as a section", "Keep one.")
        node[parts[-1]] = value
    return out


def is_method_key(key: str) -> bool:
    """Grid keys that choose the method (a row of the tables): method.* and `base` (a method config file)."""
    return key == "base" or key.split(".")[0] == "method"


def base_label(ref: str) -> str:
    """The method label of a base config: its file name without .yaml (metassl_mt)."""
    return Path(str(ref)).name.removesuffix(".yaml").removesuffix(".yml")


def value_tag(value: Any) -> str:
    """A config value as a file-name-safe tag: [64, 64] -> 64x64, 0.5 -> 0.5, {name: bcp} -> bcp,
    {name: fixmatch, unsup_loss: ce} -> fixmatch-unsup_lossce."""
    if isinstance(value, dict):
        rest = "-".join(f"{k}{value_tag(v)}" for k, v in value.items() if k != "name")
        value = "-".join(p for p in (str(value.get("name", "")), rest) if p)
    if isinstance(value, (list, tuple)):
        return "x".join(value_tag(v) for v in value)
    if isinstance(value, float):
        value = f"{value:g}"
    return re.sub(r"[^A-Za-z0-9._]+", "_", str(value)).strip("_") or "_"


def _rank(key: str) -> int:
    """Order of the grid keys from slowest to fastest varying: seeds outermost, methods innermost."""
    return 0 if key == "seed" else 2 if key == "split.labeled" else 3 if is_method_key(key) else 1


def cell_name(values: dict[str, Any]) -> str:
    """`mean_teacher-l136-s0`: the method, `l` + labelled count, other keys as `<last key part><value>`, `s` + seed."""
    def tag(key: str, v: Any) -> str:
        if key == "base":
            return value_tag(base_label(v))
        if key.split(".")[0] == "method":
            return value_tag(v)
        if key == "split.labeled":
            return "l" + value_tag(v)
        if key == "split.labeled_scans":
            return f"{len(v)}scans"
        if key == "seed":
            return "s" + value_tag(v)
        return key.rsplit(".", 1)[-1] + value_tag(v)

    keys = sorted(values, key=lambda k: (-_rank(k), list(values).index(k)))
    return "-".join(tag(k, values[k]) for k in keys)


def _base_ref(suite: Suite, suite_path: Path, base: str | None = None) -> str:
    base = base if base is not None else suite.base
    local = suite_path.parent / base
    return os.path.normpath(local) if local.is_file() else base


def suite_out(suite: Suite, suite_path: Path, out: str | Path | None) -> Path:
    return Path(out or suite.out or Path("runs") / "bench" / (suite.name or suite_path.stem))


def build_cells(suite: Suite, suite_path: Path, out: Path) -> list[Cell]:
    """Every grid combination as a validated config, in run order (seeds outermost, methods innermost)."""
    from ssmis.config import load_config
    from ssmis.config.load import merge_config

    keys = sorted(suite.grid, key=lambda k: (_rank(k), list(suite.grid).index(k)))
    common = nest(suite.set, f"{suite_path}: set")
    cells: dict[str, Cell] = {}
    pretrains: dict[str, Any] = {}
    for combo in itertools.product(*(suite.grid[k] for k in keys)):
        values = {k: v for k, v in zip(keys, combo)}
        name = cell_name(values)
        data = merge_config(common, nest({k: v for k, v in values.items() if k != "base"}, f"{suite_path}: grid"))
        try:
            cfg = load_config(_base_ref(suite, suite_path, values.get("base")), data=data)
        except UserError as e:
            raise UserError(f"{suite_path} (cell {name})", str(e).rstrip(".")) from None
        if name in cells:
            raise UserError(f"{suite_path}: grid", f"two cells are both named {name!r}",
                            "Make the grid values distinct in their last key part and value.")
        pre = None
        if suite.pretrain:
            pre = pretrain_run_for(_base_ref(suite, suite_path, suite.pretrain), cfg, out, f"{suite_path} (cell {name})")
            pre = pretrains.setdefault(pre.name, pre)
            if not same_training_cases(pre.cfg.split, cfg.split):
                raise UserError(f"{suite_path} (cell {name})", f"cells of seed {cfg.seed} share {pre.name} but their "
                                "splits differ in more than the labelled cases", "Vary only split.labeled or "
                                "split.labeled_scans in a suite with `pretrain`.")
            cfg = cfg.model_copy(update={"init": cfg.init.model_copy(update={"encoder": pre.dir.as_posix()})})
        cells[name] = Cell(name, values, cfg, out / name, pre)
    return list(cells.values())


def check_existing(cells: list[Cell]) -> None:
    """A cell folder made with another config would be skipped or resumed wrongly: refuse, naming the differences."""
    from ssmis.engine.rundir import config_differences
    from ssmis.engine.run import default_config

    for c in cells:
        cfg_file = c.dir / "config.yaml"
        if not cfg_file.is_file():
            continue
        old = yaml.safe_load(cfg_file.read_text()) or {}
        old.pop("ssmis", None)
        new = c.cfg.model_dump(mode="json")
        if c.pretrain is not None and isinstance(old.get("init"), dict):   # the suite's own pre-training, wherever
            old["init"]["encoder"] = new["init"]["encoder"]                # the suite folder is now
        diff = config_differences(old, new, default_config(c.cfg))
        if diff:
            raise UserError(str(c.dir), f"this cell was run with another config ({'; '.join(diff[:4])})",
                            "Delete the cell folder to retrain it, or give the suite another --out.")


def pretrain_runs(cells: list[Cell]) -> list:
    """The distinct pre-training runs of these cells, in cell order."""
    return list({c.pretrain.name: c.pretrain for c in cells if c.pretrain is not None}.values())


# ---- running one cell ------------------------------------------------------------------------------------------
def reset_peak_memory() -> None:
    try:   # Linux: "5" resets this process's peak resident set size (VmHWM)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def peak_memory() -> dict:
    out: dict = {"peak_rss_mib": None, "peak_cuda_mib": None}
    try:
        with open("/proc/self/status") as f:
            kib = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
        out["peak_rss_mib"] = round(kib / 1024, 1)
    except (OSError, StopIteration, ValueError):
        pass
    import torch

    if torch.cuda.is_available():
        out["peak_cuda_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return out


def machine_info() -> dict:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "threads": torch.get_num_threads(), "torch": str(torch.__version__),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None, "os": platform.system()}


def run_cell(cfg_data: dict, run_dir: str, progress: bool = True, threads: tuple[int, str] | None = None) -> dict:
    """Train (or resume, or only evaluate) one cell; returns {"cell", "action"} or {"cell", "error"}. `threads`:
    (count, why), this worker's share of the cores (ssmis.engine.threads), unless the cell sets train.threads.

    Exceptions are returned as text: cells in worker processes must not send exceptions back (UserError does not
    survive pickling), and one failing cell must not stop the others. A cell another process is training (its
    lock is held: another `ssmis bench` of the same suite) is left to it.
    """
    d = Path(run_dir)
    with run_lock(d, wait=False) as mine:
        if not mine:
            print(f"cell {d.name}: another process is training it: skipped here", file=sys.stderr)
            return {"cell": d.name, "action": "busy elsewhere"}
        return _run_cell(cfg_data, d, progress, threads)


def _run_cell(cfg_data: dict, d: Path, progress: bool, threads: tuple[int, str] | None) -> dict:
    from ssmis.config import load_config
    from ssmis.engine import threads as thread_share
    from ssmis.engine.checkpoint import load_checkpoint
    from ssmis.engine.run import train
    from ssmis.eval.run_eval import evaluate_checkpoints

    try:
        cfg = load_config(None, data=cfg_data)
        if threads:
            thread_share.assign(*threads)
        state = cell_state(d)
        if state == "finished":
            return {"cell": d.name, "action": "skipped"}
        if state == "trained":
            evaluate_checkpoints(d, "test", ("best", "last"), quiet=True)
            return {"cell": d.name, "action": "evaluated"}
        start = int(load_checkpoint(d / "checkpoints" / "last.pt")["step"]) if state == "interrupted" else 0
        reset_peak_memory()
        result = train(cfg, out=d, resume=state == "interrupted", overwrite=state == "started", progress=progress,
                       test_at_end=False)
        evaluate_checkpoints(d, "test", ("best", "last"), quiet=True)
        steps = int(result["step"]) - start
        record = {"cell": d.name, "iterations": int(result["step"]), "resumed_from": start or None,
                  "steps_this_session": steps, "train_seconds": round(float(result["seconds"]), 2),
                  "s_per_it": round(float(result["seconds"]) / steps, 4) if steps > 0 else None,
                  "median_step_s": (round(float(result["median_step_seconds"]), 4)
                                    if result.get("median_step_seconds") is not None else None),
                  **peak_memory(), "precision": result.get("precision"), "machine": machine_info(),
                  "finished": time.strftime("%Y-%m-%d %H:%M:%S")}
        atomic_write_text(d / CELL_RECORD, json.dumps(record, indent=1) + "\n")
        return {"cell": d.name, "action": "resumed" if start else "trained"}
    except Exception as e:  # noqa: BLE001  (reported by the suite; the other cells go on)
        return {"cell": d.name, "error": f"{type(e).__name__}: {e}"}


def _run_all(cells: list[Cell], jobs: int, progress: bool, threads: int | None = None) -> list[dict]:
    """Train the cells, one after the other or `jobs` side by side; `threads`: CPU threads per cell (--threads),
    else each cell's share of the cores (a cell's own train.threads wins either way)."""
    results = []
    given = (threads, f"ssmis bench --threads {threads}") if threads else None
    if jobs <= 1 or len(cells) <= 1:
        for i, c in enumerate(cells, 1):
            print(f"\n== cell {i}/{len(cells)}: {c.name} ({c.state}) ==", file=sys.stderr)
            results.append(run_cell(c.cfg.model_dump(mode="json"), str(c.dir), progress, given))
            _say(results[-1])
        return results
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    import torch

    from ssmis.engine.threads import thread_budget

    workers = min(jobs, len(cells))
    cuda = torch.cuda.is_available() and any(c.cfg.train.device != "cpu" for c in cells)
    threads = given or thread_budget("cuda" if cuda else "cpu", os.cpu_count() or 1, 1, None, jobs=workers)
    print(f"training {len(cells)} cells, {workers} at a time ({threads[0]} threads each: {threads[1]}; "
          "a cell's train.threads wins)", file=sys.stderr)
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
    try:
        futures = [pool.submit(run_cell, c.cfg.model_dump(mode="json"), str(c.dir), False, threads) for c in cells]
        for f in as_completed(futures):
            results.append(f.result())
            _say(results[-1], f"({len(results)}/{len(cells)})")
    except BaseException:
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown()
    return results


def _say(r: dict, count: str = "") -> None:
    if "error" in r:
        print(f"ssmis: bench: cell {r['cell']} failed: {r['error']}", file=sys.stderr)
    else:
        print(f"cell {r['cell']}: {r['action']} {count}".rstrip(), file=sys.stderr)


# ---- the command -----------------------------------------------------------------------------------------------
def run_suite(suite_path: str | Path, out: str | Path | None = None, jobs: int = 1, threads: int | None = None,
              dry_run: bool = False,
              report_only: bool = False, progress: bool = True, only: list[str] | None = None) -> int:
    """Run the unfinished cells of a suite, then write its report; 0 when every cell finished, else 1.

    `only`: shell patterns of cell names (`bcp-*`); other cells are not trained but still reported when finished."""
    suite_path = Path(suite_path)
    if jobs < 1:
        raise UserError("--jobs", f"{jobs} is not a number of processes", "Use --jobs 1 or more.")
    if threads is not None and threads < 1:
        raise UserError("--threads", f"{threads} is not a number of threads", "Use --threads 1 or more.")
    suite = load_suite(suite_path)
    out_dir = suite_out(suite, suite_path, out)
    cells = build_cells(suite, suite_path, out_dir)
    check_existing(cells)
    states = {c.name: c.state for c in cells}
    chosen = {c.name for c in cells if not only or any(fnmatch.fnmatchcase(c.name, p) for p in only)}
    if not chosen:
        raise UserError("--only", f"no cell of the suite matches {' '.join(only)}",
                        f"Cells: {', '.join(c.name for c in cells)} (see --dry-run).")
    if dry_run:
        width = max(len(c.name) for c in cells)
        print(f"suite {suite.name or suite_path.stem}: {len(cells)} cells in {out_dir} "
              f"(base {_base_ref(suite, suite_path) if suite.base else 'per cell: grid key base'})")
        for c in cells:
            what = {"finished": "finished (skip)", "trained": "trained (evaluate)", "interrupted": "interrupted (resume)",
                    "started": "started, no checkpoint (restart)", "new": "new"}[states[c.name]]
            what = what if c.name in chosen else "not selected (--only)"
            print(f"  {c.name:{width}s}  {what:32s}  " + " ".join(f"{k}={value_tag(v)}" for k, v in c.values.items()))
        for p in pretrain_runs(cells):
            print(f"  {p.name:{width}s}  pre-training: {p.state}")
        return 0
    failed: list[dict] = []
    if not report_only:
        todo = [c for c in cells if states[c.name] != "finished" and c.name in chosen]
        counts = {s: sum(v == s for v in states.values()) for s in ("finished", "interrupted", "trained", "started", "new")}
        print(f"suite {suite.name or suite_path.stem}: {len(cells)} cells in {out_dir}: "
              + ", ".join(f"{n} {s}" for s, n in counts.items() if n), file=sys.stderr)
        if todo:
            out_dir.mkdir(parents=True, exist_ok=True)
            ensure_pretrained(pretrain_runs([c for c in todo if c.state in ("new", "started")]), threads, progress)
            failed = [r for r in _run_all(todo, jobs, progress, threads) if "error" in r]
    done = [c for c in cells if c.state == "finished"]
    if not done:
        print("ssmis: bench: no finished cell yet: no report written", file=sys.stderr)
        return 1 if failed or not report_only else 0
    from ssmis.bench.report import write_report

    paths = write_report(suite, suite_path, cells, out_dir)
    if suite.publish:
        pub = Path(suite.publish)
        for p in paths:
            dest = pub / p.relative_to(out_dir)
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(p, dest)
        print(f"published to {pub}", file=sys.stderr)
    print(f"{len(done)} of {len(cells)} cells finished; report: {out_dir / 'results.md'}")
    if failed:
        print(f"ssmis: bench: {len(failed)} cells failed: {', '.join(r['cell'] for r in failed)}", file=sys.stderr)
    return 1 if failed or len([c for c in done if c.name in chosen]) < len(chosen) and not report_only else 0
