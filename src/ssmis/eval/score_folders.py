"""Score a folder of predicted masks against a folder of reference masks, matched by case name.

Reads NIfTI, PNG/JPG/TIFF and SSL4MIS HDF5 (`label` dataset); writes `per_case.csv` and `summary.json`.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ssmis.errors import UserError
from ssmis.eval.metrics import case_metrics
from ssmis.eval.report import format_table, write_report

_NIFTI = (".nii.gz", ".nii")
_IMAGES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
_HDF5 = (".h5", ".hdf5")
_SUFFIXES = _NIFTI + _IMAGES + _HDF5
_REPORT_FILES = ("per_case.csv", "summary.json")
_NO_SPACING = "none (voxel units only)"


def score_folders(
    pred: str | Path,
    ref: str | Path,
    classes: Sequence[int] | None = None,
    out: str | Path | None = None,
    spacing: Sequence[float] | None = None,
    hd95: str = "pooled",
    empty_both: str = "skip",
    empty_one: str = "worst",
) -> int:
    """Score every prediction that has a reference of the same case name; print the table; return 0.

    A case name is the file name without its mask extension (`case01.nii.gz` -> `case01`), so formats may
    differ between the folders; unmatched files are listed on stderr and not scored. NIfTI arrays are read
    as D×H×W with zooms reversed. Spacing (mm, array axis order) comes from the reference NIfTI header, else
    from `spacing`, else distances are in voxels only. `classes` defaults to every non-zero reference label.

    Output goes to `out`, default `<pred>_eval` beside the prediction folder. It may never lie inside the
    reference folder, and existing report files are replaced only when an earlier ssmis run wrote them.
    """
    pred_dir, ref_dir = _folder(pred, "--pred"), _folder(ref, "--ref")
    pred_files, ref_files = _mask_files(pred_dir), _mask_files(ref_dir)
    cases = _match(pred_files, ref_files, pred_dir, ref_dir)
    out_dir = _out_dir(out, pred_dir, ref_dir)
    classes = list(classes) if classes else _reference_classes([ref_files[c] for c in cases])
    rows, sources = [], set()
    for case in tqdm(cases, desc="eval", unit="case", disable=None):
        p, r, case_spacing, source = _load_pair(pred_files[case], ref_files[case], spacing)
        sources.add(source)
        for row in case_metrics(p, r, classes, case_spacing, hd95, empty_both, empty_one):
            rows.append({"case": case, "patient": _patient(case), **row})
    summary = write_report(rows, out_dir, _conventions(hd95, empty_both, empty_one, sources, pred_dir, ref_dir))
    print(format_table(summary))
    print(f"wrote {out_dir / 'per_case.csv'} and {out_dir / 'summary.json'}")
    return 0


def _read_mask(path: Path) -> tuple[np.ndarray, tuple[float, ...] | None]:
    """Integer label array (D×H×W or H×W) and spacing in mm (array order; None when the format has none)."""
    name = path.name.lower()
    try:
        if name.endswith(_NIFTI):
            array, spacing = _read_nifti(path)
        elif name.endswith(_IMAGES):
            array, spacing = _read_image(path), None
        else:
            array, spacing = _read_hdf5(path), None
    except UserError:
        raise
    except Exception as e:
        raise UserError(str(path), f"cannot read this mask ({type(e).__name__}: {e})",
                        "Check that the file is complete and in the format its extension says.") from e
    if array.ndim not in (2, 3):
        raise UserError(str(path), f"mask has shape {array.shape}", "Masks must be 2D or 3D label maps.")
    if not np.issubdtype(array.dtype, np.integer):
        if not np.array_equal(array, np.rint(array)):
            raise UserError(str(path), "mask holds non-integer values", "Save label maps (argmax), not probabilities.")
        array = array.astype(np.int32)
    return array, spacing


def _read_nifti(path: Path) -> tuple[np.ndarray, tuple[float, ...]]:
    import nibabel as nib

    img = nib.load(path)
    data = np.asanyarray(img.dataobj)
    zooms = tuple(float(z) for z in img.header.get_zooms()[: data.ndim])
    while data.ndim > 2 and data.shape[-1] == 1:  # a 2D image saved as X×Y×1 stays 2D, as its PNG would
        data, zooms = data[..., 0], zooms[:-1]
    return data.T, zooms[::-1]


def _read_image(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        array = np.asarray(im)
    return array[..., 0] if array.ndim == 3 else array


def _read_hdf5(path: Path) -> np.ndarray:
    import h5py

    with h5py.File(path, "r") as f:
        if "label" not in f:
            raise UserError(str(path), f"no 'label' dataset (found: {', '.join(f.keys()) or 'none'})",
                            "HDF5 masks follow the SSL4MIS layout: store the mask as 'label'.")
        return f["label"][()]


def _folder(path: str | Path, flag: str) -> Path:
    folder = Path(path)
    if not folder.is_dir():
        raise UserError(str(folder), "folder not found", f"Check the {flag} path.")
    return folder.resolve()


def _mask_files(folder: Path) -> dict[str, Path]:
    files: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        suffix = next((s for s in _SUFFIXES if path.name.lower().endswith(s)), None)
        if suffix is None or not path.is_file():
            continue
        case = path.name[: -len(suffix)]
        if case in files:
            raise UserError(str(path), f"case '{case}' also has the file {files[case].name}", "Keep one file per case.")
        files[case] = path
    if not files:
        raise UserError(str(folder), f"no mask files ({', '.join(_SUFFIXES)})", "Point to the folder that holds the masks.")
    return files


def _match(pred_files: dict, ref_files: dict, pred_dir: Path, ref_dir: Path) -> list[str]:
    cases = sorted(pred_files.keys() & ref_files.keys())
    if not cases:
        raise UserError(str(pred_dir), f"no file name matches one in {ref_dir} (predictions: {_some(pred_files)}; "
                        f"references: {_some(ref_files)})", "Name each prediction after its reference case.")
    for names, what, where in ((pred_files.keys() - ref_files.keys(), "predictions have no reference", ref_dir),
                               (ref_files.keys() - pred_files.keys(), "references have no prediction", pred_dir)):
        if names:
            print(f"ssmis: warning: {len(names)} {what} in {where}, not scored: {_some(names)}", file=sys.stderr)
    return cases


def _some(names, limit: int = 5) -> str:
    names = sorted(names)
    return ", ".join(names[:limit]) + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def _out_dir(out: str | Path | None, pred_dir: Path, ref_dir: Path) -> Path:
    out_dir = Path(out).resolve() if out else pred_dir.parent / f"{pred_dir.name}_eval"
    if out_dir == ref_dir or ref_dir in out_dir.parents:
        raise UserError(str(out_dir), "output folder lies inside the reference folder", "Choose another --out.")
    existing = [out_dir / n for n in _REPORT_FILES if (out_dir / n).exists()]
    if existing and not _written_by_ssmis(out_dir / "summary.json"):
        raise UserError(str(existing[0]), "exists and was not written by ssmis", "Choose another --out or move the file.")
    if existing:
        print(f"ssmis: replacing the earlier evaluation in {out_dir}", file=sys.stderr)
    return out_dir


def _written_by_ssmis(summary: Path) -> bool:
    try:
        return str(json.loads(summary.read_text()).get("written_by", "")).startswith("ssmis")
    except (OSError, ValueError, AttributeError):
        return False


def _reference_classes(paths: list[Path]) -> list[int]:
    found: set[int] = set()
    for path in paths:
        found.update(int(v) for v in np.unique(_read_mask(path)[0]))
    found.discard(0)
    if not found:
        raise UserError(str(paths[0].parent), "the references hold only background", "Pass --classes to score anyway.")
    return sorted(found)


def _load_pair(pred_path: Path, ref_path: Path, spacing: Sequence[float] | None):
    pred, _ = _read_mask(pred_path)
    ref, header_spacing = _read_mask(ref_path)
    if pred.shape != ref.shape:
        raise UserError(str(pred_path), f"shape {pred.shape} differs from the reference {ref_path.name} {ref.shape}",
                        "Save predictions on the reference grid.")
    if header_spacing is not None:
        if spacing is not None and not np.allclose(spacing, header_spacing):
            print(f"ssmis: warning: {ref_path.name}: header spacing {header_spacing} used, not --spacing",
                  file=sys.stderr)
        return pred, ref, header_spacing, "reference NIfTI header"
    if spacing is None:
        return pred, ref, None, _NO_SPACING
    if len(spacing) != ref.ndim or min(spacing) <= 0:
        raise UserError("--spacing", f"{tuple(spacing)} does not fit {ref_path.name} of shape {ref.shape}",
                        "Give one positive value in mm per array axis (D H W or H W).")
    return pred, ref, tuple(float(s) for s in spacing), "--spacing"


def _patient(case: str) -> str:
    """ACDC `patient001_frame01` belongs to `patient001`; any other case is its own patient."""
    return re.sub(r"_frame\d+$", "", case)


def _conventions(hd95, empty_both, empty_one, sources, pred_dir, ref_dir) -> dict:
    return {
        "hd95": hd95,
        "percentile": "95th, numpy linear interpolation",
        "asd": "mean distance from the predicted to the reference surface (medpy asd)",
        "surface": "mask XOR its connectivity-1 erosion, image outside = background (medpy)",
        "empty_both": empty_both,
        "empty_one": empty_one,
        "empty_one_worst": "Dice 0, Jaccard 0, HD95 = ASD = image diagonal in the column's unit",
        "units": {"*_vox": "voxels", "*_mm": "mm" if sources - {_NO_SPACING} else "NaN: spacing unknown"},
        "spacing_source": sorted(sources),
        "pred": str(pred_dir),
        "ref": str(ref_dir),
    }
