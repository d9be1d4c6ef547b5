"""The Method contract: a method owns its networks' forward passes and losses; the engine owns the rest."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import torch
from pydantic import BaseModel, ConfigDict
from torch import Tensor, nn

from ssmis.plugins.base import PluginSet, SlotInputs, no_plugins, reduce_pixels

# what a host passes to the `labeled_loss` slot (the labelled images' logits, a reference prediction, the labels)
LABELED_INPUTS = frozenset({"teacher_probs", "student_logits", "student_probs", "labels", "step", "network"})


class MethodConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str


@dataclass
class Batch:
    image: Tensor                          # B×C×spatial, augmented
    label: Tensor | None = None            # B×spatial (labelled stream only)
    index: Tensor | None = None            # dataset indices
    slice_index: Tensor | None = None      # position within the volume (meta-label), -1 if none
    num_slices: Tensor | None = None
    mix: "Batch | None" = None             # unlabelled stream of a method with mix_batch: an independent batch


@dataclass
class StepOutput:
    loss: Tensor | None
    logs: dict[str, float | Tensor] = field(default_factory=dict)
    stats: dict[str, Tensor] = field(default_factory=dict)


class BuildContext:
    """What a method gets to build itself: model factory, device, run length, and `add` to register modules."""

    def __init__(self, make_model: Callable[[], nn.Module], device: torch.device, total_steps: int,
                 num_classes: int, spatial_dims: int, wrap: Callable[[nn.Module], nn.Module] = lambda m: m,
                 plugins: PluginSet | None = None, labeled_count: int | None = None, labeled_bs: int | None = None):
        self._make_model, self.device, self.total_steps = make_model, device, total_steps
        # the labelled training set's size (slices or volumes) and the labelled batch size, where the run knows them
        self.labeled_count, self.labeled_bs = labeled_count, labeled_bs
        self.num_classes, self.spatial_dims, self._wrap = num_classes, spatial_dims, wrap
        self.plugins = plugins if plugins is not None else no_plugins()
        self.modules: dict[str, nn.Module] = {}
        self.trainable: list[str] = []
        # set by the trainer: give module `dst`'s parameters the optimiser state of `src`'s (same architecture)
        self.copy_optimizer_state: Callable[[str, str], None] = lambda src, dst: None

    def build_model(self, name: str | None = None, **args) -> nn.Module:
        """A fresh network: the run's model, or the registered model `name` (a second architecture, e.g.
        method.net2) with the run's input channels and classes; `args` go to its constructor and override those
        (num_classes=1: a one-logit head)."""
        return self._make_model() if name is None and not args else self._make_model(name, **args)

    def add(self, name: str, module: nn.Module, trainable: bool) -> nn.Module:
        """Register a module (checkpointed; optimised if trainable) and return what to call. The module must already
        be on ctx.device (the model factory puts its networks there; heads a method makes itself, it moves)."""
        if name in self.modules:
            raise ValueError(f"module {name!r} added twice")
        self.modules[name] = module
        if trainable:
            self.trainable.append(name)
            return self._wrap(module)
        return module


class Method:
    """Subclasses set `Config`, implement `build` and `train_step`, and register with `@METHODS.register`."""

    Config: ClassVar[type[MethodConfig]]
    uses_unlabeled: ClassVar[bool] = True
    stages: ClassVar[tuple[str, ...]] = ("train",)
    fresh_optimizer_per_stage: ClassVar[bool] = False   # clear optimiser state when a new stage starts
    default_augment: ClassVar[str] = "ssl4mis"        # what train.augment=auto means for this method
    find_unused_parameters: ClassVar[bool] = False      # DDP: set when some parameters get no gradient in a step
    spatial_dims: ClassVar[frozenset[int]] = frozenset({2, 3})
    mix_batch: ClassVar[bool] = False      # also draw an independent unlabelled batch each step (ub.mix)
    per_module_lr: ClassVar[bool] = False  # one optimiser parameter group per trainable module, scaled by lr_scale
    # plug-in slots this method offers, each with the SlotInputs keys it passes there (ssmis.plugins)
    provides: ClassVar[dict[str, frozenset[str]]] = {}

    def __init__(self, cfg: MethodConfig, ctx: BuildContext):
        self.cfg, self.ctx = cfg, ctx
        self.build(ctx)

    @classmethod
    def preflight(cls, cfg: MethodConfig) -> None:
        """Checks that need no data (an optional package, a registry name), run before the data are read so that
        such a mistake fails at once; raise UserError. Default: none."""

    def slots(self) -> dict[str, frozenset[str]]:
        """The slots this configured instance offers (default: the class's `provides`)."""
        return dict(type(self).provides)

    def slot(self, name: str, value, **inputs):
        """Pass `value` through the plug-ins configured in slot `name` (unchanged when there are none)."""
        if not self.slot_active(name):
            return value
        return self.ctx.plugins.apply(name, value, SlotInputs(**inputs))

    def slot_active(self, name: str) -> bool:
        return self.ctx.plugins.active(name)

    def labeled_term(self, logits: Tensor, reference_probs: Tensor | None, labels: Tensor, step: int,
                     network: int = 0, pixel_weights: Tensor | None = None) -> Tensor:
        """The extra labelled loss of the `labeled_loss` slot (0 without plug-ins there): its plug-ins turn zeros
        into a per-pixel loss on the labelled images, reduced as Σ pixel_weights·value (default: the mean).
        `reference_probs` is the reference prediction on the same images (teacher, other network)."""
        if not self.slot_active("labeled_loss"):
            return torch.zeros((), device=logits.device)
        value = self.slot("labeled_loss", torch.zeros(labels.shape, device=logits.device),
                          teacher_probs=reference_probs, student_logits=logits,
                          student_probs=logits.detach().float().softmax(1), labels=labels, step=step,
                          network=network, pixel_weights=pixel_weights)
        return reduce_pixels(value, pixel_weights)

    def build(self, ctx: BuildContext) -> None:
        raise NotImplementedError

    def train_step(self, lb: Batch, ub: Batch | None, step: int) -> StepOutput:
        raise NotImplementedError

    def stage_fractions(self) -> tuple[float, ...]:
        """Share of the run's steps per stage (same length as `stages`); budget-scaled, so the split holds at any T."""
        return (1.0,)

    def handover_stages(self) -> frozenset[str]:
        """Stages that hand their best-validated state to the next stage (BCP's pre-training). For these the
        engine also validates at the stage's last step, keeps the best state (every module and the optimiser) in
        the checkpoint, restores it when the next stage starts (before `on_stage_start`), and restarts the
        best-checkpoint selection there, as the reference code selects among self-training steps only."""
        return frozenset()

    def selection_stages(self) -> frozenset[str]:
        """Stages whose validations compete for the best checkpoint (default: every stage). Validations in the other
        stages still run and are logged, but never become best.pt (M&N selects in its co-training stage only, as its
        reference code validates there only)."""
        return frozenset(self.stages)

    def lr_scale(self, module: str, step: int) -> float:
        """With `per_module_lr`: the factor on optim.lr × the engine's schedule for the trainable module `module` at
        `step` (a model's own lr and schedule, e.g. M&N's two models with their own epoch counters)."""
        return 1.0

    def on_stage_start(self, stage: str, resumed: bool) -> None:
        """Called when a stage begins, and again (resumed=True) when a run is resumed inside it: state that a
        stage start creates (e.g. a teacher copied from the pre-trained student) comes from the checkpoint then."""

    def after_step(self, step: int) -> None:
        """Called after each optimiser step (teacher updates)."""

    def eval_model(self) -> nn.Module:
        """The network that is validated, tested and exported."""
        raise NotImplementedError

    def ensemble_modules(self) -> list[str] | None:
        """Names of the modules (ctx.modules) whose softmax average `ssmis eval/predict --ensemble` use; None = the
        method has no ensemble (one network)."""
        return None

    def extra_state(self) -> dict[str, Any]:
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        pass


def require_feature_perturbation(model: nn.Module, needed_by: str, where: str = "model.name") -> None:
    """A user error unless the model's forward takes `perturb_features` (encoder -> perturbation -> decoder)."""
    import inspect

    from ssmis.errors import UserError

    if "perturb_features" not in inspect.signature(model.forward).parameters:
        raise UserError(where, f"{type(model).__name__} exposes no encoder features (perturb_features)",
                        f"{needed_by} needs such a model, e.g. unet2d.")


def teacher_noise(x: Tensor) -> Tensor:
    """x + clip(N(0, 0.1²), -0.2, 0.2): the teacher input of Mean Teacher and UA-MT."""
    return x + torch.clamp(torch.randn_like(x) * 0.1, -0.2, 0.2)
