"""Slice-wise prediction of a 2D model on 2D images or 3D volumes: resize each slice to the patch,
predict, argmax, resize back with nearest neighbour, stack (the SSL4MIS/ACDC protocol). HC18-lite instead pads
each image to a square first and resizes the logits bilinearly back to the square, then crops and takes argmax."""

from __future__ import annotations

import contextlib

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ssmis.data.resize import crop_box, pad_to_square, resize2d


@contextlib.contextmanager
def eval_mode(*modules: nn.Module):
    """Switch modules to eval mode and restore every submodule's own flag afterwards."""
    flags = [(m, m.training) for mod in modules for m in mod.modules()]
    for mod in modules:
        mod.eval()
    try:
        yield
    finally:
        for m, f in flags:
            m.training = f


@torch.no_grad()
def predict_slicewise(model: nn.Module, image: np.ndarray, patch: tuple[int, int], *, image_order: int = 0,
                      slice_axis: int = 0, batch_size: int = 16, device: torch.device = torch.device("cpu"),
                      channels_last: bool = False, autocast=contextlib.nullcontext, pad_square: bool = False,
                      upsample: str = "labels", at_patch: bool = False) -> np.ndarray:
    """`image` C×H×W or C×D×H×W -> int label map H×W or D×H×W at the input's size.

    pad_square: zero-pad each slice to a square before resizing (and crop the prediction back);
    upsample: 'labels' (argmax at the patch, nearest-neighbour resize) or 'logits' (bilinear, then argmax);
    at_patch: return the argmax at the patch size instead (`label_at_patch` takes a reference there)."""
    volume = image.ndim == 4
    vol = np.moveaxis(image, 1 + slice_axis, 1) if volume else image[:, None]
    c, d, h, w = vol.shape
    box = (0, 0, h, w)
    if pad_square:
        vol, box = pad_to_square(vol)
    full = vol.shape[-2:]
    batch = np.stack([resize2d(vol[:, k], patch, image_order) for k in range(d)]).astype(np.float32)
    labels = np.empty((d, *patch) if at_patch else (d, h, w), np.int64)
    with eval_mode(model):
        for s in range(0, d, batch_size):
            x = torch.from_numpy(batch[s:s + batch_size]).to(device)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with autocast():
                logits = model(x).logits
            if at_patch:
                pred = logits.float().argmax(1).cpu().numpy()
            elif upsample == "logits":
                pred = F.interpolate(logits.float(), size=full, mode="bilinear", align_corners=False).argmax(1)
                pred = crop_box(pred.cpu().numpy(), box)
            else:
                pred = [crop_box(resize2d(p, full, 0), box) for p in logits.float().argmax(1).cpu().numpy()]
            for i, p in enumerate(pred):
                labels[s + i] = p
    return np.moveaxis(labels, 0, slice_axis) if volume else labels[0]


def label_at_patch(label: np.ndarray, patch: tuple[int, int], slice_axis: int = 0, pad_square: bool = False) -> np.ndarray:
    """A reference label map H×W or D×H×W taken to the patch size as the training masks are (optionally padded to a
    square, nearest-neighbour resize), slice-wise along `slice_axis`: what `at_patch` predictions are scored on."""
    vol = np.moveaxis(label, slice_axis, 0) if label.ndim == 3 else label[None]
    if pad_square:
        vol, _ = pad_to_square(vol)
    out = resize2d(vol, patch, 0)
    return np.moveaxis(out, 0, slice_axis) if label.ndim == 3 else out[0]


def dice_per_class(pred: np.ndarray, ref: np.ndarray, num_classes: int) -> np.ndarray:
    """Dice of each foreground class (NaN where both masks are empty); cheap, for validation."""
    out = np.full(num_classes - 1, np.nan)
    for c in range(1, num_classes):
        p, r = pred == c, ref == c
        s = p.sum() + r.sum()
        if s:
            out[c - 1] = 2.0 * np.logical_and(p, r).sum() / s
    return out


def predict_case(model: nn.Module, image: np.ndarray, cfg, device: torch.device, precision,
                 at_patch: bool = False) -> np.ndarray:
    """Label map of one case at its own size: slice-wise for a 2D patch, sliding window for a 3D patch.
    `cfg` is the RunConfig, `precision` an engine.amp.Precision; at_patch (2D): at the patch size instead."""
    patch = tuple(cfg.data.patch_size)
    autocast = lambda: precision.autocast(device)  # noqa: E731
    if len(patch) == 3:
        from ssmis.eval.sliding_window import predict_volume

        stride = cfg.eval.stride
        window = ({"stride": tuple(stride) * (3 if len(stride) == 1 else 1)} if stride
                  else {"overlap": cfg.eval.overlap})
        return predict_volume(model, image, patch, **window, mode=cfg.eval.blend, batch_size=cfg.eval.batch_size,
                              device=device, autocast=autocast)
    return predict_slicewise(model, image, patch, image_order=cfg.data.image_order, slice_axis=cfg.data.slice_axis,
                             batch_size=cfg.eval.batch_size, device=device, channels_last=precision.channels_last,
                             autocast=autocast, pad_square=cfg.data.pad_square, upsample=cfg.eval.upsample,
                             at_patch=at_patch)
