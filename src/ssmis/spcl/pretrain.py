"""`ssmis pretrain`: SPCL's self-paced contrastive pre-training of the encoder with meta-labels (methods.md "SPCL").

Per step: a batch of slices (m scans × one slice per partition, or a plain random batch), two independently
augmented views of each (the training set's own `batch()` with two generators), one encoder pass over both views
(the decoder never runs, so only the encoder learns), one projection head and one self-paced supervised
contrastive loss per meta-label on the bottleneck, and their weighted average as the loss. The self-paced
threshold γ of each meta-label grows per epoch (e = 0 … E−1); the lr warms up from lr/400 over the first epochs,
then decays with a cosine to min_lr (RAdam, as the reference).

The run directory is the engine's: config.yaml, splits.json (the pre-training uses the split's labelled and
unlabelled training cases, never val or test, and no label), log.txt, metrics.csv (long format, stage
`pretrain`), checkpoints/last.pt (the encoder for `init.encoder`, plus the full state for --resume, bitwise exact
with train.deterministic), pretrain_summary.json and plots/pretrain.png (loss and share of admitted pairs).
Single process (no DDP).
"""

from __future__ import annotations

import math
import os
import platform
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml
from tqdm import tqdm

from ssmis import __version__
from ssmis.atomic import atomic_write_json, atomic_write_text
from ssmis.config import RunConfig, dump_config, load_config
from ssmis.data.adapter import make_adapter
from ssmis.data.dataset import build_slice_set
from ssmis.data.meta_labels import meta_label_values, slice_origin
from ssmis.data.partition_sampler import SAMPLER_STREAM, PartitionSampler, view_generators
from ssmis.engine import threads
from ssmis.engine.amp import resolve_precision
from ssmis.engine.checkpoint import load_checkpoint, save_checkpoint
from ssmis.engine.run import _splits_for_run, default_config, pick_device
from ssmis.engine.rundir import prepare_run_dir
from ssmis.engine.streams import Stream
from ssmis.engine.trainer import MetricsLog, TrainingDiverged
from ssmis.errors import UserError
from ssmis.losses.supcon import epoch_of, gamma_at, supcon_loss, weighted_average
from ssmis.models import build_model
from ssmis.registry import MODELS
from ssmis.spcl.encoder import PRETRAIN_KIND, ProjectionHead, bottleneck, encoder_keys

WARMUP_MULTIPLIER = 400      # the reference warms up from base lr to base × 400 (semi_seg/__init__.py)
STAGE = "pretrain"


def pretrain_lr(step: int, total: int, p) -> float:
    """Linear warm-up from lr/400 to lr over warmup_epochs·T/E steps, then cosine from lr to min_lr."""
    warm = int(round(p.warmup_epochs * total / p.epochs))
    if step < warm:
        return p.lr * (1 / WARMUP_MULTIPLIER + (1 - 1 / WARMUP_MULTIPLIER) * step / warm)
    rest = max(total - warm, 1)
    return p.min_lr + (p.lr - p.min_lr) * 0.5 * (1 + math.cos(math.pi * (step - warm) / rest))


def default_pretrain_dir(cfg: RunConfig) -> Path:
    return Path("runs") / (cfg.name or f"{cfg.data.layout}-spcl-pretrain-s{cfg.seed}")


