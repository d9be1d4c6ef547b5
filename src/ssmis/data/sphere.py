"""Sphere phantom (methods.md, "tiny phantoms"): 3D, binary, LA-like; built in memory from a seed.

Each case is a 16×24×24 volume (D×H×W) holding one ellipsoid (semi-axes U(4, 8) voxels, random centre):
object 0.8 on background 0.2, intensity scale U(0.7, 1.3), Gaussian blur σ 0.7, additive noise. The two
labelled cases are clean (noise σ 0.05); the 32 unlabelled, 4 val and 16 test cases have noise σ ~ U(0.05, 0.3),
so labels-only training sees only clean volumes and generalises less well. Its split is fixed (the protocol).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from ssmis.data.adapter import DatasetInfo, Item
from ssmis.data.phantom import FixedRolesPhantom
from ssmis.registry import LAYOUTS

SHAPE = (16, 24, 24)
ROLES = {"labeled": 2, "unlabeled": 32, "val": 4, "test": 16}


def sphere_volume(seed: int, clean: bool, shape: tuple[int, int, int] = SHAPE) -> tuple[np.ndarray, np.ndarray]:
    """One case: image float32 D×H×W, label uint8 D×H×W (1 inside the ellipsoid)."""
    rng = np.random.default_rng(seed)
    axes = rng.uniform(4, 8, size=3)
    centre = [rng.uniform(min(a, s / 2), max(s - a, s / 2)) for a, s in zip(axes, shape)]
    grid = np.meshgrid(*[np.arange(s, dtype=np.float32) + 0.5 for s in shape], indexing="ij")
    inside = sum(((g - c) / a) ** 2 for g, c, a in zip(grid, centre, axes)) < 1.0
    img = np.where(inside, 0.8, 0.2) * rng.uniform(0.7, 1.3)
    img = ndimage.gaussian_filter(img, 0.7)
    sigma = 0.05 if clean else rng.uniform(0.05, 0.3)
    img = img + rng.normal(0, sigma, shape)
    return img.astype(np.float32), inside.astype(np.uint8)


@LAYOUTS.register("sphere")
class SpherePhantomAdapter(FixedRolesPhantom):
    """The sphere phantom as a layout (no files): 2 labelled, 32 unlabelled, 4 val and 16 test volumes."""

    name = "sphere"
    ROLES = ROLES

    def info(self) -> DatasetInfo:
        return DatasetInfo("sphere", 2, 3, 1, True, ["background", "sphere"])

    def volume(self, seed: int, item: Item):
        img, lab = sphere_volume(seed, item.meta["clean"])
        return img, lab, (1.0, 1.0, 1.0)
