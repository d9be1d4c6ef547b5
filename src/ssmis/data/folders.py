"""Plain image folders: `images/` with `masks/` (or `labels/`), PNG/JPG/TIFF files paired by file stem.

patient = the file stem, or its part before `__` when present (`pat07__slice03.png` is patient `pat07`).
Integer images are scaled to [0, 1] by their type's maximum; mask pixel values map to classes by data.mask_values.
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path

import numpy as np
from PIL import Image

from ssmis.data.adapter import Adapter, DataError, DatasetInfo, Item, as_label
from ssmis.registry import LAYOUTS

EXTENSIONS = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"}
_KEEP_GREY = {"L", "I", "F", "I;16", "I;16B", "I;16L"}   # PIL modes that are already single-channel numbers


def read_pixels(path: Path, grey: bool | None = None) -> np.ndarray:
    """Pixels of an image file as stored (`grey=None`), as one grey channel (True) or as RGB (False)."""
    try:
        with Image.open(path) as im:
            if grey is True and im.mode not in _KEEP_GREY:
                im = im.convert("L")
            elif grey is False and im.mode != "RGB":
                im = im.convert("RGB")
            return np.asarray(im)
    except FileNotFoundError:
        raise DataError(str(path), "file not found", "Check the dataset folder.") from None
    except (OSError, ValueError, SyntaxError) as e:
        raise DataError(str(path), f"cannot read image ({e})", "Re-copy or re-export the file.") from None


def to_unit_float(arr: np.ndarray) -> np.ndarray:
    """float32 image: integer types divided by their maximum (uint8 -> /255), floats unchanged."""
    if arr.dtype.kind in "ui":
        return arr.astype(np.float32) / np.float32(np.iinfo(arr.dtype).max)
    return arr.astype(np.float32)


def _by_stem(folder: Path) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for p in sorted(folder.iterdir()):
        if p.suffix.lower() in EXTENSIONS and not p.name.startswith("."):
            if p.stem in found:
                raise DataError(str(p), f"another file has the stem {p.stem!r} ({found[p.stem].name})",
                                "Keep one file per stem: images and masks are paired by stem.")
            found[p.stem] = p
    return found


@LAYOUTS.register("folders")
class FoldersAdapter(Adapter):
    """`images/` + `masks/` (or `labels/`); images without a mask are unlabelled. RGB -> 3 channels, grey -> 1."""

    name = "folders"

    @classmethod
    def detect(cls, root: Path) -> bool:
        return (root / "images").is_dir() and any((root / d).is_dir() for d in ("masks", "labels"))

    @cached_property
    def _mask_dir(self) -> Path:
        return next((self.root / d for d in ("masks", "labels") if (self.root / d).is_dir()), self.root / "masks")

    @cached_property
    def _items(self) -> list[Item]:
        img_dir = self.root / "images"
        if not img_dir.is_dir():
            raise DataError(str(img_dir), "folder not found", "The folders layout needs images/ and masks/.")
        images = _by_stem(img_dir)
        if not images:
            raise DataError(str(img_dir), "no image files", f"Expected files ending in {', '.join(sorted(EXTENSIONS))}.")
        masks = _by_stem(self._mask_dir) if self._mask_dir.is_dir() else {}
        orphans = sorted(masks.keys() - images.keys())
        if orphans:
            raise DataError(str(self._mask_dir), f"{len(orphans)} masks without an image: {', '.join(orphans[:10])}",
                            "Remove them or add their images (pairs share the file stem).")
        return [Item(stem, stem.split("__")[0], stem in masks, str(path),
                     {"mask": str(masks[stem])} if stem in masks else {})
                for stem, path in images.items()]

    @cached_property
    def _channels(self) -> int:
        """data.channels, else 1 or 3 by the first readable image (a broken file is left to load())."""
        if getattr(self.cfg, "channels", None):
            return self.cfg.channels
        for it in self._items:
            try:
                with Image.open(it.source) as im:
                    return 1 if im.mode in _KEEP_GREY or im.mode in ("1", "LA") else 3
            except (OSError, ValueError, SyntaxError):
                continue
        raise DataError(str(self.root / "images"), "no readable image", "Re-copy the dataset.")

    @cached_property
    def _num_classes(self) -> int:
        mapping = getattr(self.cfg, "mask_values", None)
        return getattr(self.cfg, "num_classes", None) or (max(mapping.values()) + 1 if mapping else 2)

    def info(self) -> DatasetInfo:
        return DatasetInfo(self.name, self._num_classes, 2, self._channels, False)

    def items(self, role):
        return list(self._items) if role == "train" else [it for it in self._items if it.has_label]

    def load(self, item: Item) -> dict:
        pixels = read_pixels(Path(item.source), grey=self._channels == 1)
        image = to_unit_float(pixels)
        image = image[None] if image.ndim == 2 else np.moveaxis(image, -1, 0)
        sample = {"image": image, "case": item.id, "patient": item.patient, "spacing": None}
        if item.has_label:
            label = self._classes(read_pixels(Path(item.meta["mask"])), item.meta["mask"])
            if label.shape != image.shape[1:]:
                raise DataError(item.meta["mask"], f"mask size {label.shape} differs from image size {image.shape[1:]}",
                                "Masks must have their image's size.")
            sample["label"] = label
        return sample

    def _classes(self, raw: np.ndarray, source: str) -> np.ndarray:
        """Mask channel 0 -> class indices: by data.mask_values, else as is (0..K-1) or {0, 255} -> {0, 1}."""
        values = raw[..., 0] if raw.ndim == 3 else raw
        present = np.unique(values)
        mapping = getattr(self.cfg, "mask_values", None)
        if mapping:
            unknown = sorted(set(present.tolist()) - set(mapping))
            if unknown:
                raise DataError(source, f"mask values {unknown[:8]} are not in data.mask_values", "Add them to data.mask_values.")
            keys = np.array(sorted(mapping))
            return as_label(np.array([mapping[k] for k in keys])[np.searchsorted(keys, values)], source, self._num_classes)
        k = self._num_classes
        if present.min() >= 0 and present.max() < k:
            return as_label(values, source, k)
        if set(present.tolist()) <= {0, 255}:
            return (values == 255).astype(np.int64)
        raise DataError(source, f"mask values {present[:8].tolist()} are not the classes 0..{k - 1}",
                        "Set data.mask_values (pixel value -> class, e.g. {0: 0, 128: 1, 255: 2}) or data.num_classes.")
