"""Command line: `ssmis <command>`. User mistakes print one `ssmis: error:` line and exit 2."""

from __future__ import annotations

import argparse
import fnmatch
import sys
import traceback

from ssmis import __version__
from ssmis.errors import UserError


def _data_check(a) -> int:
    from ssmis.data.check import check_dataset

    return check_dataset(a.root, layout=a.layout, num_classes=a.num_classes)


def _eval(a) -> int:
    if a.run:
        if a.pred or a.ref:
            raise UserError("ssmis eval", "--run cannot be combined with --pred/--ref", "Use one form.")
        from ssmis.eval.run_eval import evaluate_run

        evaluate_run(a.run, split=a.split, checkpoint=a.checkpoint, largest_component=a.largest_component,
                     cases=a.cases, max_cases=a.max_cases, ensemble=a.ensemble)
        return 0
    if a.cases or a.max_cases or a.ensemble:
        raise UserError("ssmis eval", "--cases, --max-cases and --ensemble apply to a run's checkpoint",
                        "Use them with --run.")
    if not (a.pred and a.ref):
        raise UserError("ssmis eval", "give --run RUN_DIR, or both --pred DIR and --ref DIR", "See `ssmis eval --help`.")
    from ssmis.eval.score_folders import score_folders

    return score_folders(a.pred, a.ref, classes=a.classes, out=a.out, spacing=a.spacing)


def _overrides(a) -> list[str]:
    """--set overrides, with --device as train.device."""
    return [*(a.set or []), *([f"train.device={a.device}"] if a.device else [])]


def _train(a) -> int:
    from ssmis.engine.run import train_from_cli

    return train_from_cli(a.config, overrides=_overrides(a), out=a.out, resume=a.resume, overwrite=a.overwrite)


def _pretrain(a) -> int:
    from ssmis.spcl.pretrain import pretrain_from_cli

    return pretrain_from_cli(a.config, overrides=_overrides(a), out=a.out, resume=a.resume, overwrite=a.overwrite)


def _demo(a) -> int:
    from ssmis.demo import run_demo

    return run_demo(out=a.out, iterations=a.iterations, overwrite=a.overwrite)


def _bench(a) -> int:
    from ssmis.bench import run_suite

    return run_suite(a.suite, out=a.out, jobs=a.jobs, threads=a.threads, dry_run=a.dry_run, report_only=a.report_only,
                     only=a.only)


def _predict(a) -> int:
    from ssmis.predict import predict

    return predict(a.run, a.inputs, a.out, checkpoint=a.checkpoint, pixel_size=a.pixel_size, pixel_csv=a.pixel_csv,
                   overlay=a.overlay, measure=a.measure, device=a.device, ensemble=a.ensemble)


def _methods(a) -> int:
    return _list(argparse.Namespace(what="methods", pattern="*"))


def _list(a) -> int:
    if a.what == "methods":
        from ssmis.methods import describe_methods

        for name, dims, line in describe_methods():
            if fnmatch.fnmatch(name, a.pattern):
                print(f"{name:16s} {dims:6s} {line}")
        return 0
    if a.what == "plugins":
        from ssmis.methods import slot_hosts
        from ssmis.plugins import describe_plugins

        hosts = slot_hosts()
        for name, slots, line in describe_plugins():
            if fnmatch.fnmatch(name, a.pattern):
                first = slots.split("+")[0]            # the hosts of its first (main) slot
                print(f"{name:16s} {slots:10s} {line} Hosts: {', '.join(hosts.get(first, [])) or 'none yet'}.")
        return 0
    import ssmis.data  # noqa: F401  (registers layouts)
    import ssmis.models  # noqa: F401  (registers models)
    from ssmis.registry import LAYOUTS, MODELS

    reg = {"models": MODELS, "layouts": LAYOUTS}[a.what]
    for name in reg.list(a.pattern):
        doc = (reg.get(name).__doc__ or "").strip().splitlines()
        print(f"{name:16s} {doc[0] if doc else ''}")
    return 0


