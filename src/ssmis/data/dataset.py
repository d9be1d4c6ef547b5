"""In-memory training sets: every labelled/unlabelled case decoded once, sliced and resized to the patch."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from ssmis.data.adapter import Adapter, Item
from ssmis.data.resize import resize2d
from ssmis.errors import UserError


@dataclass
class SliceSet:
    """N training slices at patch size; `labels` is None for an unlabelled set (labels are never carried)."""

    images: Tensor                 # N×C×H×W float32
    labels: Tensor | None          # N×H×W int64
    cases: list[str]
    slice_index: Tensor            # N (position in the volume, -1 for 2D images)
    num_slices: Tensor             # N

    def __len__(self) -> int:
        return self.images.shape[0]


def _slices(sample: dict, axis: int) -> list[tuple[np.ndarray, np.ndarray | None, int, int]]:
    img, lab = sample["image"], sample.get("label")
    if img.ndim == 3:                                   # C×H×W: one 2D image
        return [(img, lab, int(sample.get("slice_index", -1)), int(sample.get("num_slices", 1)))]
    n = img.shape[1 + axis]
    out = []
    for k in range(n):
        im = np.take(img, k, axis=1 + axis)
        lb = None if lab is None else np.take(lab, k, axis=axis)
        out.append((im, lb, k, n))
    return out


def build_slice_set(adapter: Adapter, items: list[Item], patch: tuple[int, int], labeled: bool,
                    slice_axis: int = 0, image_order: int = 0, desc: str = "") -> SliceSet:
    if not items:
        raise UserError("split", f"the {desc or 'training'} set is empty", "Check split.labeled and the data.")
    imgs, labs, cases, pos, nums = [], [], [], [], []
    for it in tqdm(items, desc=f"loading {desc}", leave=False, disable=len(items) < 50):
        sample = adapter.load(it)
        if labeled and sample.get("label") is None:
            raise UserError(it.source, "a labelled case has no label", "Check the dataset or the split.")
        for im, lb, k, n in _slices(sample, slice_axis):
            imgs.append(resize2d(im, patch, image_order).astype(np.float32))
            if labeled:
                labs.append(resize2d(lb, patch, 0).astype(np.int64))
            cases.append(it.id)
            pos.append(k)
            nums.append(n)
    return SliceSet(torch.from_numpy(np.stack(imgs)), torch.from_numpy(np.stack(labs)) if labeled else None,
                    cases, torch.tensor(pos), torch.tensor(nums))
