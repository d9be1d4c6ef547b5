"""Head phantom (methods.md, "Tiny phantoms"): 2D, binary, HC18-like; built in memory from a seed.

Each case is a 64×64 image holding one filled ellipse (semi-axes U(12, 26) pixels, random angle and centre, the
whole ellipse inside the image): background 0.3, a slightly brighter interior 0.4, a bright rim (the skull, 0.9) of
width 2 inside the ellipse with 30 % of its arc faded to the interior's level, a blur (σ 0.7) and multiplicative
speckle noise (gamma-distributed, mean 1), clipped to [0, 1]. Pixel size 0.1 mm; samples carry the true ellipse's
circumference (`hc_ref_mm`, Ramanujan) for HC checks. [ours] As with the other phantoms, the 4 labelled images are
the clean ones (speckle std 0.1); the 128 unlabelled, 8 val and 64 test images have speckle std ~ U(0.1, 0.45), so
labels-only training sees only clean images. Its split is fixed.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from ssmis.data.adapter import DatasetInfo, Item
from ssmis.data.hc18 import ramanujan_perimeter
from ssmis.data.phantom import FixedRolesPhantom
from ssmis.registry import LAYOUTS

SIZE = 64
PIXEL_MM = 0.1
ROLES = {"labeled": 4, "unlabeled": 128, "val": 8, "test": 64}
RIM_WIDTH, FADED_ARC = 2, 0.3
BACKGROUND, INTERIOR, RIM = 0.3, 0.4, 0.9


def head_image(seed: int, clean: bool, size: int = SIZE) -> tuple[np.ndarray, np.ndarray, tuple[float, float]]:
    """One case: image float32 H×W in [0, 1], label uint8 H×W (1 inside the ellipse), semi-axes (a, b) in pixels."""
    rng = np.random.default_rng(seed)
    a, b = rng.uniform(12, 26, size=2)
    theta = rng.uniform(0, np.pi)
    c, s = np.cos(theta), np.sin(theta)
    half = (np.hypot(a * c, b * s), np.hypot(a * s, b * c))          # half extents along x and y
    cx, cy = (rng.uniform(min(h + 1, size / 2), max(size - 2 - h, size / 2)) for h in half)
    y, x = np.mgrid[0:size, 0:size].astype(np.float64)
    u, v = (x - cx) * c + (y - cy) * s, -(x - cx) * s + (y - cy) * c
    inside = (u / a) ** 2 + (v / b) ** 2 <= 1.0
    rim = inside & (ndimage.distance_transform_edt(inside) <= RIM_WIDTH)
    phase = (np.arctan2(v / b, u / a) - rng.uniform(0, 2 * np.pi)) % (2 * np.pi)
    faded = rim & (phase < FADED_ARC * 2 * np.pi)
    img = np.where(inside, INTERIOR, BACKGROUND)
    img = np.where(rim & ~faded, RIM, img)
    img = ndimage.gaussian_filter(img, 0.7)
    std = 0.1 if clean else rng.uniform(0.1, 0.45)
    looks = 1.0 / std ** 2
    img = np.clip(img * rng.gamma(looks, 1.0 / looks, img.shape), 0.0, 1.0)
    return img.astype(np.float32), inside.astype(np.uint8), (float(a), float(b))


@LAYOUTS.register("head")
class HeadPhantomAdapter(FixedRolesPhantom):
    """The head phantom as a layout (no files): 4 labelled, 128 unlabelled, 8 val and 64 test images, 0.1 mm pixels."""

    name = "head"
    ROLES = ROLES
    ID_DIGITS = 3

    def info(self) -> DatasetInfo:
        return DatasetInfo("head", 2, 2, 1, True, ["background", "head"])

    def load(self, item: Item) -> dict:
        img, lab, (a, b) = head_image(self.p.seed * 100003 + item.meta["index"], item.meta["clean"])
        return {"image": img[None], "label": lab.astype(np.int64), "case": item.id, "patient": item.patient,
                "spacing": (PIXEL_MM, PIXEL_MM), "hc_ref_mm": ramanujan_perimeter(a, b) * PIXEL_MM}
