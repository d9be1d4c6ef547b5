"""The training loop: two streams -> method.train_step -> guarded optimiser step -> teacher update ->
logging, validation and checkpoints. Knows no method by name."""

from __future__ import annotations

import csv
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ssmis.data.dataset import SliceSet, VolumeSet
from ssmis.engine.amp import Precision
from ssmis.engine.batches import BatchSource
from ssmis.engine import dist
from ssmis.engine.checkpoint import save_checkpoint
from ssmis.engine.streams import Stream
from ssmis.errors import UserError
from ssmis.eval.inference import dice_per_class, predict_case
from ssmis.eval.report import selection_rule
from ssmis.methods.base import Batch, BuildContext, Method
from ssmis.plugins.base import sum_over_processes
from ssmis.schedules import lr_factor


class TrainingDiverged(RuntimeError):
    """Too many non-finite losses in a row; the last good checkpoint is left intact."""


@dataclass
class ValCase:
    case: str
    image: np.ndarray
    label: np.ndarray


class MetricsLog:
    """metrics.csv in long format (step,stage,split,name,value): new keys never break the header."""

    def __init__(self, path: Path, truncate_after: int | None = None, tensorboard_dir: Path | None = None):
        self.path = path
        self.tb = None
        if tensorboard_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise UserError("train.tensorboard", "TensorBoard is not installed",
                                "pip install 'ssmis[tensorboard]', or set train.tensorboard=false.") from None
            self.tb = SummaryWriter(str(tensorboard_dir))
        if truncate_after is not None and path.is_file():
            with open(path) as f:
                rows = [r for r in csv.reader(f)][1:]
            keep = [r for r in rows if int(r[0]) <= truncate_after]
            with open(path, "w", newline="") as f:
                csv.writer(f).writerows([["step", "stage", "split", "name", "value"], *keep])
        elif not path.is_file():
            with open(path, "w", newline="") as f:
                csv.writer(f).writerow(["step", "stage", "split", "name", "value"])
        self._f = open(path, "a", newline="")
        self._w = csv.writer(self._f)

    def write(self, step: int, stage: str, split: str, values: dict) -> None:
        for k, v in values.items():
            self._w.writerow([step, stage, split, k, f"{float(v):.6g}"])
            if self.tb is not None:
                self.tb.add_scalar(f"{split}/{k}", float(v), step)
        self._f.flush()

    def close(self) -> None:
        self._f.close()
        if self.tb is not None:
            self.tb.close()


