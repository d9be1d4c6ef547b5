"""Plug-ins: one transformation in one typed slot of a host method, with its own state (design.md, 3.4).

A host method passes a value through a slot with `self.slot(name, value, **inputs)`; the slot folds the configured
plug-ins over it in config order (none configured = the value unchanged, at no cost). The slots:

| slot | value in -> out |
|---|---|
| `targets` | probabilities B×K×S -> probabilities (sharpening, ellipse refinement) |
| `mask` | per-pixel weights B×S -> weights (thresholds, uncertainty) |
| `unsup_loss` | per-pixel unlabelled loss B×S -> per-pixel loss (heterogeneous weighting) |
| `labeled_loss` | per-pixel extra labelled loss B×S (zeros from the host) -> per-pixel loss (MetaSSL's labelled form) |
| `inputs` | image B×C×S -> image (noise, intensity perturbation; no geometry) |
| `features` | encoder maps (list) -> maps (feature dropout / noise) |

The `mask` and `unsup_loss` slots see the targets after the `targets` slot as `teacher_probs`, so a refinement
feeds the thresholds. Reductions: a host reduces what `unsup_loss` and `labeled_loss` return as Σ pixel_weights·value
(`pixel_weights` when it passes them, else the plain mean over every pixel), after multiplying by the `mask`
weights; the `labeled_loss` term is added with the host's unlabelled weight (e.g. MT's λ(t)). A host declares, per slot, which `SlotInputs` keys it passes (`Method.provides`); a plug-in declares the keys it
`needs`. Both are checked when the run is built, so a mismatch is a user error before any training. Plug-in state
lives in buffers (checkpointed and resumed with the run). Statistics that update state (e.g. class-wise
confidence means) are recorded during the step with `self.record(...)`, summed over processes under DDP, and
applied in `on_step_end`, so the state changes once per optimiser step and identically on every rank."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, ValidationError
from torch import Tensor, nn

from ssmis.errors import UserError
from ssmis.registry import PLUGINS

Slot = Literal["targets", "mask", "unsup_loss", "labeled_loss", "inputs", "features"]
SLOTS: tuple[str, ...] = ("targets", "mask", "unsup_loss", "labeled_loss", "inputs", "features")


@dataclass
class SlotInputs:
    """What a host may pass to a slot besides the value (None = not passed)."""
    teacher_probs: Tensor | None = None     # B×K×S, the source of the targets (teacher, other network, weak view)
    student_logits: Tensor | None = None    # B×K×S, the prediction being supervised
    student_probs: Tensor | None = None     # B×K×S
    image: Tensor | None = None             # B×C×S, the unlabelled images of this step
    labels: Tensor | None = None            # B×S, ground truth (labelled part only)
    spacing: Tensor | None = None           # B×dims in mm
    step: int | None = None
    network: int | None = None              # which of the host's networks made teacher_probs (unsup_loss) or
    #                                         student_logits (labeled_loss): 0 = student / net 1, 1 = teacher / net 2
    pixel_weights: Tensor | None = None     # B×S: the host reduces this slot's per-pixel loss as Σ pixel_weights·value
    #                                         (None = the plain mean over every pixel, 1/N each)
    pseudo_labels: Tensor | None = None     # B×S, the hard targets the host uses (None = argmax teacher_probs)

    def keys(self) -> frozenset[str]:
        return frozenset(f.name for f in fields(self) if getattr(self, f.name) is not None)


INPUT_KEYS = frozenset(f.name for f in fields(SlotInputs))


class PluginConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str


class Plugin(nn.Module):
    """Subclasses set `Config`, `slot` and `needs`, implement `forward(value, inp)` (same type out as in) and
    register with `@PLUGINS.register(name)`. Keep state in buffers; change it only in `on_step_end`.

    A plug-in acting in several slots (MetaSSL: unlabelled and labelled loss) overrides `declared_slots` (slot ->
    needed inputs), `slot_needs` (what this configuration uses) and `run(slot, value, inp)`."""

    Config: ClassVar[type[PluginConfig]]
    slot: ClassVar[Slot]
    needs: ClassVar[frozenset[str]] = frozenset()

    @classmethod
    def declared_slots(cls) -> dict[str, frozenset[str]]:
        """Every slot the plug-in can act in, with the SlotInputs keys it needs there."""
        return {cls.slot: cls.needs}

    def slot_needs(self) -> dict[str, frozenset[str]]:
        """The slots this configured plug-in acts in (default: all declared)."""
        return type(self).declared_slots()

    def run(self, slot: str, value, inp: SlotInputs):
        """Apply the plug-in in `slot` (single-slot plug-ins: `forward`)."""
        return self(value, inp)

    def __init__(self, cfg: PluginConfig, num_classes: int, spatial_dims: int):
        super().__init__()
        self.cfg, self.num_classes, self.spatial_dims = cfg, num_classes, spatial_dims
        self.total_steps: int | None = None       # the run's length, for plug-ins with schedules (set by the engine)
        self._pending: dict[str, Tensor] = {}

    def forward(self, value, inp: SlotInputs):
        raise NotImplementedError

    def record(self, name: str, value: Tensor) -> None:
        """Add a statistic of this step (summed over calls, then over processes) for `on_step_end`. Record the
        same names and shapes on every call (zeros where there is nothing to count): under DDP every process
        takes part in the same sum."""
        v = value.detach().float()
        self._pending[name] = self._pending[name] + v if name in self._pending else v

    def on_step_end(self, stats: dict[str, Tensor]) -> None:
        """Update state from this step's statistics (summed over calls and processes)."""


