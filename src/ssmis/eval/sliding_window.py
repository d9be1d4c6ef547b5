"""Sliding-window inference of a 3D (or any N-D) model: softmax probabilities averaged over overlapping
windows with constant or Gaussian weights.

MONAI's `sliding_window_inference` is used when `monai` is importable (`backend="auto"`), else the built-in
implementation below, which follows MONAI's conventions exactly so the two agree (tested when MONAI is
installed):
* volumes smaller than the patch along an axis are zero-padded, `diff // 2` before and the rest after, and the
  result is cropped back (the same split as UA-MT's `test_single_case`);
* window starts along an axis of size S (after padding) with patch P and interval I are
  `min(k·I, S − P)` for k = 0 … ceil((S − P) / I), i.e. the last window is flush with the border; with an
  `overlap` o, I = max(int(P·(1 − o)), 1) (I = P when P == S), with a `stride`, I = stride;
* Gaussian weights: exp(−x² / 2σ²) per axis with x centred on the patch (x = −(P−1)/2 … (P−1)/2) and
  σ = sigma_scale·P, multiplied over the axes, then clamped below at max(min, 1e-3) so corners keep a
  positive weight (no division by zero, corner voxels are still averaged);
* probabilities = Σ w·softmax(logits) / Σ w.

The LA protocol of UA-MT/BCP (patch 112×112×80, stride_xy 18, stride_z 4, plain averaging) is
`LA_UAMT = dict(patch=(112, 112, 80), stride=(18, 18, 4), mode="constant")`, axes in the order of the LA
`mri_norm2.h5` arrays (x, y, z); permute patch and stride with the volume if an adapter reorders axes.
With a stride, MONAI is given the per-axis overlap 1 − (stride + 0.5)/patch, whose interval
int(P·(1 − o)) is exactly the stride (MONAI ≥ 1.2 takes per-axis overlaps; older versions fall back to the
built-in when the overlaps differ between axes).
"""

from __future__ import annotations

import contextlib
import itertools
import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ssmis.eval.inference import eval_mode

LA_UAMT = {"patch": (112, 112, 80), "stride": (18, 18, 4), "mode": "constant"}


def _logits(out) -> Tensor:
    return out.logits if hasattr(out, "logits") else out


def _monai_available() -> bool:
    try:
        import monai  # noqa: F401
    except ImportError:
        return False
    return True


def _monai_version() -> tuple[int, ...]:
    import monai

    parts = []
    for p in monai.__version__.split("+")[0].split(".")[:2]:
        digits = "".join(itertools.takewhile(str.isdigit, p))
        parts.append(int(digits or 0))
    return tuple(parts)


def _tuple(value, n: int, name: str) -> tuple:
    if isinstance(value, (int, float)):
        return (value,) * n
    value = tuple(value)
    if len(value) != n:
        raise ValueError(f"{name} needs {n} values (one per spatial axis), got {value}")
    return value


def scan_intervals(image_size: Sequence[int], patch: Sequence[int], overlap: Sequence[float] | None = None,
                   stride: Sequence[int] | None = None) -> tuple[int, ...]:
    """Window interval per axis (MONAI's `_get_scan_interval`, or the stride itself)."""
    if stride is not None:
        return tuple(int(s) for s in stride)
    out = []
    for s, p, o in zip(image_size, patch, overlap):
        out.append(p if p == s else max(int(p * (1 - o)), 1))
    return tuple(out)


def window_starts(size: int, patch: int, interval: int) -> list[int]:
    """Starts of the windows along one axis; the last window ends at `size` (size >= patch)."""
    if size <= patch:
        return [0]
    n = math.ceil((size - patch) / interval)
    return [min(k * interval, size - patch) for k in range(n + 1)]