def _config_validate(a) -> int:
    from ssmis.config import load_config

    cfg = load_config(a.config, a.set or [])         # validates the method section against its own Config too
    print(f"{a.config}: valid (method {cfg.method['name']}, model {cfg.model.name}, layout {cfg.data.layout})")
    return 0


def _data_split(a) -> int:
    from pathlib import Path

    from ssmis.atomic import atomic_write_text
    from ssmis.config.schema import SplitConfig
    from ssmis.data.adapter import make_adapter
    from ssmis.data.splits import make_splits

    out = Path(a.out)
    if out.exists() and not a.overwrite:
        raise UserError(str(out), "already exists", "Pass --overwrite to replace it, or choose another -o.")
    adapter = make_adapter(a.layout, a.root)
    fixed = getattr(adapter, "fixed_eval_splits", lambda: None)()
    given = [f"--{k}" for k in ("val", "test") if getattr(a, k) is not None]
    if fixed is not None and given:
        val, test = fixed
        raise UserError(" ".join(given), f"the {adapter.name} layout fixes val and test by its list files "
                        f"({len(val)} val, {len(test)} test cases), so {' and '.join(given)} cannot be honoured",
                        "Leave them out, or write your own splits.json and train with split.file=PATH.")
    defaults = SplitConfig()
    cfg = SplitConfig(protocol=a.protocol, labeled=a.labeled, val=defaults.val if a.val is None else a.val,
                      test=defaults.test if a.test is None else a.test, seed=a.seed)
    splits = make_splits(adapter, cfg)
    atomic_write_text(out, splits.to_json())
    print(f"{out}: {len(splits.labeled)} labelled, {len(splits.unlabeled)} unlabelled, {len(splits.val)} val, "
          f"{len(splits.test)} test cases (use it with split.file={out})")
    return 0


def _config_show(a) -> int:
    from ssmis.config import dump_config, load_config

    print(dump_config(load_config(a.config, a.set or [])), end="")
    return 0


def _key_value(text: str) -> str:
    if "=" not in text or text.startswith("="):
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY=VALUE (give the config file before --set)")
    return text


