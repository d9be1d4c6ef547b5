"""nnU-Net v2 and Medical Segmentation Decathlon folders (`dataset.json`, `imagesTr/`, `labelsTr/`, `imagesTs/`).

NIfTI (X, Y, Z) arrays become D×H×W (`transpose(2, 1, 0)`) with the zooms reversed into `spacing`; the affine
travels in the sample (`affine`) for writing predictions. Intensities are returned as stored (float32, not normalised).
"""

from __future__ import annotations

import json
import zlib
from functools import cached_property
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.filebasedimages import ImageFileError

from ssmis.data.adapter import Adapter, DataError, DatasetInfo, Item, as_label
from ssmis.registry import LAYOUTS

_NIFTI_ERRORS = (OSError, EOFError, ValueError, zlib.error, ImageFileError)


def read_nifti(path: Path) -> tuple[np.ndarray, tuple[float, ...], np.ndarray]:
    """(array C×D×H×W, spacing (mm, D, H, W order), affine): 3D files get C = 1, 4D files (X, Y, Z, C) keep C."""
    try:
        img = nib.load(str(path), mmap=True)
        arr = np.asarray(img.dataobj)
    except FileNotFoundError:
        raise DataError(str(path), "file not found", "Each case needs every channel file (and its label in labelsTr/).") from None
    except _NIFTI_ERRORS as e:
        raise DataError(str(path), f"cannot read NIfTI ({e})", "Re-copy the file.") from None
    if arr.ndim not in (2, 3, 4):
        raise DataError(str(path), f"has {arr.ndim} axes", "Expected a 2D, 3D or 4D (X, Y, Z, channel) NIfTI.")
    arr = arr[:, :, None] if arr.ndim == 2 else arr         # (X, Y) -> (X, Y, 1)
    arr = arr[..., None] if arr.ndim == 3 else arr          # -> (X, Y, Z, C)
    zooms = (tuple(float(z) for z in img.header.get_zooms()[:3]) + (1.0, 1.0))[:3]
    return np.ascontiguousarray(arr.transpose(3, 2, 1, 0)), zooms[::-1], img.affine


