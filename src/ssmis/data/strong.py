"""Strong views of weak-to-strong methods (FixMatch, UniMatch): intensity perturbations that keep the weak
view's geometry, and CutMix boxes. Batch-wise torch ops drawing from the global torch RNG (exact resume)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def _uniform(n: int, low: float, high: float, device: torch.device) -> Tensor:
    """n draws from U(low, high) on `device` (float32, global RNG)."""
    return low + (high - low) * torch.rand(n, device=device)


def _per_sample(v: Tensor, like: Tensor) -> Tensor:
    """Reshape a length-B vector so that it broadcasts over the non-batch dimensions of `like`."""
    return v.view(-1, *([1] * (like.ndim - 1)))


def brightness_contrast(x: Tensor, brightness: float = 0.5, contrast: float = 0.5, p: float = 0.8,
                        clip: tuple[float, float] | None = (0.0, 1.0)) -> Tensor:
    """torchvision `ColorJitter(brightness, contrast, saturation, hue)` as it acts on grey images, per sample
    with probability p: brightness x·b and contrast (x - mean)·c + mean (mean over the sample's channels and
    pixels, as PIL's grey mean), b ~ U(1 - brightness, 1 + brightness), c ~ U(1 - contrast, 1 + contrast),
    in a random order (ColorJitter permutes its transforms), the result clipped to `clip` after each one (PIL
    clips to [0, 255]). Saturation and hue leave grey images unchanged and are not applied. x: B×C×spatial."""
    b, dev = x.shape[0], x.device
    apply = torch.rand(b, device=dev) < p
    fb = _per_sample(_uniform(b, max(0.0, 1 - brightness), 1 + brightness, dev), x)
    fc = _per_sample(_uniform(b, max(0.0, 1 - contrast), 1 + contrast, dev), x)
    contrast_first = _per_sample(torch.rand(b, device=dev) < 0.5, x)

    def clamp(t: Tensor) -> Tensor:
        return t.clamp(*clip) if clip is not None else t

    def adjust_contrast(t: Tensor) -> Tensor:
        mean = t.mean(dim=tuple(range(1, t.ndim)), keepdim=True)
        return clamp((t - mean) * fc + mean)

    xf = x.float()
    b_then_c = adjust_contrast(clamp(xf * fb))
    c_then_b = clamp(adjust_contrast(xf) * fb)
    out = torch.where(contrast_first, c_then_b, b_then_c)
    return torch.where(_per_sample(apply, x), out, xf).to(x.dtype)


def gaussian_blur(x: Tensor, sigma: tuple[float, float] = (0.1, 2.0), p: float = 0.5) -> Tensor:
    """Per sample with probability p, a Gaussian blur with σ ~ U(sigma) pixels (PIL `GaussianBlur(radius=σ)`;
    here an exact separable kernel truncated at 3σ, edges replicated). x: B×C×H×W or B×C×D×H×W; float32
    arithmetic even under autocast."""
    b, dev, nd = x.shape[0], x.device, x.ndim - 2
    apply = torch.rand(b, device=dev) < p
    sig = _uniform(b, sigma[0], sigma[1], dev)
    idx = torch.nonzero(apply).flatten()
    if len(idx) == 0:
        return x
    with torch.autocast(dev.type, enabled=False):
        xs = x[idx].float()
        n, c = xs.shape[:2]
        radius = max(1, math.ceil(3 * float(sig[idx].max())))
        k = torch.arange(-radius, radius + 1, device=dev, dtype=torch.float32)
        kern = torch.exp(-0.5 * (k[None] / sig[idx, None]) ** 2)
        kern = (kern / kern.sum(1, keepdim=True)).repeat_interleave(c, 0)          # (n·c)×K
        conv = {2: F.conv2d, 3: F.conv3d}[nd]
        y = xs.reshape(1, n * c, *xs.shape[2:])
        for axis in range(nd):
            shape = [n * c, 1] + [1] * nd
            shape[2 + axis] = 2 * radius + 1
            pad = [0, 0] * nd
            pad[2 * (nd - 1 - axis)] = pad[2 * (nd - 1 - axis) + 1] = radius   # F.pad lists the last dim first
            y = conv(F.pad(y, pad, mode="replicate"), kern.view(shape), groups=n * c)
        out = x.clone()
        out[idx] = y.reshape(xs.shape).to(x.dtype)
    return out


def strong_view(x: Tensor, brightness: float = 0.5, contrast: float = 0.5, jitter_p: float = 0.8,
                blur_sigma: tuple[float, float] = (0.1, 2.0), blur_p: float = 0.5,
                clip: tuple[float, float] | None = (0.0, 1.0)) -> Tensor:
    """The intensity part of the UniMatch/FixMatch medical strong view: ColorJitter (brightness, contrast)
    with probability `jitter_p`, then Gaussian blur with probability `blur_p`; no geometry, so the strong view
    stays aligned with the weak view and its pseudo-label."""
    return gaussian_blur(brightness_contrast(x, brightness, contrast, jitter_p, clip), blur_sigma, blur_p)


def cutmix_box(batch: int, size: tuple[int, int], p: float = 0.5, area: tuple[float, float] = (0.02, 0.4),
               ratio: tuple[float, float] = (0.3, 1 / 0.3), device: torch.device | str | None = None) -> Tensor:
    """UniMatch's `obtain_cutmix_box` per sample: with probability p an axis-aligned box of area
    U(area)·H·W with aspect h/w ~ U(ratio) (w = ⌊√(area/ratio)⌋, h = ⌊√(area·ratio)⌋), its corner uniform
    over the image and redrawn (with a new aspect) until the box fits. Returns a bool B×H×W mask."""
    h_img, w_img = size
    has = torch.rand(batch, device=device) < p
    target = _uniform(batch, area[0], area[1], torch.device(device or "cpu")) * h_img * w_img
    x0 = torch.zeros(batch, dtype=torch.long, device=device)
    y0, bw, bh = x0.clone(), x0.clone(), x0.clone()
    pending = torch.ones(batch, dtype=torch.bool, device=device)
    while bool(pending.any()):
        idx = torch.nonzero(pending).flatten()
        r = _uniform(len(idx), ratio[0], ratio[1], target.device)
        w = torch.sqrt(target[idx] / r).long()
        h = torch.sqrt(target[idx] * r).long()
        x = torch.randint(0, w_img, (len(idx),), device=device)
        y = torch.randint(0, h_img, (len(idx),), device=device)
        ok = (x + w <= w_img) & (y + h <= h_img)
        done = idx[ok]
        x0[done], y0[done], bw[done], bh[done] = x[ok], y[ok], w[ok], h[ok]
        pending[done] = False
    rows = torch.arange(h_img, device=device).view(1, -1, 1)
    cols = torch.arange(w_img, device=device).view(1, 1, -1)
    y0, x0, bh, bw = (v.view(-1, 1, 1) for v in (y0, x0, bh, bw))
    inside = (rows >= y0) & (rows < y0 + bh) & (cols >= x0) & (cols < x0 + bw)
    return inside & has.view(-1, 1, 1)


def paste(x: Tensor, other: Tensor, box: Tensor) -> Tensor:
    """`other` inside the box, `x` outside; the B×spatial box broadcasts over any channel dimension
    (images B×C×H×W, label maps and masks B×H×W)."""
    shape = (box.shape[0],) + (1,) * (x.ndim - box.ndim) + tuple(box.shape[1:])
    return torch.where(box.view(shape), other, x)
