"""`ssmis data check`: detect the layout, read every file, print a summary and one line per problem."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ssmis.data.adapter import DatasetInfo, Item, make_adapter
from ssmis.errors import UserError


class _Stats:
    """Running summary of the samples read: shapes and spacings (min/max per length), class voxel counts."""

    def __init__(self, info: DatasetInfo, num_classes: int):
        self.info, self.k = info, num_classes
        self.dims = {info.spatial_dims, info.eval_spatial_dims or info.spatial_dims}
        self.counts = np.zeros(num_classes, np.int64)
        self.shapes: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self.spacings: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    @staticmethod
    def _extend(table: dict, values) -> None:
        v = np.asarray(values, float)
        lo, hi = table.get(len(v), (v, v))
        table[len(v)] = (np.minimum(lo, v), np.maximum(hi, v))

    def add(self, sample: dict, item: Item) -> list[str]:
        """Record one sample and return its problems (`file: what`)."""
        image, label, src = sample["image"], sample.get("label"), item.source
        if image.ndim - 1 not in self.dims:
            return [f"{src}: image has shape {image.shape}, expected channels + {sorted(self.dims)} spatial axes"]
        problems = []
        self._extend(self.shapes, image.shape)
        if not np.isfinite(image).all():
            problems.append(f"{src}: image holds NaN or infinite values")
        if label is not None:
            if label.shape != image.shape[1:]:
                problems.append(f"{src}: label shape {label.shape} differs from image shape {image.shape[1:]}")
            elif label.size and (label.min() < 0 or label.max() >= self.k):
                bad = sorted(set(np.unique(label).tolist()) - set(range(self.k)))
                problems.append(f"{src}: label values {bad[:5]} outside the classes 0..{self.k - 1}")
            else:
                self.counts += np.bincount(label.ravel(), minlength=self.k)
        if sample.get("spacing") is not None:
            self._extend(self.spacings, sample["spacing"])
        elif self.info.spacing_known:
            problems.append(f"{src}: no voxel spacing")
        return problems


def _fmt(v: np.ndarray, unit_int: bool) -> str:
    return "×".join(f"{int(x)}" if unit_int else f"{x:.3g}" for x in v)


def _describe(items: list[Item], dims: int) -> str:
    if dims == 3:
        return "volumes"
    return "slices" if any("slice_index" in it.meta for it in items) else "images"


def _patients(items: list[Item]) -> int:
    return len({it.patient for it in items})


def check_dataset(root: str | Path, layout: str = "auto", num_classes: int | None = None) -> int:
    """Read every case of the dataset at `root`; print a summary and the problems. Returns 0 (none) or 1."""
    from ssmis.config.schema import DataConfig

    if num_classes is not None and num_classes < 2:
        raise UserError("--num-classes", f"{num_classes} is too few", "Count the classes with the background (at least 2).")
    adapter = make_adapter(layout, root, DataConfig(layout=layout, root=str(root), num_classes=num_classes))
    info = adapter.info()
    train, evals = adapter.items("train"), adapter.items("eval")
    items = list({it.id: it for it in train + evals}.values())
    if not items:
        raise UserError(str(root), "no cases found", "Check the dataset folder.")
    k = num_classes or info.num_classes
    stats, problems, unread = _Stats(info, k), [], 0
    start = time.perf_counter()
    for it in tqdm(items, desc="reading", unit="case", file=sys.stderr, disable=None, leave=False):
        try:
            sample = adapter.load(it)
        except UserError as e:
            problems.append(str(e))
            unread += 1
            continue
        except Exception as e:  # noqa: BLE001  (one broken file must not stop the check of the others)
            problems.append(f"{it.source}: {type(e).__name__}: {e}")
            unread += 1
            continue
        problems += stats.add(sample, it)
    seconds = time.perf_counter() - start

    same = {it.id for it in train} == {it.id for it in evals}
    n_unit = _describe(train, info.spatial_dims)
    e_unit = _describe(evals, info.eval_spatial_dims or info.spatial_dims)
    print(f"layout     {info.layout} ({root})")
    if getattr(adapter, "case_folder", None) is not None:
        print(f"files      {adapter.case_folder}")
    print(f"cases      {len(train)} {n_unit}" if same else f"cases      {len(train)} training {n_unit}, {len(evals)} eval {e_unit}")
    print(f"patients   {_patients(train)}" if same else f"patients   {_patients(train)} training, {_patients(evals)} eval")
    read = len(items) - unread
    print(f"read       {read} of {len(items)} cases in {seconds:.1f} s"
          + (f"; {unread} could not be read (problems below), the numbers below leave them out" if unread else ""))
    for n, (lo, hi) in sorted(stats.shapes.items()):
        print(f"shape      {n - 1}D  min {_fmt(lo, True)}  max {_fmt(hi, True)}")
    names = info.class_names if info.class_names and len(info.class_names) == k else None
    total = max(int(stats.counts.sum()), 1)
    if not read:
        print("classes    none counted (no case could be read)")
    for c, count in enumerate(stats.counts if read else []):
        name = f"{c} {names[c]}" if names else str(c)
        print(f"{'classes' if c == 0 else '':11s}{name}: {count} voxels ({100 * count / total:.2f} %)")
    for n, (lo, hi) in sorted(stats.spacings.items()):
        print(f"spacing    min {_fmt(lo, False)}  max {_fmt(hi, False)} mm")
    if not info.spacing_known:
        print(f"spacing    warning: the {info.layout} layout stores no spacing; distances will be in pixels/voxels "
              "unless a known spacing is stated with data.spacing")
    for p in problems:
        print(f"problem    {p}")
    print(f"{len(problems)} problem{'' if len(problems) == 1 else 's'}")
    return 1 if problems else 0
