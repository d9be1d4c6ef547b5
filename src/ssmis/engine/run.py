"""Set up and run one training run from a config: data, splits, method, precision, run directory."""

from __future__ import annotations

import importlib.util
import platform
import shutil
import sys
from pathlib import Path

import torch
import yaml

from ssmis import __version__
from ssmis.config import RunConfig, dump_config, load_config
from ssmis.data.adapter import make_adapter
from ssmis.data.dataset import build_slice_set, build_volume_set
from ssmis.data.splits import Splits, make_splits
from ssmis.engine import allocator, dist, threads
from ssmis.engine.amp import resolve_precision
from ssmis.atomic import atomic_write_json, atomic_write_text
from ssmis.engine.checkpoint import load_checkpoint
from ssmis.engine.rundir import prepare_run_dir
from ssmis.engine.trainer import MetricsLog, Trainer, TrainingDiverged, ValCase, validates_at_patch
from ssmis.errors import UserError
from ssmis.eval.inference import label_at_patch
from ssmis.methods import BuildContext
from ssmis.models import build_model
from ssmis.plugins import build_plugins
from ssmis.registry import METHODS, MODELS, PLUGINS


def default_run_name(cfg: RunConfig) -> str:
    lab = cfg.split.labeled
    lab = int(lab) if lab >= 1 else lab
    return cfg.name or f"{cfg.data.layout}-{cfg.method['name']}-l{lab}-s{cfg.seed}"


def default_config(cfg: RunConfig) -> dict:
    """Every key's default (the method section's for this config's method)."""
    d = RunConfig().model_dump(mode="json")
    d["method"] = METHODS.get(cfg.method["name"]).Config(name=cfg.method["name"]).model_dump(mode="json")
    d["plugins"] = [PLUGINS.get(p["name"]).Config(name=p["name"]).model_dump(mode="json") for p in cfg.plugins]
    return d


def pick_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("train.device", "cuda requested but no CUDA device is available", "Use train.device=cpu.")
    return torch.device("cuda" if name == "cuda" or (name == "auto" and torch.cuda.is_available()) else "cpu")


def _splits_for_run(adapter, cfg: RunConfig, run_dir: Path | None, resuming: bool, main: bool = True) -> Splits:
    splits = make_splits(adapter, cfg.split)
    if run_dir is not None and main:
        path = run_dir / "splits.json"
        if resuming and path.is_file():
            old = Splits.read(path)
            if (old.labeled, old.unlabeled, old.val, old.test) != (splits.labeled, splits.unlabeled, splits.val, splits.test):
                raise UserError(str(path), "the data split differs from the one the run started with",
                                "Resume with the same data and split settings.")
        atomic_write_text(path, splits.to_json())
    return splits


def _check_window(stride: list[int] | None, patch: list[int]) -> None:
    if stride is None:
        return
    if len(patch) != 3:
        raise UserError("eval.stride", "a sliding-window stride applies to 3D patches only",
                        "Remove eval.stride (2D models predict slice by slice).")
    full = stride * 3 if len(stride) == 1 else stride
    if len(full) != 3 or any(s > p for s, p in zip(full, patch)):
        raise UserError("eval.stride", f"{stride} does not fit the patch {patch}",
                        "Give one value or three, each at most the patch size along its axis.")


def _counts_line(splits: Splits, labeled, unlabeled, val_cases, dims: int, method_cls, cfg: RunConfig) -> str:
    """What the run trains and validates on, as the start line says it: the split's unlabelled cases are counted
    even where the method does not use them."""
    unit = "slices" if dims == 2 else "volumes"
    parts = [f"{len(labeled)} labelled {unit} ({len(splits.labeled)} cases)"]
    if unlabeled is not None:
        parts.append(f"{len(unlabeled)} unlabelled {unit} ({len(splits.unlabeled)} cases)")
    else:
        why = (f"{cfg.method['name']} trains on labels only" if not method_cls.uses_unlabeled
               else "train.unlabeled_bs=0")
        parts.append(f"{len(splits.unlabeled)} unlabelled cases in the split, not used ({why})")
    parts.append(f"{len(val_cases)} val cases" if val_cases else
                 "no val cases (the 'best' checkpoint is the last step)")
    if cfg.data.spacing:
        parts.append(f"spacing {'×'.join(f'{v:g}' for v in cfg.data.spacing)} mm (data.spacing)")
    return ", ".join(parts)


