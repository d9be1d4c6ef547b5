"""In-memory training sets, every case decoded once: 2D slices resized to the patch (SliceSet), or whole 3D
volumes from which patches are sampled per draw (VolumeSet). Both hand out augmented batches."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from ssmis.data.adapter import Adapter, Item
from ssmis.data.augment import intensity_jitter, random_geometry, random_geometry_3d
from ssmis.data.resample import build_source_slice_set
from ssmis.data.resize import pad_to_square, resize2d
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

    def to(self, device: torch.device) -> "SliceSet":
        return SliceSet(self.images.to(device), None if self.labels is None else self.labels.to(device),
                        self.cases, self.slice_index, self.num_slices)

    def batch(self, idx: Tensor, gen: torch.Generator, augment: str, intensity: float = 0.0):
        img, lab = random_geometry(self.images[idx], None if self.labels is None else self.labels[idx], gen, augment)
        return intensity_jitter(img, gen, intensity), lab, self.slice_index[idx], self.num_slices[idx]


@dataclass
class VolumeSet:
    """Whole volumes (C×D×H×W, sizes may differ); each draw crops a patch, a share of them centred on foreground."""

    images: list[Tensor]
    labels: list[Tensor] | None
    cases: list[str]
    patch: tuple[int, int, int]
    fg_fraction: float = 0.33
    plane: tuple[int, int] = (1, 2)      # spatial axes of the rot90/flip augmentation

    def __len__(self) -> int:
        return len(self.images)

    def _crop(self, i: int, gen: torch.Generator) -> tuple[Tensor, Tensor | None]:
        img = self.images[i]
        lab = None if self.labels is None else self.labels[i]
        pad = [max(0, p - s) for p, s in zip(self.patch, img.shape[1:])]
        if any(pad):                              # volumes smaller than the patch: zero-pad symmetrically
            flat = [x for a in reversed(pad) for x in (a // 2, a - a // 2)]
            img = torch.nn.functional.pad(img, flat)
            lab = None if lab is None else torch.nn.functional.pad(lab, flat)
        size = img.shape[1:]
        want_fg = lab is not None and float(torch.rand(1, generator=gen)) < self.fg_fraction
        fg = torch.nonzero(lab) if want_fg else None
        starts = []
        for ax, (p, s) in enumerate(zip(self.patch, size)):
            if fg is not None and len(fg):
                c = int(fg[int(torch.randint(len(fg), (1,), generator=gen)), ax])
                starts.append(min(max(c - p // 2, 0), s - p))
            else:
                starts.append(int(torch.randint(s - p + 1, (1,), generator=gen)))
        sl = tuple(slice(a, a + p) for a, p in zip(starts, self.patch))
        return img[(slice(None),) + sl], None if lab is None else lab[sl]

    def batch(self, idx: Tensor, gen: torch.Generator, augment: str, intensity: float = 0.0):
        crops = [self._crop(int(i), gen) for i in idx]
        img = torch.stack([c[0] for c in crops])
        lab = None if self.labels is None else torch.stack([c[1] for c in crops])
        img, lab = random_geometry_3d(img, lab, gen, augment, self.plane)
        none = torch.full((len(idx),), -1)
        return intensity_jitter(img, gen, intensity), lab, none, none


def build_volume_set(adapter: Adapter, items: list[Item], patch: tuple[int, int, int], labeled: bool,
                     fg_fraction: float = 0.33, desc: str = "", plane: tuple[int, int] = (1, 2)) -> VolumeSet:
    if not items:
        raise UserError("split", f"the {desc or 'training'} set is empty", "Check split.labeled and the data.")
    imgs, labs, cases = [], [], []
    for it in tqdm(items, desc=f"loading {desc}", leave=False, disable=len(items) < 20):
        sample = adapter.load(it)
        if sample["image"].ndim != 4:
            raise UserError(it.source, f"a 3D patch {list(patch)} needs volumes, this case is 2D",
                            "Use a 2D data.patch_size (slice-wise training) or a 3D dataset.")
        imgs.append(torch.from_numpy(np.ascontiguousarray(sample["image"], np.float32)))
        if labeled:
            if sample.get("label") is None:
                raise UserError(it.source, "a labelled case has no label", "Check the dataset or the split.")
            labs.append(torch.from_numpy(np.ascontiguousarray(sample["label"], np.int64)))
        cases.append(it.id)
    largest = np.max([im.shape[1:] for im in imgs], axis=0)
    for ax, (p, m) in enumerate(zip(patch, largest)):
        if p > m:
            raise UserError("data.patch_size", f"patch {list(patch)} is larger than every volume along axis {ax} "
                            f"(largest {m})", f"Use a patch of at most {list(largest)} (smaller volumes are padded).")
    return VolumeSet(imgs, labs if labeled else None, cases, tuple(patch), fg_fraction, tuple(plane))


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


def decoded_slices(adapter: Adapter, items: list[Item], labeled: bool, slice_axis: int = 0, desc: str = ""):
    """Every 2D slice of the items, each case decoded once: (item, image C×h×w, label h×w or None, position,
    count)."""
    if not items:
        raise UserError("split", f"the {desc or 'training'} set is empty", "Check split.labeled and the data.")
    for it in tqdm(items, desc=f"loading {desc}", leave=False, disable=len(items) < 50):
        sample = adapter.load(it)
        if labeled and sample.get("label") is None:
            raise UserError(it.source, "a labelled case has no label", "Check the dataset or the split.")
        for im, lb, k, n in _slices(sample, slice_axis):
            yield it, im, lb, k, n


def build_slice_set(adapter: Adapter, items: list[Item], patch: tuple[int, int], labeled: bool,
                    slice_axis: int = 0, image_order: int = 0, desc: str = "", pad_square: bool = False,
                    augment_at: str = "patch"):
    """The 2D training set: slices kept at their own size (`augment_at=source`, see data/resample.py) or
    resized to the patch at load (`patch`)."""
    slices = decoded_slices(adapter, items, labeled, slice_axis, desc)
    if augment_at == "source":
        return build_source_slice_set(slices, patch, labeled, image_order, pad_square)
    imgs, labs, cases, pos, nums = [], [], [], [], []
    for it, im, lb, k, n in slices:
        if pad_square:
            im = pad_to_square(im)[0]
            lb = None if lb is None else pad_to_square(lb)[0]
        imgs.append(resize2d(im, patch, image_order).astype(np.float32))
        if labeled:
            labs.append(resize2d(lb, patch, 0).astype(np.int64))
        cases.append(it.id)
        pos.append(k)
        nums.append(n)
    return SliceSet(torch.from_numpy(np.stack(imgs)), torch.from_numpy(np.stack(labs)) if labeled else None,
                    cases, torch.tensor(pos), torch.tensor(nums))