def _run_arguments(p: argparse.ArgumentParser, config_help: str, set_help: str, out_help: str, resume_help: str) -> None:
    """CONFIG, --set, --out, --resume | --overwrite and --device of the commands that make a run directory."""
    p.add_argument("config", help=config_help)
    p.add_argument("--set", action="extend", nargs="+", type=_key_value, metavar="KEY=VALUE", help=set_help)
    p.add_argument("--out", help=out_help)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--resume", action="store_true", help=resume_help)
    g.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], help="shortcut for --set train.device=...")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ssmis", description="Semi-supervised medical image segmentation.")
    p.add_argument("--version", action="version", version=f"ssmis {__version__}")
    p.add_argument("--debug", action="store_true", help="show tracebacks for user errors too")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    d = sub.add_parser("data", help="inspect datasets").add_subparsers(dest="data_command", metavar="ACTION")
    c = d.add_parser("check", help="detect the layout, read every file, report counts and problems")
    c.add_argument("root", help="dataset folder")
    c.add_argument("--layout", default="auto", help="force a layout instead of detecting it")
    c.add_argument("--num-classes", type=int, default=None, help="expected number of classes (incl. background)")
    c.set_defaults(func=_data_check)
    sp = d.add_parser("split", help="write a patient-level splits.json (labelled / unlabelled / val / test)")
    sp.add_argument("root", help="dataset folder")
    sp.add_argument("--layout", default="auto", help="force a layout instead of detecting it")
    sp.add_argument("--labeled", type=float, required=True, help="labelled patients: a count >= 1 or a fraction < 1")
    sp.add_argument("--val", type=float, default=None, help="val patients, count or fraction (default 0.1); "
                    "refused on layouts whose list files fix val and test (ssl4mis_h5, la_h5)")
    sp.add_argument("--test", type=float, default=None, help="test patients, count or fraction (default 0.2); "
                    "refused like --val")
    sp.add_argument("--seed", type=int, default=0, help="seed of the patient permutation (default 0)")
    sp.add_argument("--protocol", action=argparse.BooleanOptionalAction, default=True,
                    help="use the dataset's published split where it has one (default on)")
    sp.add_argument("-o", "--out", required=True, help="splits.json to write")
    sp.add_argument("--overwrite", action="store_true", help="replace an existing file")
    sp.set_defaults(func=_data_split)

    e = sub.add_parser("eval", help="score a run's checkpoint, or predicted masks against references")
    e.add_argument("--run", help="run directory: score its checkpoint on a split")
    e.add_argument("--split", default="test", choices=["val", "test"], help="split for --run (default test)")
    e.add_argument("--checkpoint", default="best", choices=["best", "last"], help="checkpoint for --run")
    e.add_argument("--largest-component", action=argparse.BooleanOptionalAction, default=None,
                   help="--run: keep only the largest connected component per class (default: the run's "
                        "eval.largest_component); a report that differs from the run's goes to <split>-<ckpt>-lcc/-raw")
    sub_cases = e.add_mutually_exclusive_group()
    sub_cases.add_argument("--max-cases", type=int, metavar="N",
                           help="--run: score only the first N cases of the split (report in <split>-<ckpt>-firstN)")
    sub_cases.add_argument("--cases", nargs="+", metavar="ID",
                           help="--run: score only these cases of the split (report in <split>-<ckpt>-casesN)")
    e.add_argument("--ensemble", action="store_true",
                   help="--run of a two-network method (c3s3, medl): score the average of both networks' softmax "
                        "(the papers' inference) instead of network 1; report in <split>-<ckpt>-ensemble")
    e.add_argument("--pred", help="folder of predicted masks (NIfTI, PNG or HDF5)")
    e.add_argument("--ref", help="folder of reference masks, matched to --pred by case name")
    e.add_argument("--classes", type=int, nargs="+", help="foreground classes to score (default: all found)")
    e.add_argument("--spacing", type=float, nargs="+", help="voxel spacing in mm when the files carry none")
    e.add_argument("--out", help="folder for per_case.csv and summary.json (default: beside --pred)")
    e.set_defaults(func=_eval)

    t = sub.add_parser("train", help="train a method from a config")
    _run_arguments(t, "YAML config or preset name", "override config keys: --set a.b=1 c=2 (repeatable)",
                   "run directory (default runs/<name>)", "continue an interrupted run exactly")
    t.set_defaults(func=_train)

    pt = sub.add_parser("pretrain", help="SPCL: self-paced contrastive pre-training of the encoder with meta-labels",
                        description="Pre-train the encoder of the config's model (model section) on every training "
                        "slice of the config's data (labelled and unlabelled cases of the split, labels unused) with "
                        "SPCL's self-paced supervised contrastive loss on meta-labels (slice position, patient, "
                        "phase; `pretrain` section). Then start any method from it: "
                        "ssmis train CONFIG --set init.encoder=DIR.")
    _run_arguments(pt, "YAML config or preset name (e.g. configs/spcl_pretrain.yaml)",
                   "override config keys: --set pretrain.scans_per_batch=6 train.iterations=500",
                   "run directory (default runs/<layout>-spcl-pretrain-s<seed>)",
                   "continue an interrupted pre-training exactly")
    pt.set_defaults(func=_pretrain)

    m = sub.add_parser("demo", help="phantom -> labels-only and Mean Teacher -> comparison table and plot")
    m.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    m.add_argument("--iterations", type=int, default=None, help="training steps per method")
    m.add_argument("--overwrite", action="store_true", help="replace an existing demo folder")
    m.set_defaults(func=_demo)

    b = sub.add_parser("bench", help="run a suite (methods x labelled counts x seeds) -> results.csv/.md and plots")
    b.add_argument("suite", help="suite YAML (base config + grid; see benchmarks/)")
    b.add_argument("--out", metavar="DIR", help="suite folder (default: the suite's `out`, else runs/bench/<name>)")
    b.add_argument("--jobs", type=int, default=1, metavar="N", help="cells trained side by side, one process each (default 1)")
    b.add_argument("--threads", type=int, metavar="N", help="CPU threads per cell (default: the cores divided by "
                   "--jobs, at most 4 per cell on a GPU); e.g. 1 while other work shares the machine")
    b.add_argument("--dry-run", action="store_true", help="list the cells and their state; train nothing")
    b.add_argument("--report-only", action="store_true", help="write the report from the finished cells; train nothing")
    b.add_argument("--only", nargs="+", metavar="PATTERN", help="train only the cells whose names match (e.g. 'bcp-*')")
    b.set_defaults(func=_bench)

    pr = sub.add_parser("predict", help="masks and measurements (volumes, EF, head circumference) for new scans")
    pr.add_argument("--run", required=True, metavar="RUN_DIR", help="run directory (or a checkpoint .pt) of a trained model")
    pr.add_argument("inputs", nargs="+", metavar="INPUT",
                    help="NIfTI, PNG/JPG images, SSL4MIS HDF5 files, or folders of them")
    pr.add_argument("--out", required=True, metavar="DIR", help="output folder: masks in the input's format, measurements.csv")
    pr.add_argument("--checkpoint", default="best", choices=["best", "last"], help="checkpoint of --run (default best)")
    pr.add_argument("--pixel-size", type=float, metavar="MM", help="pixel size in mm of 2D inputs (overrides any CSV)")
    pr.add_argument("--pixel-csv", metavar="CSV", help="CSV with columns filename and 'pixel size(mm)' (HC18 layout)")
    pr.add_argument("--measure", default="auto", choices=["auto", "hc", "volumes"],
                    help="auto: volumes per class, plus head circumference for ellipse targets (HC18); "
                         "hc: always add the HC; volumes: volumes only")
    pr.add_argument("--overlay", action="store_true", help="also write overlay PNGs under OUT/overlays/")
    pr.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="device (default auto)")
    pr.add_argument("--ensemble", action="store_true", help="two-network runs (c3s3, medl): predict with the average "
                    "of both networks' softmax instead of network 1")
    pr.set_defaults(func=_predict)

    ms = sub.add_parser("methods", help="list the registered methods (same as `ssmis list methods`)")
    ms.set_defaults(func=_methods)

    ls = sub.add_parser("list", help="list registered methods, models, data layouts or plug-ins (with their slot "
                                     "and the methods that offer it)")
    ls.add_argument("what", choices=["methods", "models", "layouts", "plugins"])
    ls.add_argument("pattern", nargs="?", default="*", help="shell pattern on the names (default *)")
    ls.set_defaults(func=_list)

    cf = sub.add_parser("config", help="show a resolved config").add_subparsers(dest="config_command", metavar="ACTION")
    cs = cf.add_parser("show", help="print the resolved config (defaults < file < --set)")
    cs.add_argument("config")
    cs.add_argument("--set", action="extend", nargs="+", type=_key_value, metavar="KEY=VALUE")
    cs.set_defaults(func=_config_show)
    cv = cf.add_parser("validate", help="check a config (keys, values, the method's own section); exit 2 on errors")
    cv.add_argument("config")
    cv.add_argument("--set", action="extend", nargs="+", type=_key_value, metavar="KEY=VALUE")
    cv.set_defaults(func=_config_validate)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    a = parser.parse_args(argv)
    if not hasattr(a, "func"):
        parser.print_help()
        return 2 if a.command is None else 2
    try:
        return int(a.func(a) or 0)
    except UserError as e:
        if a.debug:
            traceback.print_exc()
        print(f"ssmis: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ssmis: interrupted", file=sys.stderr)
        return 130