@dataclass
class Trainer:
    cfg: object                       # RunConfig
    method: Method
    ctx: BuildContext
    labeled: SliceSet | VolumeSet
    unlabeled: SliceSet | VolumeSet | None
    val_cases: list[ValCase]
    precision: Precision
    run_dir: Path | None
    device: torch.device
    model_info: dict = field(default_factory=dict)
    log_fn: callable = print
    dist: dist.DistInfo = field(default_factory=dist.DistInfo)

    def __post_init__(self):
        t = self.cfg.train
        self.total = t.iterations
        self.augment = t.augment if t.augment != "auto" else type(self.method).default_augment
        if self.method.per_module_lr:          # one group per module, each with its own lr (Method.lr_scale)
            params = [{"params": list(self.ctx.modules[n].parameters()), "module": n} for n in self.ctx.trainable]
        else:
            params = [p for n in self.ctx.trainable for p in self.ctx.modules[n].parameters()]
        o = self.cfg.optim
        if o.name == "sgd":
            self.opt = torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
        else:
            cls = torch.optim.Adam if o.name == "adam" else torch.optim.AdamW
            self.opt = cls(params, lr=o.lr, weight_decay=o.weight_decay)
        # fp16 needs loss scaling; bf16 and fp32 do not
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision.dtype == torch.float16)
        r, w = self.dist.rank, self.dist.world
        ahead = t.prefetch == "on" or (t.prefetch == "auto" and self.device.type != "cpu")

        def source(data, bs: int, stream_id: int, labeled: bool) -> BatchSource:
            return BatchSource(data, Stream(len(data), bs, self.cfg.seed, stream_id, r, w), labeled, self.augment,
                               t.intensity, self.device, self.precision.channels_last, ahead)

        has_ub = self.unlabeled is not None and t.unlabeled_bs > 0
        self.lb_source = source(self.labeled, t.labeled_bs, 0, True)
        self.ub_source = source(self.unlabeled, t.unlabeled_bs, 1, False) if has_ub else None
        self.mix_source = source(self.unlabeled, t.unlabeled_bs, 2, False) if has_ub and self.method.mix_batch else None
        self.step = 0                  # next step to run
        self.best = -math.inf
        self.best_step = -1
        self.nonfinite = 0
        self.history: list[tuple[int, float]] = []
        self.stage_best: dict | None = None  # best-validated state of the current handover stage (see Method)
        self.ctx.copy_optimizer_state = self._copy_optimizer_state
        self.val_at_patch = validates_at_patch(self.cfg)     # the val labels were taken to the patch in setup

    # ---- batches -------------------------------------------------------------------------------
    def _batches(self) -> tuple[Batch, Batch | None]:
        lb = self.lb_source.next()
        ub = self.ub_source.next() if self.ub_source else None
        if ub is not None and self.mix_source is not None:
            ub.mix = self.mix_source.next()
        return lb, ub

    # ---- state ---------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "step": self.step, "best": self.best, "best_step": self.best_step, "nonfinite": self.nonfinite,
            "modules": {n: m.state_dict() for n, m in self.ctx.modules.items()},
            "eval_weights": self.method.eval_model().state_dict(),   # what eval/predict load, no method needed
            "optimizer": self.opt.state_dict(),
            "scaler": self.scaler.state_dict(),
            "streams": {"labeled": self.lb_source.state_dict(),
                        "unlabeled": self.ub_source.state_dict() if self.ub_source else None,
                        "mix": self.mix_source.state_dict() if self.mix_source else None},
            "rng": {"torch": dist.gather_objects(self.dist, torch.get_rng_state()),   # one per rank
                    "cuda": dist.gather_objects(self.dist, torch.cuda.get_rng_state() if torch.cuda.is_available() else None)},
            "method_state": self.method.extra_state(),
            "history": [list(h) for h in self.history],
            "stage_best": self.stage_best,
            **self.model_info,
        }

    def load_modules(self, modules: dict) -> None:
        """Every module's weights (and buffers) from a checkpoint's `modules` entry."""
        for n, m in self.ctx.modules.items():
            m.load_state_dict(modules[n])

    def load_state_dict(self, s: dict) -> None:
        self.load_modules(s["modules"])
        self.opt.load_state_dict(s["optimizer"])
        if s.get("scaler"):
            self.scaler.load_state_dict(s["scaler"])
        self.lb_source.load_state_dict(s["streams"]["labeled"])
        if self.ub_source is not None:
            self.ub_source.load_state_dict(s["streams"]["unlabeled"])
        if self.mix_source is not None:
            if s["streams"].get("mix") is None:
                raise UserError("resume", f"the checkpoint has no mix stream, which {type(self.method).__name__} "
                                "draws since ssmis draws its CutMix partners from an independent batch",
                                "Start the run again (it was made by an older ssmis).")
            self.mix_source.load_state_dict(s["streams"]["mix"])
        states = s["rng"]["torch"]
        if len(states) == self.dist.world:
            torch.set_rng_state(states[self.dist.rank])
            if s["rng"]["cuda"][self.dist.rank] is not None and torch.cuda.is_available():
                torch.cuda.set_rng_state(s["rng"]["cuda"][self.dist.rank])
        else:                                     # another number of processes: continue, not bitwise
            torch.manual_seed(self.cfg.seed + 1000003 * self.dist.rank + s["step"])
            self.log_fn(f"resumed with {self.dist.world} processes from a {len(states)}-process checkpoint: "
                        "training continues exactly from the weights, but random draws differ from a straight run")
        self.method.load_extra_state(s["method_state"])
        self.step, self.best, self.best_step = s["step"], s["best"], s["best_step"]
        self.nonfinite = int(s.get("nonfinite", 0))
        self.history = [tuple(h) for h in s.get("history", [])]
        self.stage_best = s.get("stage_best")

    def _save(self, name: str) -> None:
        if self.run_dir is not None:
            dist.average_buffers(self.dist, self.ctx.modules.values())
            state = self.state_dict()             # a collective under DDP: every rank builds it
            if self.dist.is_main:
                save_checkpoint(self.run_dir / "checkpoints" / f"{name}.pt", state)

    # ---- validation ----------------------------------------------------------------------------
    def validate(self) -> float:
        dist.average_buffers(self.dist, self.ctx.modules.values())
        model = self.method.eval_model()
        dices = {}
        mine = list(enumerate(self.val_cases))[self.dist.rank::self.dist.world]   # each rank scores its share
        for i, vc in mine:
            pred = predict_case(model, vc.image, self.cfg, self.device, self.precision, at_patch=self.val_at_patch)
            dices[i] = dice_per_class(pred, vc.label, self.ctx.num_classes)
        for part in dist.gather_objects(self.dist, dices):
            dices.update(part)
        per_case = np.array([dices[i] for i in sorted(dices)])
        return float(np.nanmean(np.nanmean(per_case, axis=0))) if len(per_case) else float("nan")

    # ---- loop ----------------------------------------------------------------------------------
    def stage_bounds(self) -> dict[str, int]:
        """First step of each stage."""
        fr = self.method.stage_fractions()
        if len(fr) != len(self.method.stages) or abs(sum(fr) - 1) > 1e-6:
            raise ValueError(f"{type(self.method).__name__}: stage fractions {fr} do not match stages {self.method.stages}")
        starts, acc = {}, 0.0
        for name, f in zip(self.method.stages, fr):
            starts[name] = int(round(acc * self.total))
            acc += f
        return starts

    def _stage_at(self, bounds: dict[str, int], step: int) -> str:
        return [name for name, start in bounds.items() if start <= step][-1]

    def _enter_stage(self, bounds: dict[str, int], resumed: bool) -> str:
        stage = self._stage_at(bounds, self.step)
        if not resumed and self.step > 0:
            self._hand_over(self._stage_at(bounds, self.step - 1))
        if not resumed and self.method.fresh_optimizer_per_stage and self.step > 0:
            self.opt.state.clear()                 # momentum buffers start afresh, as a new optimiser would
        self.method.on_stage_start(stage, resumed)
        if len(bounds) > 1:
            self.log_fn(f"stage {stage!r} from step {self.step}")
        return stage

    # ---- stage hand-over: the next stage starts from the best-validated state of the previous one ----------
    def _keep_if_best(self, stage: str, dice: float) -> None:
        best = self.stage_best
        if best is None or best["stage"] != stage or dice > best["dice"]:
            self.stage_best = {"stage": stage, "step": self.step, "dice": dice,
                               "modules": {n: _cpu_copy(m.state_dict()) for n, m in self.ctx.modules.items()},
                               "optimizer": _cpu_copy(self.opt.state_dict())}

    def _hand_over(self, previous: str) -> None:
        if previous not in self.method.handover_stages():
            return
        best = self.stage_best
        if best is None or best["stage"] != previous:
            self.log_fn(f"stage {previous!r} was not validated: the next stage starts from its last weights")
            return
        self.load_modules(best["modules"])
        self.opt.load_state_dict(best["optimizer"])
        self.log_fn(f"the next stage starts from the best {previous!r} state (step {best['step']}, val Dice "
                    f"{best['dice']:.4f}); the best checkpoint is chosen among the new stage's validations")
        self.best, self.best_step, self.stage_best = -math.inf, -1, None

    def _copy_optimizer_state(self, src: str, dst: str) -> None:
        """`dst`'s parameters get a copy of the optimiser state (momentum) of `src`'s, parameter by parameter."""
        pairs = list(zip(self.ctx.modules[src].parameters(), self.ctx.modules[dst].parameters(), strict=True))
        for ps, pd in pairs:
            if ps in self.opt.state:
                self.opt.state[pd] = {k: v.clone() if torch.is_tensor(v) else v for k, v in self.opt.state[ps].items()}
            else:
                self.opt.state.pop(pd, None)

    def _snapshot_buffers(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [(b, b.detach().clone()) for m in self.ctx.modules.values() for b in m.buffers()]

    @staticmethod
    def _restore_buffers(snapshot: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        with torch.no_grad():
            for b, saved in snapshot:
                b.copy_(saved)

    def _set_lr(self, step: int) -> float:
        s = self.cfg.sched
        lr = self.cfg.optim.lr * lr_factor(s.name, step, self.total, s.power, s.step_fraction, s.gamma)
        for g in self.opt.param_groups:
            g["lr"] = lr * self.method.lr_scale(g["module"], step) if "module" in g else lr
        return lr

    def _optimizer_step(self, loss: torch.Tensor) -> None:
        self.scaler.scale(loss).backward()
        clip = self.cfg.train.clip_grad_norm
        if clip:
            self.scaler.unscale_(self.opt)
            torch.nn.utils.clip_grad_norm_([p for g in self.opt.param_groups for p in g["params"]], clip)
        self.scaler.step(self.opt)
        self.scaler.update()
        self.opt.zero_grad(set_to_none=True)

    def fit(self, metrics: MetricsLog | None = None, progress: bool = True, stop_after: int | None = None) -> dict:
        t = self.cfg.train
        bounds = self.stage_bounds()
        # resumed exactly at a stage's first step, the stage has not started yet
        stage = self._enter_stage(bounds, resumed=self.step > bounds[self._stage_at(bounds, self.step)])
        if not self.dist.is_main:
            progress, metrics = False, None
        bar = tqdm(total=self.total, initial=self.step, desc="train", disable=not progress, dynamic_ncols=True,
                   mininterval=1.0)
        start_time = time.perf_counter()
        step_seconds: list[float] = []     # data + forward + backward + optimiser + teacher update, per step
        last_logs: dict = {}
        while self.step < self.total:
            step = self.step
            step_start = time.perf_counter()
            if step in bounds.values() and step > 0 and stage != self._stage_at(bounds, step):
                stage = self._enter_stage(bounds, resumed=False)
            lr = self._set_lr(step)
            lb, ub = self._batches()
            buffers = self._snapshot_buffers()
            with self.precision.autocast(self.device):
                out = self.method.train_step(lb, ub, step)
            if dist.any_true(self.dist, not bool(torch.isfinite(out.loss.detach()))):   # all ranks agree
                self.nonfinite += 1
                self.opt.zero_grad(set_to_none=True)
                self.ctx.plugins.discard_stats()       # a skipped step updates no plug-in state
                self._restore_buffers(buffers)       # the skipped forward must not leave NaN in BN statistics
                if metrics:
                    metrics.write(step, stage, "train", {"nonfinite_loss": 1})
                if self.nonfinite >= t.max_nonfinite:
                    bar.close()
                    raise TrainingDiverged(
                        f"loss was not finite for {self.nonfinite} steps in a row (last at step {step}; last finite "
                        f"logs: {_fmt(last_logs)}). The last good checkpoint is kept. Try a lower optim.lr, "
                        f"train.amp=off, or train.clip_grad_norm=1.0.")
            else:
                self.nonfinite = 0
                self._optimizer_step(out.loss)
                if len(self.ctx.plugins):
                    self.ctx.plugins.step_end(sum_over_processes(self.ctx.plugins.pending_stats()))
                self.method.after_step(step)
                last_logs = {"loss": out.loss.detach(), **out.logs}
            self.step = step + 1
            step_seconds.append(time.perf_counter() - step_start)
            healthy = self.nonfinite == 0         # no logging, validation or checkpoint inside a non-finite streak
            if metrics and healthy and (self.step % t.log_every == 0 or self.step == self.total) and last_logs:
                metrics.write(self.step, stage, "train", {**last_logs, "lr": lr})
            bar.update(1)
            if last_logs and progress and self.step % t.log_every == 0:
                bar.set_postfix(loss=f"{float(last_logs['loss']):.4f}", lr=f"{lr:.2e}", refresh=False)
            stage_ends = self.step in bounds.values() and stage in self.method.handover_stages()
            if healthy and self.val_cases and ((t.eval_every and self.step % t.eval_every == 0)
                                               or self.step == self.total or stage_ends):
                dice = self.validate()
                if stage in self.method.handover_stages():
                    self._keep_if_best(stage, dice)
                self.history.append((self.step, dice))
                if metrics:
                    metrics.write(self.step, stage, "val", {"dice": dice})
                if dice > self.best and stage in self.method.selection_stages():
                    self.best, self.best_step = dice, self.step
                    self._save("best")
                if self.dist.is_main:
                    bar.write(f"step {self.step}: val Dice {dice:.4f} (best {self.best:.4f} at {self.best_step})")
            if healthy and (self.step % t.ckpt_every == 0 or self.step == self.total):
                self._save("last")
            if stop_after is not None and self.step >= stop_after:
                break
        bar.close()
        for src in (self.lb_source, self.ub_source, self.mix_source):
            if src is not None:
                src.close()
        dist.average_buffers(self.dist, self.ctx.modules.values())
        if not self.val_cases:                   # nothing to select on: "best" is the last step, and says so
            self._save("best")
            self.best_step = self.step
            self.log_fn(f"no validation cases: checkpoints/best.pt is the last step ({self.step}), as last.pt")
        return {"step": self.step, "best_val_dice": self.best if math.isfinite(self.best) else None,
                "best_step": self.best_step, "selection": selection_rule(bool(self.val_cases)),
                "seconds": time.perf_counter() - start_time,
                "median_step_seconds": float(np.median(step_seconds)) if step_seconds else None}


def _cpu_copy(obj):
    """A deep copy of a (nested) state dict with every tensor cloned to the CPU."""
    if torch.is_tensor(obj):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _cpu_copy(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_cpu_copy(v) for v in obj)
    return obj


def validates_at_patch(cfg) -> bool:
    """2D validation at the patch size (train.val_at=patch); 3D always validates at the case's own size."""
    return cfg.train.val_at == "patch" and len(cfg.data.patch_size) == 2


def _fmt(logs: dict) -> str:
    return ", ".join(f"{k}={float(v):.4g}" for k, v in logs.items()) or "none"
