"""Built-in synthetic cardiac-like phantom: deterministic from a seed, no download.

Each "patient" is one volume (D×H×W, 4 classes like ACDC): a left-ventricle cavity (3) inside a
myocardium ring (2) with a right-ventricle crescent (1) beside it. Sizes shrink from base to apex, so the
slice position is a meaningful meta-label. Patients differ in anatomy, contrast, bias field, blur and noise,
which makes labels-only training on a few patients clearly worse than training on many.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from ssmis.data.adapter import Adapter, DatasetInfo, Item
from ssmis.registry import LAYOUTS

CLASS_NAMES = ["background", "RV", "Myo", "LV"]


def phantom_volume(seed: int, slices: int = 8, size: int = 64) -> tuple[np.ndarray, np.ndarray, tuple]:
    """One patient: image float32 D×H×W in [0, 1], label uint8 D×H×W, spacing (mm)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    s = size / 64.0
    cy, cx = size / 2 + rng.uniform(-6, 6) * s, size / 2 + rng.uniform(-6, 6) * s
    r_lv0 = rng.uniform(7, 11) * s
    wall = rng.uniform(2.5, 4.0) * s
    ecc = rng.uniform(0.8, 1.2)
    rv_angle = rng.uniform(0.6, 1.4) * np.pi          # RV sits to one side of the LV
    rv_scale = rng.uniform(0.9, 1.4)
    # tissue intensities vary by patient (contrast is what a model must generalise over)
    lv_int, myo_int, rv_int = rng.uniform(0.7, 0.95), rng.uniform(0.25, 0.45), rng.uniform(0.55, 0.85)
    bg_int = rng.uniform(0.1, 0.3)
    noise = rng.uniform(0.03, 0.12)
    blur = rng.uniform(0.5, 1.3)
    bias = rng.normal(0, 0.25, size=3)
    img = np.zeros((slices, size, size), np.float32)
    lab = np.zeros((slices, size, size), np.uint8)
    # smooth background texture shared by the whole volume (other organs)
    tex = ndimage.gaussian_filter(rng.normal(0, 1, (size, size)), 4 * s).astype(np.float32)
    tex /= max(np.abs(tex).max(), 1e-6)
    for d in range(slices):
        pos = d / max(slices - 1, 1)                   # 0 = base, 1 = apex
        shrink = 1.0 - 0.55 * pos
        r_lv = r_lv0 * shrink
        ang = rng.uniform(0, np.pi)
        dy, dx = yy - cy, xx - cx
        u = dx * np.cos(ang) + dy * np.sin(ang)
        v = -dx * np.sin(ang) + dy * np.cos(ang)
        rho = np.sqrt((u / ecc) ** 2 + (v * ecc) ** 2)
        lv = rho < r_lv
        myo = (rho < r_lv + wall) & ~lv
        rvc_y = cy + np.sin(rv_angle) * (r_lv + wall + 3 * s)
        rvc_x = cx + np.cos(rv_angle) * (r_lv + wall + 3 * s)
        r_rv = r_lv * rv_scale * (1.0 - 0.6 * pos)
        rv = (np.hypot(yy - rvc_y, (xx - rvc_x) * 0.7) < r_rv) & ~(rho < r_lv + wall + 1)
        lab[d][rv] = 1
        lab[d][myo] = 2
        lab[d][lv] = 3
        im = bg_int + 0.15 * tex
        im = np.where(rv, rv_int, im)
        im = np.where(myo, myo_int, im)
        im = np.where(lv, lv_int, im)
        # papillary-muscle-like dark blobs inside the LV cavity
        for _ in range(rng.integers(0, 3)):
            by, bx = cy + rng.uniform(-0.5, 0.5) * r_lv, cx + rng.uniform(-0.5, 0.5) * r_lv
            im = np.where(np.hypot(yy - by, xx - bx) < 1.5 * s, myo_int, im)
        im = ndimage.gaussian_filter(im, blur)
        field = 1.0 + bias[0] * (yy / size - 0.5) + bias[1] * (xx / size - 0.5) + bias[2] * pos
        im = im * field + rng.normal(0, noise, im.shape)
        img[d] = im
    img = (img - img.min()) / max(float(img.max() - img.min()), 1e-6)
    return img.astype(np.float32), lab, (10.0, 1.5 * 64 / size, 1.5 * 64 / size)


class BuiltinPhantom(Adapter):
    """A layout generated in memory (no files, no root): a fixed item list, volumes a function of the phantom seed
    (`data.phantom.seed`) and of the item's index. Subclasses set `_items` and `info`, and implement `volume`."""

    needs_root = False

    def __init__(self, root=None, cfg=None):
        super().__init__(None, cfg)
        from ssmis.config.schema import PhantomConfig

        self.p = cfg.phantom if cfg is not None and hasattr(cfg, "phantom") else PhantomConfig()
        self._items: list[Item] = []

    def items(self, role):
        return list(self._items)

    def volume(self, seed: int, item: Item) -> tuple[np.ndarray, np.ndarray, tuple[float, ...]]:
        """(image D×H×W float32, label D×H×W, spacing in mm) of one item."""
        raise NotImplementedError

    def load(self, item: Item) -> dict:
        img, lab, spacing = self.volume(self.p.seed * 100003 + item.meta["index"], item)
        return {"image": img[None], "label": lab.astype(np.int64), "case": item.id, "patient": item.patient,
                "spacing": spacing}


class FixedRolesPhantom(BuiltinPhantom):
    """A built-in phantom whose split is fixed: `ROLES` (role -> count) clean labelled cases first, ids
    `<name>_<role><k>`; item meta `clean` marks the labelled ones. Its protocol split returns these roles."""

    ROLES: dict[str, int] = {}
    ID_DIGITS = 2

    def __init__(self, root=None, cfg=None):
        super().__init__(root, cfg)
        self.roles: dict[str, list[str]] = {}
        for role, n in self.ROLES.items():
            ids = [f"{self.name}_{role}{i:0{self.ID_DIGITS}d}" for i in range(n)]
            self.roles[role] = ids
            self._items += [Item(c, c, True, f"{self.name}:{c}", {"index": len(self._items) + k, "clean": role == "labeled"})
                            for k, c in enumerate(ids)]

    def protocol_splits(self, labeled: float, seed: int):
        from ssmis.data.splits import Splits

        r, n = self.roles, self.ROLES
        rule = (f"{self.name} phantom: fixed roles ({n['labeled']} clean labelled, {n['unlabeled']} unlabelled, "
                f"{n['val']} val, {n['test']} test)")
        return Splits(list(r["labeled"]), list(r["unlabeled"]), list(r["val"]), list(r["test"]), {"rule": rule, "seed": seed})


@LAYOUTS.register("phantom")
class PhantomAdapter(BuiltinPhantom):
    """The built-in phantom as a layout: every patient one 3D volume; train and eval pools are the same."""

    name = "phantom"

    def __init__(self, root=None, cfg=None):
        super().__init__(root, cfg)
        self._items = [Item(f"phantom{i:03d}", f"phantom{i:03d}", True, f"phantom:{i}", {"index": i})
                       for i in range(self.p.patients)]

    def info(self) -> DatasetInfo:
        return DatasetInfo("phantom", 4, 3, 1, True, CLASS_NAMES)

    def volume(self, seed: int, item: Item):
        return phantom_volume(seed, self.p.slices, self.p.size)
