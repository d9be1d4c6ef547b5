"""Write the phantom in each on-disk layout: fixtures for the adapter tests and small examples of every layout."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
from PIL import Image
from skimage import draw

from ssmis.data.hc18 import CSV_NAME, HC_COL, PIXEL_COL, ramanujan_perimeter
from ssmis.data.phantom import CLASS_NAMES, phantom_volume

Case = tuple[str, np.ndarray, np.ndarray, tuple[float, float, float]]


def phantom_cases(patients: int = 6, slices: int = 6, size: int = 32, seed: int = 0) -> list[Case]:
    """(case, image D×H×W float32, label D×H×W uint8, spacing (D, H, W) mm) per patient, as the layouts store them.
    The W spacing is made 0.8 of H so that every axis differs (catches axis swaps)."""
    cases = []
    for i in range(patients):
        img, lab, (sd, sh, sw) = phantom_volume(seed + i, slices, size)
        cases.append((f"patient{i + 1:03d}", img, lab, (sd, sh, 0.8 * sw)))
    return cases


def nifti_affine(spacing: tuple[float, float, float]) -> np.ndarray:
    """A non-identity affine (x flipped, shifted origin) with the zooms of `spacing` (D, H, W)."""
    return np.array([[-spacing[2], 0, 0, 12.5], [0, spacing[1], 0, -30.0], [0, 0, spacing[0], 4.0], [0, 0, 0, 1]])


LA_FORMS = ("flat", "bcp", "uamt")


def write_phantom(root: str | Path, layout: str, patients: int = 6, slices: int = 6, size: int = 32, seed: int = 0,
                  *, outline: bool = False, msd: bool = False, la_form: str = "flat") -> Path:
    """Write `patients` phantom patients under `root` in `layout`; returns `root` (la_h5 "uamt": the case folder).

    ssl4mis_h5 / la_h5: all but the last two patients train (slices resp. volumes), the last two evaluate.
    la_h5 `la_form`: "flat" (`<case>/mri_norm2.h5` beside the lists, cases named patientNNN); the public forms, with
    20-character case ids and volumes stored x, y, z (z = the slices) as LA's are: "bcp" (`train.list`, `test.list`
    and `2018LA_Seg_Training Set/<case>/mri_norm2.h5` in `root`) and "uamt" (the same files; the returned root is
    the `2018LA_Seg_Training Set` folder, the lists one level up, as UA-MT's --root_path).
    nnunet: the last patient goes to imagesTs/ (no label); two channels (image, 1 - image); `msd` writes the
    Decathlon form (one 4D file per case). folders: PNG slices, the last patient without masks.
    hc18: ellipses on (2·size)² images, subject 001 with a second view; `outline` writes thin outlines with a gap.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    if layout == "hc18":
        _hc18(root, patients, 2 * size, seed, outline)
    elif layout == "la_h5" and la_form != "flat":
        return _la_public(root, phantom_cases(patients, slices, size, seed), la_form)
    else:
        {"ssl4mis_h5": _ssl4mis, "la_h5": _la, "nnunet": _nnunet, "folders": _folders}[layout](
            root, phantom_cases(patients, slices, size, seed), msd=msd)
    return root


def _h5(path: Path, image: np.ndarray, label: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        f["image"], f["label"] = image, label


def _lines(path: Path, names: list[str]) -> None:
    path.write_text("".join(f"{n}\n" for n in names))


def _ssl4mis(root: Path, cases: list[Case], **_) -> None:
    slices = []
    for case, img, lab, _ in cases[:-2]:
        for d in range(len(img)):
            slices.append(f"{case}_frame01_slice_{d + 1}")
            _h5(root / "data" / f"{slices[-1]}.h5", img[d], lab[d])
    for case, img, lab, _ in cases[-2:]:
        _h5(root / "data" / f"{case}_frame01.h5", img, lab)
    _lines(root / "train_slices.list", slices)
    _lines(root / "train.list", [f"{c[0]}_frame01" for c in cases[:-2]])
    _lines(root / "val.list", [f"{cases[-2][0]}_frame01"])
    _lines(root / "test.list", [f"{cases[-1][0]}_frame01"])


def _la(root: Path, cases: list[Case], **_) -> None:
    for case, img, lab, _ in cases:
        _h5(root / case / "mri_norm2.h5", img, (lab > 0).astype(np.uint8))
    _lines(root / "train.list", [c[0] for c in cases[:-2]])
    _lines(root / "test.list", [c[0] for c in cases[-2:]])


def la_case_ids(n: int, seed: int = 0) -> list[str]:
    """`n` case ids shaped like LA's (20 upper-case letters and digits)."""
    rng = np.random.default_rng(seed)
    chars = np.array(list("ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"))
    return ["".join(rng.choice(chars, 20)) for _ in range(n)]


def _la_public(root: Path, cases: list[Case], form: str) -> Path:
    if form not in LA_FORMS:
        raise ValueError(f"la_form {form!r} is not one of {LA_FORMS}")
    from ssmis.data.la_h5 import CASE_FOLDER, VOLUME

    ids = la_case_ids(len(cases))
    for cid, (_, img, lab, _) in zip(ids, cases):
        _h5(root / CASE_FOLDER / cid / VOLUME, img.transpose(1, 2, 0), (lab > 0).astype(np.uint8).transpose(1, 2, 0))
    _lines(root / "train.list", ids[:-2])
    _lines(root / "test.list", ids[-2:])
    return root / CASE_FOLDER if form == "uamt" else root


def _nifti(path: Path, arr: np.ndarray, spacing: tuple) -> None:
    """Save a D×H×W (or C×D×H×W) array as NIfTI (X, Y, Z[, C])."""
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(arr.transpose(*range(arr.ndim)[::-1]), nifti_affine(spacing)), path)


def _nnunet(root: Path, cases: list[Case], msd: bool = False, **_) -> None:
    for i, (case, img, lab, sp) in enumerate(cases):
        part = "Ts" if i == len(cases) - 1 else "Tr"
        channels = np.stack([img, 1 - img])
        if msd:
            _nifti(root / f"images{part}" / f"{case}.nii.gz", channels, sp)
        else:
            for c, chan in enumerate(channels):
                _nifti(root / f"images{part}" / f"{case}_{c:04d}.nii.gz", chan, sp)
        if part == "Tr":
            _nifti(root / "labelsTr" / f"{case}.nii.gz", lab, sp)
    if msd:
        spec = {"modality": {"0": "phantom", "1": "inverted"}, "labels": {str(i): n for i, n in enumerate(CLASS_NAMES)},
                "training": [{"image": f"./imagesTr/{c[0]}.nii.gz", "label": f"./labelsTr/{c[0]}.nii.gz"} for c in cases[:-1]],
                "test": [f"./imagesTs/{cases[-1][0]}.nii.gz"]}
    else:
        spec = {"channel_names": {"0": "phantom", "1": "inverted"}, "labels": {n: i for i, n in enumerate(CLASS_NAMES)},
                "numTraining": len(cases) - 1, "file_ending": ".nii.gz"}
    (root / "dataset.json").write_text(json.dumps(spec, indent=1))


def _folders(root: Path, cases: list[Case], **_) -> None:
    (root / "images").mkdir(exist_ok=True)
    (root / "masks").mkdir(exist_ok=True)
    for i, (case, img, lab, _) in enumerate(cases):
        for d in range(len(img)):
            name = f"{case}__s{d:02d}.png"
            Image.fromarray(np.round(img[d] * 255).astype(np.uint8)).save(root / "images" / name)
            if i < len(cases) - 1:
                Image.fromarray(lab[d]).save(root / "masks" / name)


def _ellipse_points(xc: float, yc: float, a: float, b: float, theta: float, n: int) -> np.ndarray:
    """n points (x, y) on an ellipse (skimage's EllipseModel parametrisation)."""
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    return np.stack([xc + a * np.cos(theta) * np.cos(t) - b * np.sin(theta) * np.sin(t),
                     yc + a * np.sin(theta) * np.cos(t) + b * np.cos(theta) * np.sin(t)], axis=1)


def _hc18(root: Path, subjects: int, size: int, seed: int, outline: bool) -> None:
    rng = np.random.default_rng(seed)
    folder = root / "training_set"
    folder.mkdir(exist_ok=True)
    rows = []
    for i in range(subjects):
        for view in [""] + ["2"] * (i == 0):
            name = f"{i + 1:03d}_{view}HC"
            a, b = rng.uniform(0.30, 0.42) * size, rng.uniform(0.20, 0.28) * size
            xy = _ellipse_points(size / 2 + rng.uniform(-2, 2), size / 2 + rng.uniform(-2, 2), a, b, rng.uniform(0, np.pi), 64 * size)
            filled = np.zeros((size, size), bool)
            filled[draw.polygon(xy[:, 1], xy[:, 0], filled.shape)] = True
            image = np.clip(60 + 90 * filled + rng.normal(0, 20, filled.shape), 0, 255).astype(np.uint8)
            Image.fromarray(image).save(folder / f"{name}.png")
            if outline:   # one-pixel outline with a gap of ~1/20 of the perimeter, as a grey PNG
                ann = np.zeros((size, size), np.uint8)
                keep = np.round(xy[len(xy) // 20:]).astype(int)
                ann[keep[:, 1], keep[:, 0]] = 255
            else:         # filled, RGB with values 0 / 255 like the project's copy of HC18
                ann = np.repeat(filled[..., None] * np.uint8(255), 3, axis=2)
            Image.fromarray(ann).save(folder / f"{name}_Annotation.png")
            px = rng.uniform(0.05, 0.35)
            rows.append({"filename": f"{name}.png", PIXEL_COL: px, HC_COL: ramanujan_perimeter(a, b) * px})
    with open(root / CSV_NAME, "w", newline="") as f:
        writer = csv.DictWriter(f, ["filename", PIXEL_COL, HC_COL])
        writer.writeheader()
        writer.writerows(rows)