@LAYOUTS.register("nnunet")
class NNUNetAdapter(Adapter):
    """Labelled cases from imagesTr/ + labelsTr/; imagesTs/ cases (no labels) are unlabelled training items.
    nnU-Net v2 keeps one file per channel (`CASE_0000`, `CASE_0001`, ...), the Decathlon one 4D file per case.
    patient = case id. Datasets whose volumes have one slice (Z = 1) are read as 2D.
    """

    name = "nnunet"

    @classmethod
    def detect(cls, root: Path) -> bool:
        return (root / "dataset.json").is_file() and (root / "imagesTr").is_dir()

    @cached_property
    def _spec(self) -> dict:
        path = self.root / "dataset.json"
        try:
            spec = json.loads(path.read_text())
            msd = "modality" in spec and "channel_names" not in spec
            channels = spec["modality"] if msd else spec["channel_names"]
            raw = spec["labels"]
            labels = {int(k): str(v) for k, v in raw.items()} if msd else {int(v): str(k) for k, v in raw.items()}
        except FileNotFoundError:
            raise DataError(str(path), "file not found", "An nnU-Net folder needs dataset.json.") from None
        except json.JSONDecodeError as e:
            raise DataError(str(path), f"not valid JSON ({e.msg})", "Fix the file.") from None
        except KeyError as e:
            raise DataError(str(path), f"missing key {e}", "nnU-Net v2 needs channel_names and labels (Decathlon: modality, labels).") from None
        except (TypeError, ValueError):
            raise DataError(str(path), "labels must map to integer values", "Region-based labels are not supported.") from None
        if sorted(labels) != list(range(len(labels))):
            raise DataError(str(path), f"label values {sorted(labels)} are not 0..K-1", "Number the classes consecutively.")
        ending = ".nii.gz" if msd else spec.get("file_ending", ".nii.gz")
        if ending not in (".nii.gz", ".nii"):
            raise DataError(str(path), f"file_ending {ending!r} is not NIfTI", "Use the folders layout for PNG/TIFF images.")
        return {"msd": msd, "channels": len(channels), "labels": labels, "ending": ending}

    def _cases(self, folder: Path, labelled: bool) -> list[Item]:
        if not folder.is_dir():
            return []
        s, ending = self._spec, self._spec["ending"]
        suffix = ending if s["msd"] else f"_0000{ending}"
        cases = sorted(p.name[: -len(suffix)] for p in folder.iterdir()
                       if p.name.endswith(suffix) and not p.name.startswith("."))
        chans = [ending] if s["msd"] else [f"_{c:04d}{ending}" for c in range(s["channels"])]
        items = []
        for case in cases:
            label = self.root / "labelsTr" / f"{case}{ending}"
            has = labelled and label.exists()
            meta = {"images": [str(folder / f"{case}{c}") for c in chans], **({"label": str(label)} if has else {})}
            items.append(Item(case, case, has, str(folder / f"{case}{chans[0]}"), meta))
        return items

    @cached_property
    def _items(self) -> list[Item]:
        items = self._cases(self.root / "imagesTr", True) + self._cases(self.root / "imagesTs", False)
        if not items:
            raise DataError(str(self.root / "imagesTr"), f"no images ending in {self._spec['ending']}", "Check the folder.")
        return items

    @cached_property
    def _dims(self) -> int:
        """2 when the first readable image has one slice (Z = 1), else 3 (a broken file is left to load())."""
        for it in self._items:
            try:
                shape = nib.load(it.meta["images"][0]).shape
            except _NIFTI_ERRORS:
                continue
            return 2 if len(shape) == 2 or shape[2] == 1 else 3
        raise DataError(str(self.root / "imagesTr"), "no readable image", "Re-copy the dataset.")

    @cached_property
    def _k(self) -> int:
        return getattr(self.cfg, "num_classes", None) or len(self._spec["labels"])

    def info(self) -> DatasetInfo:
        labels = self._spec["labels"]
        return DatasetInfo(self.name, self._k, self._dims, self._spec["channels"], True,
                           [labels[i] for i in range(len(labels))] if self._k == len(labels) else None)

    def items(self, role):
        return list(self._items) if role == "train" else [it for it in self._items if it.has_label]

    def load(self, item: Item) -> dict:
        parts = [read_nifti(Path(f)) for f in item.meta["images"]]
        for f, (arr, _, _) in zip(item.meta["images"], parts):
            if arr.shape[1:] != parts[0][0].shape[1:]:
                raise DataError(f, f"size {arr.shape[1:]} differs from the first channel's {parts[0][0].shape[1:]}", "Check the file.")
        image = np.concatenate([arr for arr, _, _ in parts]).astype(np.float32, copy=False)
        if image.shape[0] != self._spec["channels"]:
            raise DataError(item.source, f"has {image.shape[0]} channels, dataset.json declares {self._spec['channels']}",
                            "Fix dataset.json or the image.")
        spacing, affine = parts[0][1], parts[0][2]
        sample = {"image": image, "case": item.id, "patient": item.patient, "spacing": spacing, "affine": affine}
        if item.has_label:
            arr, _, _ = read_nifti(Path(item.meta["label"]))
            if arr.shape[1:] != image.shape[1:]:
                raise DataError(item.meta["label"], f"size {arr.shape[1:]} differs from its image's {image.shape[1:]}",
                                "Labels must have their image's size.")
            sample["label"] = as_label(arr[0], item.meta["label"], len(self._spec["labels"]))
        if self._dims == 2:
            if image.shape[1] != 1:
                raise DataError(item.source, f"has {image.shape[1]} slices in a 2D dataset", "Use one slice per file.")
            sample["image"], sample["spacing"] = image[:, 0], spacing[1:]
            if "label" in sample:
                sample["label"] = sample["label"][0]
        return sample
