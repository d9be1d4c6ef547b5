"""HC18 fetal-head ultrasound in the official layout: `training_set/NNN_HC.png`, their `_Annotation.png`
ellipses (filled or thin outlines), and the CSV of pixel sizes and reference head circumferences.
"""

from __future__ import annotations

import csv
from functools import cached_property
from pathlib import Path

import numpy as np
from scipy import ndimage
from skimage import draw
from skimage.measure import EllipseModel
from skimage.morphology import convex_hull_image

from ssmis.data.adapter import Adapter, DataError, DatasetInfo, Item
from ssmis.data.folders import read_pixels, to_unit_float
from ssmis.registry import LAYOUTS

CSV_NAME = "training_set_pixel_size_and_HC.csv"
PIXEL_COL, HC_COL = "pixel size(mm)", "head circumference (mm)"


def ramanujan_perimeter(a: float, b: float) -> float:
    """Ellipse perimeter from its semi-axes (Ramanujan's second approximation)."""
    h = ((a - b) / (a + b)) ** 2
    return float(np.pi * (a + b) * (1 + 3 * h / (10 + np.sqrt(4 - 3 * h))))


def fit_ellipse(xy: np.ndarray) -> tuple[float, float, float, float, float] | None:
    """Least-squares ellipse (xc, yc, a, b, theta) through points (x, y), or None when degenerate."""
    if hasattr(EllipseModel, "from_estimate"):   # scikit-image >= 0.26
        m = EllipseModel.from_estimate(xy)
        return (*map(float, m.center), *map(float, m.axis_lengths), float(m.theta)) if m else None
    m = EllipseModel()
    return tuple(map(float, m.params)) if m.estimate(xy) else None


def _is_thin(mask: np.ndarray) -> bool:
    """True when the foreground covers under half its convex hull (an outline, not a region); on a <=128 px grid."""
    step = max(1, min(mask.shape) // 128)
    small = mask[::step, ::step]
    return small.any() and small.sum() < 0.5 * convex_hull_image(small).sum()


def annotation_to_mask(annotation: np.ndarray, source: str = "annotation") -> np.ndarray:
    """Head mask (bool H×W): channel 0 > 0, holes filled; an outline left open by gaps becomes its fitted ellipse."""
    fg = (annotation[..., 0] if annotation.ndim == 3 else annotation) > 0
    mask = ndimage.binary_fill_holes(fg)
    if not _is_thin(mask):
        return mask
    fit = fit_ellipse(np.argwhere(fg)[:, ::-1].astype(float))
    if fit is None:
        raise DataError(source, "annotation is neither a filled region nor an ellipse outline", "Check the file.")
    xc, yc, a, b, theta = fit
    filled = np.zeros(mask.shape, bool)
    filled[draw.ellipse(yc, xc, b, a, shape=mask.shape, rotation=-theta)] = True
    return filled


@LAYOUTS.register("hc18")
class HC18Adapter(Adapter):
    """All images form the training pool, those with an annotation the evaluation pool; `NNN_2HC` is subject `NNN`."""

    name = "hc18"

    @classmethod
    def detect(cls, root: Path) -> bool:
        return (root / "training_set").is_dir() and (root / CSV_NAME).is_file()

    @cached_property
    def _rows(self) -> dict[str, dict]:
        path = self.root / CSV_NAME
        try:
            with open(path, newline="") as f:
                rows = list(csv.DictReader(f))
        except FileNotFoundError:
            raise DataError(str(path), "file not found", "HC18 needs the CSV of pixel sizes beside training_set/.") from None
        if not rows or not {"filename", PIXEL_COL} <= rows[0].keys():
            raise DataError(str(path), f"needs the columns filename, {PIXEL_COL!r}", "Use the official HC18 CSV.")
        try:
            return {r["filename"]: {"pixel_mm": float(r[PIXEL_COL]),
                                    "hc_ref_mm": float(r[HC_COL]) if r.get(HC_COL) else None} for r in rows}
        except ValueError as e:
            raise DataError(str(path), f"a value is not a number ({e})", "Fix the CSV.") from None

    @cached_property
    def _items(self) -> list[Item]:
        folder = self.root / "training_set"
        pngs = sorted(folder.glob("*HC.png"))
        if not pngs:
            raise DataError(str(folder), "no NNN_HC.png images", "Point to the HC18 folder holding training_set/.")
        items = []
        for png in pngs:
            ann = folder / f"{png.stem}_Annotation.png"
            meta = {"annotation": str(ann), **self._rows.get(png.name, {})}
            items.append(Item(png.stem, png.stem.split("_")[0], ann.exists(), str(png), meta))
        return items

    def info(self) -> DatasetInfo:
        return DatasetInfo(self.name, 2, 2, 1, True, ["background", "head"])

    def items(self, role):
        return list(self._items) if role == "train" else [it for it in self._items if it.has_label]

    def load(self, item: Item) -> dict:
        if "pixel_mm" not in item.meta:
            raise DataError(item.source, f"no row in {CSV_NAME}", "Add the image's pixel size to the CSV.")
        image = to_unit_float(read_pixels(Path(item.source), grey=True))
        px = item.meta["pixel_mm"]
        sample = {"image": image[None], "case": item.id, "patient": item.patient, "spacing": (px, px),
                  "hc_ref_mm": item.meta["hc_ref_mm"]}
        if item.has_label:
            ann_path = item.meta["annotation"]
            ann = read_pixels(Path(ann_path))
            if ann.shape[:2] != image.shape:
                raise DataError(ann_path, f"size {ann.shape[:2]} differs from its image's {image.shape}",
                                "Annotations must have their image's size.")
            sample["label"] = annotation_to_mask(ann, ann_path).astype(np.int64)
        return sample