def setup(cfg: RunConfig, run_dir: Path | None, resuming: bool = False, log=print,
          dinfo: dist.DistInfo = dist.DistInfo()) -> Trainer:
    t = cfg.train
    device = pick_device(t.device)
    _, threads_why = threads.apply(device.type, t.threads)
    memory_why = allocator.apply(t.cpu_allocator) if device.type == "cpu" else None
    if t.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    torch.manual_seed(cfg.seed)
    precision = resolve_precision(t.amp, t.channels_last, device, len(cfg.data.patch_size))
    method_cls = METHODS.get(cfg.method["name"], "method.name")
    mcfg = method_cls.Config.model_validate(cfg.method)
    method_cls.preflight(mcfg)

    adapter = make_adapter(cfg.data.layout, cfg.data.root, cfg.data)
    info = adapter.info()
    num_classes = cfg.data.num_classes or info.num_classes
    channels = cfg.data.channels or info.channels
    dims = len(cfg.data.patch_size)
    model_dims = MODELS.get(cfg.model.name, "model.name").spatial_dims
    if dims not in (2, 3):
        raise UserError("data.patch_size", f"{cfg.data.patch_size} is neither [H, W] nor [D, H, W]", "Fix the patch size.")
    if model_dims != dims:
        hint = ("A 2D model trains slice-wise: give a 2D data.patch_size [H, W]." if model_dims == 2
                else "A 3D model needs a 3D data.patch_size [D, H, W].")
        raise UserError("model.name", f"{cfg.model.name} is a {model_dims}D model but data.patch_size "
                        f"{cfg.data.patch_size} is {dims}D", hint)
    if dims not in method_cls.spatial_dims:
        raise UserError("method.name", f"{cfg.method['name']} has no {dims}D form",
                        f"Use a {'3' if dims == 2 else '2'}D model and patch size.")
    _check_window(cfg.eval.stride, cfg.data.patch_size)
    splits = _splits_for_run(adapter, cfg, run_dir, resuming, dinfo.is_main)
    by_id = {it.id: it for it in adapter.items("train") + adapter.items("eval")}
    patch = tuple(cfg.data.patch_size)

    def training_set(ids, labeled, desc):
        items = [by_id[i] for i in ids]
        if dims == 3:
            return build_volume_set(adapter, items, patch, labeled, cfg.data.fg_fraction, desc,
                                    tuple(cfg.data.rot_plane))
        return build_slice_set(adapter, items, patch, labeled, cfg.data.slice_axis, cfg.data.image_order, desc,
                               cfg.data.pad_square, cfg.data.augment_at).to(device)   # augmented where it trains

    labeled = training_set(splits.labeled, True, "labelled")
    unlabeled = None
    if method_cls.uses_unlabeled and t.unlabeled_bs > 0:
        unlabeled = training_set(splits.unlabeled, False, "unlabelled")
    val_ids = splits.val[: t.val_max_cases] if t.val_max_cases else splits.val
    val_cases = []
    for i in val_ids:
        s = adapter.load(by_id[i])
        label = s["label"]
        if validates_at_patch(cfg):               # scored against the mask as training sees it
            label = label_at_patch(label, patch, cfg.data.slice_axis, cfg.data.pad_square)
        val_cases.append(ValCase(i, s["image"], label))

    def make_model(name: str | None = None, **args):
        """The run's model (cfg.model), or a second architecture by registry name (method.net2 of two-network
        methods) with the run's channels and classes and its own defaults unless `args` say otherwise (`args`
        also override the run's model, e.g. num_classes=1 for a one-logit head)."""
        if name is None:
            m = build_model(cfg.model, channels, **{"num_classes": num_classes, **args})
        else:
            cls = MODELS.get(name, "method.net2")
            if cls.spatial_dims != dims:
                raise UserError("method.net2", f"{name} is a {cls.spatial_dims}D model but data.patch_size "
                                f"{cfg.data.patch_size} is {dims}D", f"Give {cfg.method['name']} a {dims}D second "
                                f"network ({', '.join(n for n in MODELS.list() if MODELS.get(n).spatial_dims == dims)}).")
            m = cls(**{"in_channels": channels, "num_classes": num_classes, **args})
        m = m.to(device)
        if dinfo.active and cfg.dist.sync_bn:
            m = torch.nn.SyncBatchNorm.convert_sync_batchnorm(m)
        if not precision.channels_last:
            return m
        return m.to(memory_format=torch.channels_last if dims == 2 else torch.channels_last_3d)

    def wrap(module):
        if not dinfo.active:
            return module
        from torch.nn.parallel import DistributedDataParallel as DDP

        return DDP(module, device_ids=[dinfo.local_rank] if device.type == "cuda" else None,
                   find_unused_parameters=method_cls.find_unused_parameters)

    plugins = build_plugins(cfg.plugins, num_classes, dims, t.iterations).to(device)
    torch.manual_seed(cfg.seed)                    # identical initialisation on every rank
    ctx = BuildContext(make_model, device, t.iterations, num_classes, spatial_dims=dims, wrap=wrap, plugins=plugins,
                       labeled_count=len(labeled), labeled_bs=t.labeled_bs)
    method = method_cls(mcfg, ctx)
    plugins.check_host(cfg.method["name"], method.slots())
    if len(plugins):
        if plugins.has_parameters() and dinfo.active:
            raise UserError("plugins", "plug-ins with learnable parameters do not train under DDP yet",
                            "Train in one process, or use plug-ins without parameters.")
        ctx.add("plugins", plugins, trainable=plugins.has_parameters())     # checkpointed and resumed with the run
    init_info = None
    if cfg.init.encoder:                           # after the build: re-initialising methods and EMA copies included
        from ssmis.spcl.encoder import load_encoder_init

        example = torch.zeros(2, channels, *patch, device=device)
        init_info = load_encoder_init(cfg.init.encoder, ctx.modules, cfg.model.name, MODELS.get(cfg.model.name),
                                      example, log, resuming)
    torch.manual_seed(cfg.seed + 1000003 * dinfo.rank)   # per-rank dropout and noise draws
    net = method.eval_model()
    model_info = {"model_name": MODELS.name_of(net) or cfg.model.name, "model_args": dict(net.init_args),
                  "precision": precision.label, "config": cfg.model_dump(mode="json")}
    members = method.ensemble_modules()
    if members:                          # what `ssmis eval/predict --ensemble` rebuild
        model_info["ensemble"] = [{"module": m, "model_name": MODELS.name_of(ctx.modules[m]) or cfg.model.name,
                                   "model_args": dict(ctx.modules[m].init_args)} for m in members]
    if init_info is not None:
        model_info["init_encoder"] = init_info    # in every checkpoint and in train_summary.json
    log(f"ssmis {__version__}: {cfg.method['name']} on {info.layout}: "
        f"{_counts_line(splits, labeled, unlabeled, val_cases, dims, method_cls, cfg)}; {t.iterations} steps; augmentation "
        f"{t.augment if t.augment != 'auto' else method_cls.default_augment}; precision {precision.label} ({precision.reason}); "
        f"device {device}, {torch.get_num_threads()} threads ({threads_why})"
        + (f"; {memory_why}" if memory_why else "")
        + (f", {dinfo.world} processes" if dinfo.active else ""))
    return Trainer(cfg, method, ctx, labeled, unlabeled, val_cases, precision, run_dir, device, model_info, log, dinfo)


