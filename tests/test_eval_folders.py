"""`ssmis eval --pred --ref` on NIfTI, PNG and HDF5 folders: values, report files and user errors."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pytest
from PIL import Image
from test_metrics import brute_metrics

from ssmis.cli import main

ACDC = Path(__file__).resolve().parents[2] / "shared" / "data" / "ACDC"


def box_labels(shape, shift: int = 0) -> np.ndarray:
    """Class 1: a box shifted by `shift` voxels along the last axis; class 2: a fixed box."""
    labels = np.zeros(shape, np.uint8)
    inner = tuple(slice(1, n - 1) for n in shape[:-1])
    labels[inner + (slice(3 + shift, 9 + shift),)] = 1
    labels[inner + (slice(12, 15),)] = 2
    return labels


def save_nifti(path: Path, labels: np.ndarray, spacing) -> None:
    """Save a D×H×W array the NIfTI way: X×Y×Z with the zooms reversed."""
    nib.save(nib.Nifti1Image(labels.T.copy(), np.diag([*spacing[::-1], 1.0])), path)


def save_h5(path: Path, labels: np.ndarray) -> None:
    with h5py.File(path, "w") as f:
        f.create_dataset("label", data=labels)


def read_rows(folder: Path) -> list[dict]:
    with open(folder / "per_case.csv", newline="") as f:
        return list(csv.DictReader(f))


def one_error_line(capsys) -> str:
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("ssmis: error:")]
    assert len(lines) == 1, lines
    return lines[0]


def eval_cli(pred: Path, ref: Path, *extra: str) -> int:
    return main(["eval", "--pred", str(pred), "--ref", str(ref), *extra])


@pytest.fixture
def nifti_folders(tmp_path):
    pred, ref = tmp_path / "pred", tmp_path / "ref"
    pred.mkdir(), ref.mkdir()
    spacing = (2.5, 1.0, 0.7)
    for case in ("case01", "case02"):
        save_nifti(ref / f"{case}.nii.gz", box_labels((6, 10, 18)), spacing)
        save_nifti(pred / f"{case}.nii.gz", box_labels((6, 10, 18), shift=2), spacing)
    return pred, ref


def test_nifti_folders_use_header_spacing_in_array_order(nifti_folders, capsys):
    pred, ref = nifti_folders
    assert eval_cli(pred, ref) == 0
    out = pred.parent / "pred_eval"
    rows = read_rows(out)
    assert [(r["case"], r["class"]) for r in rows] == [("case01", "1"), ("case01", "2"), ("case02", "1"), ("case02", "2")]
    shifted, fixed = rows[0], rows[1]
    assert float(shifted["dice"]) == pytest.approx(4 / 6) and float(shifted["jaccard"]) == pytest.approx(0.5)
    assert float(shifted["hd95_vox"]) == pytest.approx(2.0) and float(shifted["hd95_mm"]) == pytest.approx(1.4)
    assert float(fixed["dice"]) == 1.0 and float(fixed["hd95_mm"]) == 0.0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["conventions"]["spacing_source"] == ["reference NIfTI header"]
    assert summary["conventions"]["hd95"] == "pooled" and summary["counts"]["cases"] == 2
    assert summary["per_class"]["1"]["hd95_mm"]["mean"] == pytest.approx(1.4)
    assert summary["mean"]["dice"] == pytest.approx((4 / 6 + 1) / 2)
    stdout = capsys.readouterr().out
    assert "HD95 (mm)" in stdout and "0.8333" in stdout


def test_rerun_replaces_own_report_but_not_foreign_files(nifti_folders, capsys):
    pred, ref = nifti_folders
    assert eval_cli(pred, ref) == 0 and eval_cli(pred, ref) == 0
    assert not list((pred.parent / "pred_eval").glob("*.tmp"))
    foreign = pred.parent / "other"
    foreign.mkdir()
    (foreign / "summary.json").write_text("{}")
    capsys.readouterr()
    assert eval_cli(pred, ref, "--out", str(foreign)) == 2
    assert "summary.json: exists and was not written by ssmis" in one_error_line(capsys)


def test_png_folders_with_rgb_masks_and_given_spacing(tmp_path):
    pred, ref = tmp_path / "pred", tmp_path / "ref"
    pred.mkdir(), ref.mkdir()
    labels = box_labels((16, 20))
    Image.fromarray(labels).save(ref / "img1.png")
    moved = box_labels((16, 20), shift=3)
    Image.fromarray(np.stack([moved, 100 * moved, np.full_like(moved, 7)], axis=-1)).save(pred / "img1.png")
    assert eval_cli(pred, ref, "--spacing", "0.5", "0.25", "--classes", "1") == 0
    (row,) = read_rows(pred.parent / "pred_eval")
    want = brute_metrics(box_labels((16, 20), shift=3) == 1, labels == 1, (0.5, 0.25))
    assert float(row["dice"]) == pytest.approx(want["dice"]) and float(row["hd95_mm"]) == pytest.approx(want["hd95"])
    assert float(row["asd_mm"]) == pytest.approx(want["asd"]) and float(row["hd95_vox"]) == pytest.approx(3.0)


def test_hdf5_folders_default_classes_and_empty_prediction(tmp_path, capsys):
    pred, ref = tmp_path / "pred", tmp_path / "ref"
    pred.mkdir(), ref.mkdir()
    labels = box_labels((5, 12, 18))
    save_h5(ref / "patient001_frame01.h5", labels)
    save_h5(pred / "patient001_frame01.h5", np.where(labels == 2, 0, labels))
    save_h5(pred / "stray.h5", labels)
    assert eval_cli(pred, ref, "--out", str(tmp_path / "scores")) == 0
    assert "1 predictions have no reference" in capsys.readouterr().err
    rows = read_rows(tmp_path / "scores")
    assert [(r["patient"], r["class"], r["note"]) for r in rows] == [("patient001", "1", ""),
                                                                    ("patient001", "2", "pred_empty")]
    assert float(rows[1]["hd95_vox"]) == pytest.approx(math.sqrt(5**2 + 12**2 + 18**2))
    assert rows[1]["hd95_mm"] == "nan" and float(rows[1]["dice"]) == 0.0
    summary = json.loads((tmp_path / "scores" / "summary.json").read_text())
    assert summary["counts"]["pred_empty"] == 1 and summary["per_class"]["2"]["empty"]["pred_empty"] == 1


def test_missing_folder(tmp_path, capsys):
    ref = tmp_path / "ref"
    ref.mkdir()
    assert eval_cli(tmp_path / "nope", ref) == 2
    assert f"{tmp_path / 'nope'}: folder not found" in one_error_line(capsys)


def test_folder_without_masks(tmp_path, capsys):
    pred, ref = tmp_path / "pred", tmp_path / "ref"
    pred.mkdir(), ref.mkdir()
    (pred / "notes.txt").write_text("x")
    save_h5(ref / "a.h5", box_labels((4, 8, 18)))
    assert eval_cli(pred, ref) == 2
    assert f"{pred}: no mask files" in one_error_line(capsys)


def test_shape_mismatch_names_the_prediction(tmp_path, capsys):
    pred, ref = tmp_path / "pred", tmp_path / "ref"
    pred.mkdir(), ref.mkdir()
    save_h5(ref / "a.h5", box_labels((4, 8, 18)))
    save_h5(pred / "a.h5", box_labels((4, 8, 20)))
    assert eval_cli(pred, ref) == 2
    line = one_error_line(capsys)
    assert f"{pred / 'a.h5'}: shape (4, 8, 20) differs from the reference a.h5 (4, 8, 18)" in line


def test_no_matching_names(tmp_path, capsys):
    pred, ref = tmp_path / "pred", tmp_path / "ref"
    pred.mkdir(), ref.mkdir()
    save_h5(ref / "a.h5", box_labels((4, 8, 18)))
    save_h5(pred / "b_pred.h5", box_labels((4, 8, 18)))
    assert eval_cli(pred, ref) == 2
    line = one_error_line(capsys)
    assert f"{pred}: no file name matches one in {ref}" in line and "b_pred" in line


def test_unreadable_file_and_missing_label_dataset(tmp_path, capsys):
    pred, ref = tmp_path / "pred", tmp_path / "ref"
    pred.mkdir(), ref.mkdir()
    Image.fromarray(box_labels((8, 18))).save(ref / "a.png")
    (pred / "a.png").write_bytes(b"not a png")
    assert eval_cli(pred, ref) == 2
    assert f"{pred / 'a.png'}: cannot read this mask" in one_error_line(capsys)
    with h5py.File(ref / "b.h5", "w") as f:
        f.create_dataset("image", data=np.zeros((2, 3)))
    save_h5(pred / "b.h5", np.zeros((2, 3), np.uint8))
    (pred / "a.png").unlink()
    assert eval_cli(pred, ref) == 2
    assert f"{ref / 'b.h5'}: no 'label' dataset (found: image)" in one_error_line(capsys)


def test_output_inside_reference_folder_is_refused(nifti_folders, capsys):
    pred, ref = nifti_folders
    assert eval_cli(pred, ref, "--out", str(ref / "scores")) == 2
    assert "lies inside the reference folder" in one_error_line(capsys)
    assert not (ref / "scores").exists()


@pytest.mark.realdata
@pytest.mark.skipif(not (ACDC / "test.list").exists(), reason=f"ACDC data not found at {ACDC}")
def test_acdc_volumes_against_themselves_and_a_shifted_copy(tmp_path):
    cases = (ACDC / "test.list").read_text().split()[:3]
    ref, same, shifted = (tmp_path / n for n in ("ref", "same", "shifted"))
    labels = {}
    for folder in (ref, same, shifted):
        folder.mkdir()
    for case in cases:
        with h5py.File(ACDC / "data" / f"{case}.h5", "r") as f:
            labels[case] = f["label"][()]
        moved = np.zeros_like(labels[case])
        moved[..., 2:] = labels[case][..., :-2]
        save_h5(ref / f"{case}.h5", labels[case])
        save_h5(same / f"{case}.h5", labels[case])
        save_h5(shifted / f"{case}.h5", moved)

    assert eval_cli(same, ref) == 0
    rows = read_rows(tmp_path / "same_eval")
    assert len(rows) == 9 and {r["class"] for r in rows} == {"1", "2", "3"}
    assert all(float(r["dice"]) == 1.0 and float(r["hd95_vox"]) == 0.0 for r in rows)

    assert eval_cli(shifted, ref) == 0
    rows = read_rows(tmp_path / "shifted_eval")
    assert all(0.5 < float(r["dice"]) < 1.0 and 0.0 < float(r["hd95_vox"]) <= 2.0 for r in rows)
    row = rows[1]
    lab = labels[row["case"]]
    want = brute_metrics(np.roll(lab == 2, 2, axis=-1) & (np.arange(lab.shape[-1]) >= 2), lab == 2)
    assert row["class"] == "2" and float(row["hd95_vox"]) == pytest.approx(want["hd95"])
    assert float(row["asd_vox"]) == pytest.approx(want["asd"]) and float(row["dice"]) == pytest.approx(want["dice"])