class PluginSet(nn.Module):
    """The configured plug-ins, grouped by slot in config order."""

    def __init__(self, plugins: list[Plugin]):
        super().__init__()
        self.items = nn.ModuleList(plugins)
        self.by_slot: dict[str, list[Plugin]] = {s: [p for p in plugins if s in p.slot_needs()] for s in SLOTS}

    def __len__(self) -> int:
        return len(self.items)

    def active(self, slot: str) -> bool:
        return bool(self.by_slot[slot])

    def apply(self, slot: str, value, inp: SlotInputs):
        for p in self.by_slot[slot]:
            value = p.run(slot, value, inp)
        return value

    def check_host(self, method: str, provides: dict[str, frozenset[str]]) -> None:
        """Every plug-in's slot is offered by the host, with every input it needs."""
        for i, p in enumerate(self.items):
            where = f"plugins.{i} ({p.cfg.name})"
            for slot, needs in p.slot_needs().items():
                if slot not in provides:
                    offered = ", ".join(sorted(provides)) or "none"
                    raise UserError(where, f"method {method!r} has no {slot!r} slot (its slots: {offered})",
                                    "Remove the plug-in, or use a method that offers that slot (`ssmis list plugins`).")
                missing = sorted(needs - provides[slot])
                if missing:
                    raise UserError(where, f"needs {', '.join(missing)} in slot {slot!r}, which method {method!r} "
                                    f"does not pass there (it passes: {', '.join(sorted(provides[slot])) or 'nothing'})",
                                    "Use another host method or another plug-in.")

    def pending_stats(self) -> dict[str, Tensor]:
        """This step's statistics as one flat dict (keys `<index>.<name>`), then cleared."""
        out = {f"{i}.{k}": v for i, p in enumerate(self.items) for k, v in p._pending.items()}
        self.discard_stats()
        return out

    def discard_stats(self) -> None:
        for p in self.items:
            p._pending = {}

    def step_end(self, stats: dict[str, Tensor]) -> None:
        for i, p in enumerate(self.items):
            prefix = f"{i}."
            mine = {k[len(prefix):]: v for k, v in stats.items() if k.startswith(prefix)}
            if mine:
                p.on_step_end(mine)

    def has_parameters(self) -> bool:
        return any(True for _ in self.parameters())


def plugin_configs(sections: list[Any], source: str = "config") -> list[PluginConfig]:
    """Validate each `plugins[i]` section against the named plug-in's own Config."""
    from ssmis.config.load import validation_to_user_error

    out = []
    for i, sec in enumerate(sections):
        if not isinstance(sec, dict) or "name" not in sec:
            raise UserError(f"{source}: plugins.{i}.name", "missing", f"Choose one of: {', '.join(PLUGINS.list())}.")
        cls = PLUGINS.get(sec["name"], f"{source}: plugins.{i}.name")
        try:
            out.append(cls.Config.model_validate(sec))
        except ValidationError as err:
            raise validation_to_user_error(err, cls.Config, source, prefix=f"plugins.{i}.") from None
    return out


def build_plugins(sections: list[dict], num_classes: int, spatial_dims: int,
                  total_steps: int | None = None) -> PluginSet:
    plugins = []
    for cfg in plugin_configs(sections):
        cls = PLUGINS.get(cfg.name)
        unknown = frozenset().union(*cls.declared_slots().values()) - INPUT_KEYS
        if unknown:
            raise TypeError(f"plug-in {cfg.name!r} needs unknown slot inputs {sorted(unknown)}")
        plugins.append(cls(cfg, num_classes, spatial_dims))
        plugins[-1].total_steps = total_steps
    return PluginSet(plugins)


def no_plugins() -> PluginSet:
    return PluginSet([])


def reduce_pixels(value: Tensor, pixel_weights: Tensor | None) -> Tensor:
    """A host's reduction of an `unsup_loss` / `labeled_loss` value: Σ pixel_weights·value, or the plain mean."""
    return value.mean() if pixel_weights is None else (pixel_weights * value).sum()


def sum_over_processes(stats: dict[str, Tensor]) -> dict[str, Tensor]:
    """All-reduce (sum) every statistic under DDP; a no-op in one process."""
    import torch.distributed as tdist

    if not stats or not (tdist.is_available() and tdist.is_initialized()) or tdist.get_world_size() == 1:
        return stats
    keys = sorted(stats)
    flat = torch.cat([stats[k].reshape(-1) for k in keys])
    tdist.all_reduce(flat)
    out, i = {}, 0
    for k in keys:
        n = stats[k].numel()
        out[k] = flat[i:i + n].view_as(stats[k])
        i += n
    return out