def importance_map(patch: Sequence[int], mode: str = "gaussian", sigma_scale: float | Sequence[float] = 0.125,
                   device: torch.device | str = "cpu") -> Tensor:
    """Weight of each voxel of a window (MONAI's `compute_importance_map`), float32, every entry > 0."""
    if mode == "constant":
        return torch.ones(tuple(patch), dtype=torch.float32, device=device)
    if mode != "gaussian":
        raise ValueError(f"mode must be 'gaussian' or 'constant', got {mode!r}")
    scales = _tuple(sigma_scale, len(patch), "sigma_scale")
    w = None
    for i, (p, sc) in enumerate(zip(patch, scales)):
        x = torch.arange(-(p - 1) / 2.0, (p - 1) / 2.0 + 1, dtype=torch.float32, device=device)
        g = torch.exp(x ** 2 / (-2 * (sc * p) ** 2))
        w = g if i == 0 else w.unsqueeze(-1) * g[(None,) * i]
    return torch.clamp(w, min=max(w.min().item(), 1e-3))


def _pad_amounts(size: Sequence[int], patch: Sequence[int]) -> list[tuple[int, int]]:
    out = []
    for s, p in zip(size, patch):
        diff = max(p - s, 0)
        out.append((diff // 2, diff - diff // 2))
    return out


def _builtin(x: Tensor, patch: tuple[int, ...], predictor: Callable[[Tensor], Tensor], overlap, stride, mode: str,
             sigma_scale, batch_size: int) -> Tensor:
    """x: 1×C×spatial (already on the device) -> 1×K×spatial probabilities."""
    size = x.shape[2:]
    pads = _pad_amounts(size, patch)
    if any(a or b for a, b in pads):
        flat = [v for a, b in reversed(pads) for v in (a, b)]   # F.pad wants the last axis first
        x = F.pad(x, flat, mode="constant", value=0.0)
    padded = x.shape[2:]
    intervals = scan_intervals(padded, patch, overlap, stride)
    starts = [window_starts(s, p, i) for s, p, i in zip(padded, patch, intervals)]
    windows = [tuple(slice(a, a + p) for a, p in zip(corner, patch)) for corner in itertools.product(*starts)]
    w = importance_map(patch, mode, sigma_scale, x.device)
    out = count = None
    for b in range(0, len(windows), batch_size):
        group = windows[b:b + batch_size]
        probs = predictor(torch.cat([x[(slice(None), slice(None), *win)] for win in group])).float()
        if out is None:
            out = torch.zeros((1, probs.shape[1], *padded), dtype=torch.float32, device=x.device)
            count = torch.zeros((1, 1, *padded), dtype=torch.float32, device=x.device)
        for win, p in zip(group, probs):
            out[(0, slice(None), *win)] += w * p
            count[(0, 0, *win)] += w
    out /= count
    crop = tuple(slice(a, a + s) for (a, _), s in zip(pads, size))
    return out[(slice(None), slice(None), *crop)]


def _monai(x: Tensor, patch: tuple[int, ...], predictor, overlap, stride, mode: str, sigma_scale,
           batch_size: int) -> Tensor | None:
    """MONAI's inferer, or None when this MONAI cannot express the request (per-axis overlaps before 1.2)."""
    from monai.inferers import sliding_window_inference

    if stride is not None:   # interval int(P·(1 − o)) = int(s + 0.5) = s; o = 0 when s == P
        overlap = tuple(max(0.0, 1.0 - (s + 0.5) / p) for s, p in zip(stride, patch))
    if len(set(overlap)) == 1:
        overlap = overlap[0]
    elif _monai_version() < (1, 2):
        return None
    out = sliding_window_inference(x, roi_size=patch, sw_batch_size=batch_size, predictor=predictor,
                                   overlap=overlap, mode=mode, sigma_scale=sigma_scale, padding_mode="constant",
                                   cval=0.0)
    return torch.as_tensor(out).float()


def _model_device(model) -> torch.device:
    if isinstance(model, nn.Module):
        for p in itertools.chain(model.parameters(), model.buffers()):
            return p.device
    return torch.device("cpu")


@torch.no_grad()
def sliding_window_probs(model: nn.Module | Callable, volume: np.ndarray | Tensor, patch: Sequence[int], *,
                         overlap: float | Sequence[float] | None = None, stride: int | Sequence[int] | None = None,
                         mode: str = "gaussian", sigma_scale: float | Sequence[float] = 0.125, batch_size: int = 2,
                         device: torch.device | str | None = None, autocast=contextlib.nullcontext,
                         backend: str = "auto") -> np.ndarray | Tensor:
    """Softmax probabilities K×spatial of `model` on `volume` C×spatial (C×D×H×W for a 3D model).

    `model` returns a `SegOutput` or a logits tensor; it runs in eval mode (restored afterwards) without
    gradients, under `autocast()`, on `device` (default: the model's device). Give either `overlap` (a
    fraction in [0, 1), per axis or one for all; default 0.5) or `stride` (voxels, 1 ≤ stride ≤ patch).
    `backend`: "auto" (MONAI when importable), "monai" or "builtin". Returns numpy float32 for numpy input,
    else a float32 tensor on the input's device.
    """
    is_numpy = not isinstance(volume, Tensor)
    x = torch.as_tensor(np.asarray(volume, dtype=np.float32) if is_numpy else volume)
    nd = x.ndim - 1
    if nd < 1:
        raise ValueError(f"volume must be C×spatial, got shape {tuple(x.shape)}")
    patch = tuple(int(p) for p in _tuple(patch, nd, "patch"))
    if any(p < 1 for p in patch):
        raise ValueError(f"patch sizes must be positive, got {patch}")
    if overlap is not None and stride is not None:
        raise ValueError("give either overlap or stride, not both")
    if stride is not None:
        stride = tuple(int(s) for s in _tuple(stride, nd, "stride"))
        if any(not 1 <= s <= p for s, p in zip(stride, patch)):
            raise ValueError(f"stride must satisfy 1 <= stride <= patch per axis, got stride {stride}, patch {patch}")
    else:
        overlap = tuple(float(o) for o in _tuple(0.5 if overlap is None else overlap, nd, "overlap"))
        if any(not 0.0 <= o < 1.0 for o in overlap):
            raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    if mode not in ("gaussian", "constant"):
        raise ValueError(f"mode must be 'gaussian' or 'constant', got {mode!r}")
    if backend not in ("auto", "monai", "builtin"):
        raise ValueError(f"backend must be 'auto', 'monai' or 'builtin', got {backend!r}")
    if backend == "monai" and not _monai_available():
        raise ImportError("backend='monai' needs MONAI: pip install 'ssmis[monai]'")

    in_device = x.device
    device = torch.device(device) if device is not None else _model_device(model)
    x = x.to(device=device, dtype=torch.float32)[None]

    def predictor(batch: Tensor) -> Tensor:
        with autocast():
            logits = _logits(model(batch))
        return torch.softmax(logits.float(), dim=1)

    modules = (model,) if isinstance(model, nn.Module) else ()
    with eval_mode(*modules):
        probs = None
        if backend == "monai" or (backend == "auto" and _monai_available()):
            probs = _monai(x, patch, predictor, overlap, stride, mode, sigma_scale, batch_size)
            if probs is None and backend == "monai":
                raise ValueError("per-axis overlaps or strides that differ between axes need MONAI >= 1.2")
        if probs is None:
            probs = _builtin(x, patch, predictor, overlap, stride, mode, sigma_scale, batch_size)
    probs = probs[0]
    return probs.cpu().numpy() if is_numpy else probs.to(in_device)


def predict_volume(model: nn.Module | Callable, volume: np.ndarray | Tensor, patch: Sequence[int],
                   **kwargs) -> np.ndarray:
    """Label map (int64, spatial shape of `volume`) = argmax of `sliding_window_probs` (same keywords)."""
    probs = sliding_window_probs(model, volume, patch, **kwargs)
    probs = probs if isinstance(probs, np.ndarray) else probs.cpu().numpy()
    return probs.argmax(0).astype(np.int64)
