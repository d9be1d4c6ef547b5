"""ACDC as SSL4MIS stores it, read in place: 2D training slices and 3D val/test volumes in HDF5 files, which
carry no spacing. `read_list` and `read_h5` serve the LA layout (la_h5.py) too.
"""

from __future__ import annotations

import re
from collections import Counter
from functools import cached_property
from pathlib import Path

import h5py
import numpy as np

from ssmis.data.adapter import Adapter, DataError, DatasetInfo, Item, as_label
from ssmis.data.splits import Splits
from ssmis.errors import UserError
from ssmis.registry import LAYOUTS

# ACDC protocol (methods.md, "ACDC 2D"): labelled patients -> the first N slices of train_slices.list
ACDC_PATIENT_SLICES = {1: 32, 3: 68, 7: 136, 14: 256, 21: 396, 28: 512, 35: 664, 70: 1312}
_SLICE = re.compile(r"(?P<volume>(?P<patient>.+?)(?:_frame(?P<frame>\d+))?)_slice_(?P<k>\d+)")
_VOLUME = re.compile(r"(?P<patient>.+?)(?:_frame(?P<frame>\d+))?")


def read_list(path: Path) -> list[str]:
    """The non-empty, stripped lines of a `.list` file."""
    try:
        return [ln.strip() for ln in path.read_text().splitlines() if ln.strip()]
    except FileNotFoundError:
        raise DataError(str(path), "list file not found", "See README, 'Data layouts', for the files this layout needs.") from None