@dataclass
class Pretrainer:
    cfg: RunConfig
    data: object                     # SliceSet | SourceSliceSet, unlabelled
    labels: dict[str, torch.Tensor]  # meta-label name -> N integers
    sampler: object                  # PartitionSampler | Stream
    batch_slices: int
    net: torch.nn.Module
    heads: torch.nn.ModuleDict
    keys: list[str]                  # the encoder's state-dict keys
    precision: object
    device: torch.device
    run_dir: Path | None
    log_fn: object = print

    def __post_init__(self):
        p, t = self.cfg.pretrain, self.cfg.train
        self.total, self.step = t.iterations, 0
        enc = set(self.keys)
        params = [q for n, q in self.net.named_parameters() if n in enc] + list(self.heads.parameters())
        if p.optimizer == "radam":
            self.opt = torch.optim.RAdam(params, lr=p.lr, weight_decay=p.weight_decay)
        elif p.optimizer == "adam":
            self.opt = torch.optim.Adam(params, lr=p.lr, weight_decay=p.weight_decay)
        else:
            self.opt = torch.optim.SGD(params, lr=p.lr, momentum=0.9, weight_decay=p.weight_decay)

    # ---- batches ---------------------------------------------------------------------------------
    def indices(self, step: int) -> torch.Tensor:
        if isinstance(self.sampler, PartitionSampler):
            return self.sampler.at(step)
        return self.sampler.at(step * self.batch_slices)[0]

    def views(self, idx: torch.Tensor, step: int) -> torch.Tensor:
        p = self.cfg.pretrain
        out = [self.data.batch(idx, g, p.augment, p.intensity)[0] for g in view_generators(self.cfg.seed, step)]
        x = torch.cat(out).to(self.device)
        return x.contiguous(memory_format=torch.channels_last) if self.precision.channels_last else x

    # ---- one step --------------------------------------------------------------------------------
    def train_step(self, step: int) -> dict[str, float]:
        p = self.cfg.pretrain
        lr = pretrain_lr(step, self.total, p)
        for g in self.opt.param_groups:
            g["lr"] = lr
        idx = self.indices(step)
        x = self.views(idx, step)
        n = len(idx)
        epoch = epoch_of(step, self.total, p.epochs)
        with self.precision.autocast(self.device):
            feat = bottleneck(self.net, x)
            results, logs = [], {}
            for ml in p.meta_labels:
                z = self.heads[_head_name(ml.name)](feat)
                gamma = gamma_at(epoch, p.epochs, ml.gamma0, ml.gamma1, p.schedule)
                r = supcon_loss(z[:n], z[n:], self.labels[ml.name][idx], p.tau, gamma, p.weighting,
                                p.normalize_weights)
                results.append(r.loss)
                logs.update({f"loss_{ml.name}": float(r.loss.detach()), f"supcon_{ml.name}": r.plain,
                             f"admitted_{ml.name}": r.admitted,
                             f"weight_{ml.name}": r.mean_weight, f"gamma_{ml.name}": gamma})
            loss = weighted_average(results, [ml.weight for ml in p.meta_labels])
        if not bool(torch.isfinite(loss.detach())):
            raise TrainingDiverged(f"pre-training loss was not finite at step {step} (logs: {logs}). The last "
                                   "checkpoint is kept. Try a lower pretrain.lr or train.amp=off.")
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return {"loss": float(loss.detach()), **logs, "lr": lr, "epoch": epoch, "slices": n}

    # ---- state -----------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        sd = self.net.state_dict()
        return {"kind": PRETRAIN_KIND, "step": self.step, "total": self.total,
                "encoder": {k: sd[k] for k in self.keys},
                "modules": {"net": sd, "heads": self.heads.state_dict()},
                "optimizer": self.opt.state_dict(),
                "rng": {"torch": torch.get_rng_state(),
                        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None},
                "model_name": self.cfg.model.name, "model_args": dict(self.net.init_args),
                "meta_labels": [ml.name for ml in self.cfg.pretrain.meta_labels],
                "precision": self.precision.label, "config": self.cfg.model_dump(mode="json")}

    def load_state_dict(self, s: dict) -> None:
        if s.get("kind") != PRETRAIN_KIND:
            raise UserError("resume", "the run's last.pt is not a pre-training checkpoint", "Resume with `ssmis train`.")
        self.net.load_state_dict(s["modules"]["net"])
        self.heads.load_state_dict(s["modules"]["heads"])
        self.opt.load_state_dict(s["optimizer"])
        torch.set_rng_state(s["rng"]["torch"])
        if s["rng"]["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state(s["rng"]["cuda"])
        self.step = int(s["step"])

    def save(self) -> None:
        if self.run_dir is not None:
            save_checkpoint(self.run_dir / "checkpoints" / "last.pt", self.state_dict())

    # ---- loop ------------------------------------------------------------------------------------
    def fit(self, metrics: MetricsLog | None = None, progress: bool = True, stop_after: int | None = None) -> dict:
        t = self.cfg.train
        bar = tqdm(total=self.total, initial=self.step, desc="pretrain", disable=not progress, dynamic_ncols=True,
                   mininterval=1.0)
        start, step_seconds, logs = time.perf_counter(), [], {}
        self.net.train()
        self.heads.train()
        while self.step < self.total:
            t0 = time.perf_counter()
            logs = self.train_step(self.step)
            self.step += 1
            step_seconds.append(time.perf_counter() - t0)
            if metrics and (self.step % t.log_every == 0 or self.step == self.total):
                metrics.write(self.step, STAGE, "train", {k: v for k, v in logs.items() if k != "slices"})
            bar.update(1)
            if progress and self.step % t.log_every == 0:
                first = self.cfg.pretrain.meta_labels[0].name
                bar.set_postfix(loss=f"{logs['loss']:.4f}", admitted=f"{logs[f'admitted_{first}']:.2f}",
                                lr=f"{logs['lr']:.2e}", refresh=False)
            if self.step % t.ckpt_every == 0 or self.step == self.total:
                self.save()
            if stop_after is not None and self.step >= stop_after:
                break
        bar.close()
        return {"step": self.step, "total": self.total, "seconds": time.perf_counter() - start,
                "median_step_seconds": float(np.median(step_seconds)) if step_seconds else None,
                "last": {k: v for k, v in logs.items()}}


def _head_name(label: str) -> str:
    return label.replace(".", "_")


def setup_pretrain(cfg: RunConfig, run_dir: Path | None, resuming: bool = False, log=print) -> Pretrainer:
    t, p = cfg.train, cfg.pretrain
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UserError("ssmis pretrain", "runs in one process (no DDP)", "Start it without torchrun.")
    device = pick_device(t.device)
    _, threads_why = threads.apply(device.type, t.threads)
    if t.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    torch.manual_seed(cfg.seed)
    if len(cfg.data.patch_size) != 2 or MODELS.get(cfg.model.name, "model.name").spatial_dims != 2:
        raise UserError("data.patch_size", "SPCL pre-trains a 2D encoder on slices",
                        "Use a 2D model and a 2D data.patch_size [H, W].")
    names = [ml.name for ml in p.meta_labels]
    if len(set(names)) != len(names):
        raise UserError("pretrain.meta_labels", f"a meta-label is named twice ({names})", "Name each once.")
    precision = resolve_precision(t.amp, t.channels_last, device, 2)
    adapter = make_adapter(cfg.data.layout, cfg.data.root, cfg.data)
    info = adapter.info()
    splits = _splits_for_run(adapter, cfg, run_dir, resuming)
    by_id = {it.id: it for it in adapter.items("train")}
    ids = sorted(splits.labeled + splits.unlabeled)   # every training case, never val/test; sorted, so the same
    #                                                   pre-training serves every labelled count of a split
    patch = tuple(cfg.data.patch_size)
    data = build_slice_set(adapter, [by_id[i] for i in ids], patch, False, cfg.data.slice_axis, cfg.data.image_order,
                           "pre-training", cfg.data.pad_square, cfg.data.augment_at).to(device)
    origins = [slice_origin(by_id[c]) for c in data.cases]
    labels = {n: meta_label_values(n, origins, data.slice_index, data.num_slices, p.partitions, p.partition_rule)
              for n in names}
    scans = meta_label_values("scan", origins, data.slice_index, data.num_slices)
    n_scans = len(set(scans.tolist()))
    positions = bool((data.slice_index >= 0).all())
    kind = p.sampler if p.sampler != "auto" else ("partition" if positions else "random")
    if kind == "partition":
        if not positions:
            raise UserError("pretrain.sampler", "the partition sampler needs slices cut from volumes; these data are "
                            "2D images", "Use pretrain.sampler=random.")
        parts = meta_label_values("partition", origins, data.slice_index, data.num_slices, p.partitions,
                                  p.partition_rule)
        if p.scans_per_batch > n_scans:
            raise UserError("pretrain.scans_per_batch", f"{p.scans_per_batch} scans per batch but the training "
                            f"split has {n_scans} scans", "Lower pretrain.scans_per_batch.")
        sampler = PartitionSampler(scans, parts, p.scans_per_batch, cfg.seed)
        batch_slices = sampler.max_batch
        how = f"{p.scans_per_batch} scans x one slice per partition (P = {p.partitions}, up to {batch_slices} slices)"
    else:
        batch_slices = p.batch_size or p.scans_per_batch * p.partitions
        if batch_slices > len(data):
            raise UserError("pretrain.batch_size", f"{batch_slices} slices per batch but only {len(data)} training "
                            "slices", "Lower pretrain.batch_size.")
        sampler = Stream(len(data), batch_slices, cfg.seed, SAMPLER_STREAM)
        how = f"{batch_slices} random slices"
    channels = cfg.data.channels or info.channels
    net = build_model(cfg.model, channels, cfg.data.num_classes or info.num_classes).to(device)
    if precision.channels_last:
        net = net.to(memory_format=torch.channels_last)
    example = torch.zeros(2, channels, *patch, device=device)
    keys = encoder_keys(net, example)
    with torch.no_grad():
        net.eval()
        width = bottleneck(net, example).shape[1]
        net.train()
    heads = torch.nn.ModuleDict({_head_name(n): ProjectionHead(width, p.projector_dim) for n in names}).to(device)
    log(f"ssmis {__version__}: SPCL pre-training on {info.layout}: {len(data)} slices of {n_scans} scans ({len(ids)} training cases) "
        f"(labels unused; val/test excluded); batches of {how}, two views each ({p.augment}, intensity {p.intensity}); "
        f"meta-labels {', '.join(f'{ml.name} (λ {ml.weight:g}, γ {ml.gamma0:g} -> {ml.gamma1:g})' for ml in p.meta_labels)}, "
        f"{p.weighting} weights, {p.schedule} schedule over {p.epochs} epochs; encoder of {cfg.model.name} "
        f"({len(keys)} tensors, bottleneck {width} channels); {t.iterations} steps; {p.optimizer} lr {p.lr:g}; "
        f"precision {precision.label} ({precision.reason}); device {device}, {torch.get_num_threads()} threads "
        f"({threads_why})")
    return Pretrainer(cfg, data, labels, sampler, batch_slices, net, heads, keys, precision, device, run_dir, log)


def plot_pretrain(metrics_csv: Path, out_png: Path, labels: list[str]) -> Path:
    """Loss (total, per meta-label, and unweighted: the self-paced weights make the weighted loss rise as γ admits
    harder pairs) and the share of admitted positive pairs against steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ssmis.eval.plots import read_series, save_figure

    fig, (ax_l, ax_a) = plt.subplots(1, 2, figsize=(10, 3.8))
    ax_l.plot(*read_series(metrics_csv, "train", "loss"), lw=1.2, label="loss (weighted average)")
    for n in labels:
        if len(labels) > 1:
            ax_l.plot(*read_series(metrics_csv, "train", f"loss_{n}"), lw=0.8, label=n)
        ax_l.plot(*read_series(metrics_csv, "train", f"supcon_{n}"), lw=0.8, ls="--", label=f"{n}: unweighted")
        ax_a.plot(*read_series(metrics_csv, "train", f"admitted_{n}"), lw=1, label=f"{n}: w > 0")
        ax_a.plot(*read_series(metrics_csv, "train", f"weight_{n}"), lw=1, ls="--", label=f"{n}: mean w")
    ax_l.set(xlabel="step", ylabel="self-paced SupCon loss", title="Pre-training loss")
    ax_a.set(xlabel="step", ylabel="share of positive pairs", ylim=(-0.02, 1.02), title="Admitted pairs")
    for ax in (ax_l, ax_a):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return save_figure(fig, out_png)


def pretrain(cfg: RunConfig, out: str | Path | None = None, resume: bool = False, overwrite: bool = False,
             progress: bool = True, stop_after: int | None = None) -> dict:
    """Pre-train (or resume); returns a summary dict. `stop_after` ends early (to test resume)."""
    run_dir = Path(out) if out is not None else default_pretrain_dir(cfg)
    empty_before = run_dir.is_dir() and not any(run_dir.iterdir())
    resuming = prepare_run_dir(run_dir, cfg.model_dump(mode="json"), resume, overwrite, default_config(cfg))
    log_file = open(run_dir / "log.txt", "a")

    def log(msg: str) -> None:
        print(msg, file=sys.stderr)
        log_file.write(msg + "\n")
        log_file.flush()

    if not resume:
        meta = {"ssmis": {"version": __version__, "torch": str(torch.__version__), "python": platform.python_version(),
                          "command": " ".join(sys.argv), "host_cpu": platform.processor() or platform.machine()}}
        atomic_write_text(run_dir / "config.yaml", yaml.safe_dump(meta, sort_keys=False) + dump_config(cfg))
    try:
        trainer = setup_pretrain(cfg, run_dir, resuming, log)
        ckpt_step = None
        if resuming:
            trainer.load_state_dict(load_checkpoint(run_dir / "checkpoints" / "last.pt"))
            ckpt_step = trainer.step
            log(f"resumed at step {trainer.step}")
    except BaseException:
        log_file.close()
        if not resume:                            # no half-made run: a retry needs no --overwrite
            shutil.rmtree(run_dir, ignore_errors=True)
            if empty_before:
                run_dir.mkdir(parents=True, exist_ok=True)
        raise
    metrics = MetricsLog(run_dir / "metrics.csv", truncate_after=(ckpt_step or 0) if resume else None)
    try:
        result = trainer.fit(metrics, progress=progress, stop_after=stop_after)
    finally:
        metrics.close()
        log_file.close()
    result.update({"run_dir": str(run_dir), "precision": trainer.precision.label,
                   "encoder_tensors": len(trainer.keys), "batch_slices": trainer.batch_slices})
    if trainer.step >= trainer.total:
        atomic_write_json(run_dir / "pretrain_summary.json", result)
        plot_pretrain(run_dir / "metrics.csv", run_dir / "plots" / "pretrain.png",
                      [ml.name for ml in cfg.pretrain.meta_labels])
    return result


def pretrain_from_cli(config: str, overrides: list[str], out: str | None, resume: bool, overwrite: bool) -> int:
    cfg = load_config(config, overrides)
    try:
        r = pretrain(cfg, out=out, resume=resume, overwrite=overwrite)
    except TrainingDiverged as e:
        print(f"ssmis: pre-training stopped: {e}", file=sys.stderr)
        return 1
    if r["step"] >= r["total"]:
        print(f"pre-training done: {r['run_dir']} (use it with --set init.encoder={r['run_dir']})", file=sys.stderr)
    return 0