def train(cfg: RunConfig, out: str | Path | None = None, resume: bool = False, overwrite: bool = False,
          progress: bool = True, stop_after: int | None = None, test_at_end: bool = True) -> dict:
    """Train (or resume) a run; returns a summary dict. `stop_after` ends early (to test resume)."""
    run_dir = Path(out) if out is not None else Path("runs") / default_run_name(cfg)
    if cfg.train.tensorboard and importlib.util.find_spec("tensorboard") is None:
        raise UserError("train.tensorboard", "TensorBoard is not installed",
                        "pip install 'ssmis[tensorboard]', or set train.tensorboard=false.")
    dinfo = dist.init(pick_device(cfg.train.device).type)
    dist.check_batch(dinfo.world, cfg.train.labeled_bs, cfg.train.unlabeled_bs)
    cfg_dict = cfg.model_dump(mode="json")
    error, resuming = None, False
    empty_before = run_dir.is_dir() and not any(run_dir.iterdir())
    if dinfo.is_main:
        try:
            resuming = prepare_run_dir(run_dir, cfg_dict, resume, overwrite, default_config(cfg))
        except UserError as e:
            error = e
    error, resuming = dist.broadcast_object(dinfo, (error, resuming))   # every rank stops on rank 0's error
    if error is not None:
        raise error
    log_file = open(run_dir / "log.txt", "a") if dinfo.is_main else None

    def log(msg: str) -> None:
        if log_file is not None:
            print(msg, file=sys.stderr)
            log_file.write(msg + "\n")
            log_file.flush()

    if not resume and dinfo.is_main:
        meta = {"ssmis": {"version": __version__, "torch": str(torch.__version__), "python": platform.python_version(),
                          "command": " ".join(sys.argv), "host_cpu": platform.processor() or platform.machine()}}
        atomic_write_text(run_dir / "config.yaml", yaml.safe_dump(meta, sort_keys=False) + dump_config(cfg))
    try:
        trainer = setup(cfg, run_dir, resuming, log, dinfo)
    except BaseException:
        if log_file is not None:
            log_file.close()
        if dinfo.is_main and not resume:         # no half-made run: a retry needs no --overwrite
            shutil.rmtree(run_dir, ignore_errors=True)
            if empty_before:
                run_dir.mkdir(parents=True, exist_ok=True)
        raise
    ckpt_step = None
    if resuming:
        state = load_checkpoint(run_dir / "checkpoints" / "last.pt")
        trainer.load_state_dict(state)
        ckpt_step = trainer.step
        log(f"resumed at step {trainer.step}")
    metrics = None
    if dinfo.is_main:
        metrics = MetricsLog(run_dir / "metrics.csv", truncate_after=(ckpt_step or 0) if resume else None,
                             tensorboard_dir=run_dir / "tb" if cfg.train.tensorboard else None)
    try:
        result = trainer.fit(metrics, progress=progress, stop_after=stop_after)
    finally:
        if dinfo.is_main:
            metrics.close()
            log_file.close()
    result.update({"run_dir": str(run_dir), "precision": trainer.precision.label, "world": dinfo.world})
    if "init_encoder" in trainer.model_info:
        result["init_encoder"] = trainer.model_info["init_encoder"]
    dist.barrier(dinfo)
    if trainer.step >= trainer.total and dinfo.is_main:
        atomic_write_json(run_dir / "train_summary.json", result)      # non-finite values as null
        from ssmis.eval.plots import plot_curves

        plot_curves(run_dir / "metrics.csv", run_dir / "plots" / "curves.png")
        if test_at_end and cfg.eval.split:
            from ssmis.eval.run_eval import evaluate_checkpoints

            for ck, summary in evaluate_checkpoints(run_dir, "test", ("best", "last"), quiet=not progress).items():
                result[f"test_{ck}"] = summary
    return result


def train_from_cli(config: str, overrides: list[str], out: str | None, resume: bool, overwrite: bool) -> int:
    cfg = load_config(config, overrides)
    try:
        train(cfg, out=out, resume=resume, overwrite=overwrite)
    except TrainingDiverged as e:
        print(f"ssmis: training stopped: {e}", file=sys.stderr)
        return 1
    dist.shutdown()               # under torchrun: leave the process group before the interpreter exits
    return 0