def read_h5(path: Path, ndim: int, num_classes: int, with_label: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """`image` (float32 with `ndim` axes) and, when asked, `label` (int64, same shape) of an HDF5 file."""
    src = str(path)
    try:
        with h5py.File(path, "r") as f:
            missing = [k for k in ("image", "label")[: 1 + with_label] if k not in f]
            if missing:
                raise DataError(src, f"no dataset {missing[0]!r} (has {sorted(f.keys())})", "Each file needs 'image' and 'label'.")
            image = np.asarray(f["image"][()], np.float32)
            label = f["label"][()] if with_label else None
    except FileNotFoundError:
        raise DataError(src, "file not found", "Check the list files against the data folder.") from None
    except OSError as e:
        raise DataError(src, f"cannot read HDF5 ({e})", "Re-copy the file.") from None
    if image.ndim != ndim:
        raise DataError(src, f"image has shape {image.shape}, expected {ndim} axes", "Check the file.")
    if label is not None and label.shape != image.shape:
        raise DataError(src, f"label shape {label.shape} differs from image shape {image.shape}", "Check the file.")
    return image, None if label is None else as_label(label, src, num_classes)


def _frame(m: re.Match) -> dict:
    return {"frame": int(m["frame"])} if m["frame"] else {}


@LAYOUTS.register("ssl4mis_h5")
class SSL4MISAdapter(Adapter):
    """ACDC as SSL4MIS stores it: training slices `data/<volume>_slice_K.h5`, val/test volumes `data/<volume>.h5`.

    Training slices are listed in `train_slices.list`, evaluation volumes in `val.list` / `test.list`. Slice files
    number from 1 (from 0 if some K is 0); `slice_index` is 0-based.
    """

    name = "ssl4mis_h5"

    @classmethod
    def detect(cls, root: Path) -> bool:
        return (root / "train_slices.list").is_file() and any((root / "data").glob("*.h5"))

    @cached_property
    def _data(self) -> Path:
        if not (self.root / "data").is_dir():
            raise DataError(str(self.root / "data"), "data folder not found", "The SSL4MIS layout keeps its .h5 files in data/.")
        return self.root / "data"

    @cached_property
    def _k(self) -> int:
        return getattr(self.cfg, "num_classes", None) or 4

    @cached_property
    def _train(self) -> list[Item]:
        path = self.root / "train_slices.list"
        names = read_list(path)
        matches = [_SLICE.fullmatch(n) for n in names]
        bad = [n for n, m in zip(names, matches) if m is None]
        if bad:
            raise DataError(str(path), f"names not of the form <volume>_slice_K: {bad[:3]}", "Fix the list.")
        per_volume = Counter(m["volume"] for m in matches)
        base = 0 if any(int(m["k"]) == 0 for m in matches) else 1
        return [Item(n, m["patient"], True, str(self._data / f"{n}.h5"),
                     {"slice_index": int(m["k"]) - base, "num_slices": per_volume[m["volume"]], **_frame(m)})
                for n, m in zip(names, matches)]

    @cached_property
    def _val_test(self) -> tuple[list[str], list[str]]:
        return read_list(self.root / "val.list"), read_list(self.root / "test.list")

    def info(self) -> DatasetInfo:
        names = ["background", "RV", "Myo", "LV"] if self._k == 4 else None
        return DatasetInfo(self.name, self._k, 2, 1, False, names, eval_spatial_dims=3)

    @cached_property
    def _train_volumes(self) -> list[Item]:
        """Training volumes rebuilt from their slices (`<volume>_slice_K` stacked in K order)."""
        groups: dict[str, list[Item]] = {}
        for it in self._train:
            groups.setdefault(_SLICE.fullmatch(it.id)["volume"], []).append(it)
        return [Item(v, its[0].patient, True, its[0].source,
                     {"slices": [i.source for i in sorted(its, key=lambda i: i.meta["slice_index"])],
                      **({"frame": its[0].meta["frame"]} if "frame" in its[0].meta else {})})
                for v, its in groups.items()]

    @property
    def _restack(self) -> bool:
        return bool(getattr(self.cfg, "restack_volumes", False))

    def items(self, role):
        if role == "train":
            return list(self._train_volumes if self._restack else self._train)
        val, test = self._val_test
        return [Item(n, m["patient"], True, str(self._data / f"{n}.h5"), _frame(m))
                for n, m in ((n, _VOLUME.fullmatch(n)) for n in val + test)]

    def load(self, item: Item) -> dict:
        if "slices" in item.meta:
            parts = [read_h5(Path(p), 2, self._k, item.has_label) for p in item.meta["slices"]]
            shapes = {im.shape for im, _ in parts}
            if len(shapes) > 1:
                raise DataError(item.source, f"slices of {item.id} differ in shape {sorted(shapes)}",
                                "Volumes can only be restacked from slices of one size.")
            image = np.stack([im for im, _ in parts])
            label = np.stack([lb for _, lb in parts]) if item.has_label else None
            meta = {k: v for k, v in item.meta.items() if k != "slices"}
        else:
            dims = 2 if "slice_index" in item.meta else 3
            image, label = read_h5(Path(item.source), dims, self._k, item.has_label)
            meta = item.meta
        sample = {"image": image[None], "case": item.id, "patient": item.patient, "spacing": None, **meta}
        if label is not None:
            sample["label"] = label
        return sample

    def fixed_eval_splits(self) -> tuple[list[str], list[str]]:
        return self._val_test

    def protocol_splits(self, labeled: float, seed: int) -> Splits:
        """The first N slices of train_slices.list are labelled: N in slices (68, 136, ...) or patients (3, 7, ...)."""
        n = ACDC_PATIENT_SLICES.get(int(labeled), int(labeled)) if float(labeled).is_integer() else None
        if n not in ACDC_PATIENT_SLICES.values():
            raise UserError("split.labeled", f"{labeled:g} is not a size of the ACDC protocol",
                            f"Use labelled patients {sorted(ACDC_PATIENT_SLICES)} or slices "
                            f"{sorted(ACDC_PATIENT_SLICES.values())}, or split.protocol=false for a random patient split.")
        names = [it.id for it in self._train]
        if n > len(names):
            raise UserError("split.labeled", f"the protocol takes {n} slices but train_slices.list has {len(names)}",
                            "Use a smaller size or split.protocol=false.")
        val, test = self._val_test
        if self._restack:                         # volumes of the protocol's labelled slices
            lab_vol = {_SLICE.fullmatch(x)["volume"] for x in names[:n]}
            vols = [it.id for it in self._train_volumes]
            lab, unl = [v for v in vols if v in lab_vol], [v for v in vols if v not in lab_vol]
        else:
            lab, unl = names[:n], names[n:]
        meta = {"rule": "ACDC protocol: the first N slices of train_slices.list are labelled, the rest unlabelled; "
                        "val.list / test.list are val / test (the seed plays no part)",
                "labeled_slices": n, "labeled_patients": len({it.patient for it in self._train[:n]}),
                "unlabeled_slices": len(names) - n, "val_volumes": len(val), "test_volumes": len(test), "seed": seed}
        if self._restack:
            meta["restacked_volumes"] = {"labeled": len(lab), "unlabeled": len(unl)}
        return Splits(lab, unl, list(val), list(test), meta)
