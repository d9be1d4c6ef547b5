"""The encoder of a segmentation network, SPCL's projection head, and `init.encoder` (loading a pre-trained encoder
into every network of a run that has the pre-training's architecture).

*Encoder* = the parameters and buffers of the modules that `net.encode(x)` runs (found once with forward hooks on
a dummy input, so UNet-2D, the ResNet34-encoder U-Net and VNet need no per-model list); its deepest map is SPCL's
"Conv5" feature (the bottleneck) [CODE jizongFox/Self-paced-Contrastive-Learning semi_seg/main_infonce.py:92-97:
pre-training updates the encoder only].

*Projection head* (methods.md "SPCL", Components): global average pool → Linear(c, d) → LeakyReLU(0.01) →
Linear(d, d) → L2 normalisation, one per meta-label. Not `ssmis.models.projector.Projector`: that is C3S3's
per-voxel head (Conv1 → PReLU → Conv1 on every voxel, no pooling, no normalisation); SPCL's head pools the map to
one vector per image, uses a fixed LeakyReLU slope and normalises, so reusing it would change the method.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ssmis.engine.checkpoint import load_checkpoint
from ssmis.errors import UserError

PRETRAIN_KIND = "ssmis-pretrain"


class ProjectionHead(nn.Module):
    """Global average pool (2D or 3D maps) → Linear(c, d) → LeakyReLU(0.01) → Linear(d, d) → L2 norm (float32)."""

    def __init__(self, in_channels: int, dim: int = 256):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(in_channels, dim), nn.LeakyReLU(0.01), nn.Linear(dim, dim)

    def forward(self, feat: Tensor) -> Tensor:
        h = feat.flatten(2).mean(2)
        return F.normalize(self.fc2(self.act(self.fc1(h))).float(), dim=1)


def encoder_keys(net: nn.Module, example: Tensor) -> list[str]:
    """The state-dict keys of the modules `net.encode(example)` runs (eval mode, no gradient: nothing changes)."""
    if not hasattr(net, "encode"):
        raise UserError("model.name", f"{type(net).__name__} has no encode(): its encoder cannot be pre-trained or "
                        "loaded", "Use a network with an encoder/decoder split (unet2d, resnet34_unet, vnet).")
    ran: set[str] = set()
    names = {m: n for n, m in net.named_modules()}
    hooks = [m.register_forward_hook(lambda mod, i, o: ran.add(names[mod])) for m in net.modules()]
    was_training = net.training
    try:
        net.eval()
        with torch.no_grad():
            net.encode(example)
    finally:
        for h in hooks:
            h.remove()
        net.train(was_training)
    owner = lambda key: key.rpartition(".")[0]          # noqa: E731  (the module a state-dict entry belongs to)
    keys = [k for k in net.state_dict() if owner(k) in ran]
    return keys


def bottleneck(net: nn.Module, x: Tensor) -> Tensor:
    """The deepest encoder map (SPCL's Conv5), without running the decoder."""
    return net.encode(x)[-1]


def _describe(name: str, args: dict | None) -> str:
    if not args:
        return name
    extra = {k: v for k, v in args.items() if k in ("in_channels", "widths")}
    return f"{name} ({', '.join(f'{k} {v}' for k, v in extra.items())})" if extra else name


def _checkpoint_path(ref: str) -> Path:
    p = Path(ref)
    if p.is_dir():
        ck = p / "checkpoints" / "last.pt"
        if not ck.is_file():
            raise UserError("init.encoder", f"{p} has no checkpoints/last.pt",
                            "Point to a finished `ssmis pretrain` run directory or to a checkpoint file.")
        return ck
    if not p.is_file():
        raise UserError("init.encoder", f"{ref} does not exist", "Give a pre-training run directory or a checkpoint file.")
    return p


def read_encoder(ref: str, target: nn.Module, example: Tensor) -> tuple[dict[str, Tensor], dict]:
    """(encoder tensors, provenance) from a pre-training run / checkpoint, or from a training checkpoint (its
    evaluated network's encoder, keys as `target`'s encoder)."""
    path = _checkpoint_path(ref)
    state = load_checkpoint(path)
    if state.get("kind") == PRETRAIN_KIND:
        enc, source = state["encoder"], "SPCL pre-training"
        extra = {"pretrain_step": state["step"], "pretrain_total": state["total"],
                 "meta_labels": list(state.get("meta_labels", []))}
    elif "eval_weights" in state:
        weights = state["eval_weights"]
        enc = {k: weights[k] for k in encoder_keys(target, example) if k in weights}
        source, extra = "training checkpoint", {"step": state.get("step")}
    else:
        raise UserError("init.encoder", f"{path} is neither an `ssmis pretrain` nor an `ssmis train` checkpoint",
                        "Point to a run directory or its checkpoints/last.pt.")
    info = {"path": str(path), "source": source, "model_name": state.get("model_name"),
            "model_args": state.get("model_args"), "tensors": len(enc), **extra}
    return enc, info


def load_encoder_init(ref: str, modules: dict[str, nn.Module], model_name: str, model_cls: type,
                      example: Tensor, log=print, resuming: bool = False) -> dict:
    """Copy the encoder of `ref` into every module of the run (EMA teachers' inner networks included) whose class
    is the run's model class; returns the provenance (recorded in checkpoints and train_summary.json). Resuming,
    the checkpoint holds the weights: nothing is copied. A mismatch of architecture or shapes is one UserError."""
    targets = [(f"{top}.{sub}" if sub else top, m) for top, mod in modules.items()
               for sub, m in mod.named_modules() if type(m) is model_cls]
    if not targets:
        raise UserError("init.encoder", f"no network of this run is a {model_name}",
                        "init.encoder loads into networks of the run's model (model.name).")
    run_args = getattr(targets[0][1], "init_args", None)
    if resuming and not Path(ref).exists():
        return {"path": str(ref), "resumed": True}
    enc, info = read_encoder(ref, targets[0][1], example)
    src = _describe(info["model_name"] or "?", info["model_args"])
    run = _describe(model_name, run_args)
    if info["model_name"] not in (None, model_name):
        raise UserError("init.encoder", f"{info['path']} holds a {src} encoder but the run's model is {run}",
                        "Pre-train with the run's model section (model.name, model.widths), or change init.encoder.")
    for where, net in targets:
        have = net.state_dict()
        for k, v in enc.items():
            if k not in have or have[k].shape != v.shape:
                got = "absent" if k not in have else f"{tuple(have[k].shape)}"
                raise UserError("init.encoder", f"the pre-trained encoder does not fit {where}: {k} is "
                                f"{tuple(v.shape)} in {src} ({info['path']}) but {got} in the run's {run}",
                                "Pre-train with the same model section (model.name, model.widths, data.channels).")
    if not enc:
        raise UserError("init.encoder", f"{info['path']} holds no encoder tensors of a {run}", "Check the checkpoint.")
    if not resuming:
        for _, net in targets:
            missing, unexpected = net.load_state_dict(enc, strict=False)
            assert not unexpected, unexpected
    info["into"] = [w for w, _ in targets]
    step = f", step {info['pretrain_step']} of {info['pretrain_total']}" if "pretrain_step" in info else ""
    log(f"init.encoder: {info['tensors']} encoder tensors of a {src} from {info['path']} ({info['source']}{step}) "
        f"{'restored from the checkpoint' if resuming else 'loaded'} into {', '.join(info['into'])}; "
        "the decoder keeps its own initialisation")
    if "pretrain_step" in info and info["pretrain_step"] < info["pretrain_total"]:
        log(f"init.encoder: warning: the pre-training stopped at step {info['pretrain_step']} of {info['pretrain_total']}")
    return info
