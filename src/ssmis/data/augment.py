"""Batch-wise augmentation in torch: SSL4MIS RandomGenerator and the BCP variant (2D), UA-MT's rot90 +
flip (3D), and an optional intensity jitter."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


def rotate_nearest(x: Tensor, angles_deg: Tensor) -> Tensor:
    """Rotate each B×C×H×W sample about its centre by its angle, nearest neighbour, zero fill."""
    t = angles_deg.to(x.device, torch.float32) * math.pi / 180
    cos, sin = torch.cos(t), torch.sin(t)
    zero = torch.zeros_like(cos)
    theta = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="nearest", padding_mode="zeros", align_corners=False)


def _square_safe(ks: Tensor, hw) -> Tensor:
    """Quarter turns swap H and W: on a non-square patch only k in {0, 2} keep the shape."""
    return ks if hw[0] == hw[1] else (ks % 2) * 2


@dataclass
class GeometryDraw:
    """Per-sample geometric parameters of one batch (CPU tensors, length B)."""

    rotflip: Tensor     # bool: rot90 by k, then a flip
    k: Tensor           # quarter turns (np.rot90 sense)
    axis: Tensor        # flip axis 0 (rows) or 1 (columns)
    rotate: Tensor      # bool: rotation by `angle` degrees (scipy.ndimage.rotate sense, no reshape)
    angle: Tensor


def draw_geometry(b: int, gen: torch.Generator, kind: str) -> GeometryDraw:
    """One batch's geometric draws, shared by `random_geometry` and data/resample.py: with p 0.5 rot90 + flip;
    otherwise a rotation by an integer angle in [-20, 19] degrees (`ssl4mis`), or with p 0.5 of the rest (`bcp`);
    `none`: identity."""
    if kind == "none":
        z = torch.zeros(b, dtype=torch.bool)
        return GeometryDraw(z, torch.zeros(b, dtype=torch.long), torch.zeros(b, dtype=torch.long), z,
                            torch.zeros(b, dtype=torch.long))
    u = torch.rand(b, generator=gen)
    u2 = torch.rand(b, generator=gen)
    ks = torch.randint(0, 4, (b,), generator=gen)
    axes = torch.randint(0, 2, (b,), generator=gen)
    angles = torch.randint(-20, 20, (b,), generator=gen)
    rotflip = u > 0.5
    rotate = ~rotflip if kind == "ssl4mis" else (~rotflip & (u2 > 0.5))
    return GeometryDraw(rotflip, ks, axes, rotate, angles)


def random_geometry(image: Tensor, label: Tensor | None, gen: torch.Generator, kind: str = "ssl4mis") -> tuple[Tensor, Tensor | None]:
    """Per sample: with p=0.5 rot90 (k in 0..3) + flip along a random axis; otherwise rotation by an integer
    angle in [-20, 19] degrees (`ssl4mis`), or rotation with p=0.5 and nothing otherwise (`bcp`)."""
    if kind == "none":
        return image, label
    g = draw_geometry(image.shape[0], gen, kind)
    ks, axes, angles, rotflip, rotate = _square_safe(g.k, image.shape[-2:]), g.axis, g.angle, g.rotflip, g.rotate
    img, lab = image.clone(), None if label is None else label.clone()
    for i in torch.nonzero(rotflip).flatten().tolist():
        k, ax = int(ks[i]), 1 + int(axes[i])
        img[i] = torch.rot90(image[i], k, (1, 2)).flip(ax)
        if lab is not None:
            lab[i] = torch.rot90(label[i], k, (0, 1)).flip(ax - 1)
    idx = torch.nonzero(rotate).flatten()
    if len(idx):
        both = img[idx] if lab is None else torch.cat([img[idx], lab[idx, None].to(img.dtype)], 1)
        out = rotate_nearest(both, angles[idx])
        img[idx] = out[:, : img.shape[1]]
        if lab is not None:
            lab[idx] = out[:, -1].round().to(lab.dtype)
    return img, lab


def random_geometry_3d(image: Tensor, label: Tensor | None, gen: torch.Generator, kind: str = "ssl4mis",
                       plane: tuple[int, int] = (1, 2)) -> tuple[Tensor, Tensor | None]:
    """Per sample B×C×D×H×W: rot90 in `plane` (two spatial axes; default H, W) by k in 0..3, then a flip along
    one of those axes (UA-MT's RandomRotFlip, whose plane is the first two axes of LA's x, y, z arrays)."""
    if kind == "none":
        return image, label
    b = image.shape[0]
    p0, p1 = plane
    ks = _square_safe(torch.randint(0, 4, (b,), generator=gen), (image.shape[2 + p0], image.shape[2 + p1]))
    axes = torch.randint(0, 2, (b,), generator=gen)
    img = torch.stack([torch.rot90(image[i], int(ks[i]), (1 + p0, 1 + p1)).flip(1 + plane[int(axes[i])])
                       for i in range(b)])
    lab = None
    if label is not None:
        lab = torch.stack([torch.rot90(label[i], int(ks[i]), (p0, p1)).flip(plane[int(axes[i])]) for i in range(b)])
    return img.contiguous(), None if lab is None else lab.contiguous()


def intensity_jitter(image: Tensor, gen: torch.Generator, strength: float) -> Tensor:
    """x·(1+a) + b per sample with a, b ~ U(-strength, strength); identity when strength is 0."""
    if strength <= 0:
        return image
    shape = (image.shape[0],) + (1,) * (image.ndim - 1)
    a = (torch.rand(shape, generator=gen) * 2 - 1) * strength
    b = (torch.rand(shape, generator=gen) * 2 - 1) * strength
    return image * (1 + a.to(image.device)) + b.to(image.device)      # drawn on the CPU: same on any device
