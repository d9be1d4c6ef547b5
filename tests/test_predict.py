"""`ssmis predict`: masks in the input's format (NIfTI affine/header/shape, PNG size, HDF5 `label`), a failing case
skipped with exit code 1, and the measurements (volumes in ml, ejection fraction, head circumference)."""

from __future__ import annotations

import csv

import h5py
import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image
from skimage import draw

from conftest import small_config
from ssmis.cli import main
from ssmis.data.hc18 import ramanujan_perimeter
from ssmis.eval.measure import class_volumes, ejection_fractions, head_circumference
from ssmis.predict import Model, predict


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A tiny phantom run (10 steps, UNet widths 4..64, 32x32)."""
    from ssmis.engine.run import train

    out = tmp_path_factory.mktemp("predict") / "run"
    n = torch.get_num_threads()
    train(small_config("supervised", 10), out=out, progress=False, test_at_end=False)
    torch.set_num_threads(n)
    return out


@pytest.fixture
def threshold_model(monkeypatch):
    """Replace the network's prediction by `3 * (image > 0.5)`: every output voxel is then known exactly, so
    axis swaps, flips and resizing mistakes in reading or writing show up."""
    monkeypatch.setattr(Model, "predict", lambda self, image: (image[0] > 0.5).astype(np.int64) * 3)


def rows(out):
    with open(out / "measurements.csv") as f:
        return {r["case"]: r for r in csv.DictReader(f)}


def nifti(path, data, zooms=(1.2, 0.9, 7.5)):
    affine = np.array([[-zooms[0], 0, 0, 10.0], [0, 0, zooms[2], -4.0], [0, zooms[1], 0, 22.0], [0, 0, 0, 1]])
    img = nib.Nifti1Image(data.astype(np.float32), affine)
    img.header.set_zooms(zooms)
    img.header["descrip"] = b"ssmis test scan"
    nib.save(img, path)
    return img


def test_nifti_keeps_affine_header_and_shape(run_dir, tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    data = rng.uniform(0, 1, (30, 26, 5))                  # X, Y, Z, all different
    nifti(tmp_path / "scan.nii.gz", data)
    src = nib.load(tmp_path / "scan.nii.gz")               # the input as stored (float32 sform)
    assert predict(run_dir, [tmp_path / "scan.nii.gz"], tmp_path / "real", progress=False) == 0
    out = nib.load(tmp_path / "real" / "scan.nii.gz")
    assert out.shape == src.shape and np.array_equal(out.affine, src.affine)
    assert out.header.get_zooms() == src.header.get_zooms() and out.header["descrip"] == src.header["descrip"]
    assert np.asarray(out.dataobj).dtype == np.uint8

    monkeypatch.setattr(Model, "predict", lambda self, image: (image[0] > 0.5).astype(np.int64) * 3)
    assert predict(run_dir, [tmp_path / "scan.nii.gz"], tmp_path / "thr", progress=False) == 0
    mask = np.asarray(nib.load(tmp_path / "thr" / "scan.nii.gz").dataobj)
    assert np.array_equal(mask, (data > 0.5) * 3)          # voxel for voxel, in X, Y, Z
    r = rows(tmp_path / "thr")["scan"]
    n = int((data > 0.5).sum())
    assert r["shape"] == "30x26x5" and r["spacing_mm"] == "1.2x0.9x7.5" and int(r["LV_voxels"]) == n and int(r["RV_voxels"]) == 0
    assert float(r["LV_ml"]) == pytest.approx(n * 1.2 * 0.9 * 7.5 / 1000, rel=1e-5)


def test_png_keeps_size_and_hdf5_writes_label(run_dir, tmp_path, threshold_model):
    rng = np.random.default_rng(1)
    grey = (rng.uniform(0, 1, (27, 41)) * 255).astype(np.uint8)       # H x W, not square, not the patch size
    Image.fromarray(grey).save(tmp_path / "img.png")
    Image.fromarray(np.stack([grey] * 3, -1)).save(tmp_path / "photo.jpg", quality=100)
    vol = rng.uniform(0, 1, (4, 20, 24)).astype(np.float32)
    with h5py.File(tmp_path / "vol.h5", "w") as f:
        f["image"] = vol
    ckpt = run_dir / "checkpoints" / "best.pt"               # a checkpoint file works as well as the run folder
    assert predict(ckpt, [tmp_path], tmp_path / "out", pixel_size=0.5, overlay=True, progress=False) == 0
    with Image.open(tmp_path / "out" / "img.png") as im:
        assert im.size == (41, 27) and im.mode == "L"
        assert np.array_equal(np.asarray(im), (grey / 255 > 0.5) * 3)
    with Image.open(tmp_path / "out" / "photo.png") as im:    # JPEG input -> lossless PNG mask of its size
        assert im.size == (41, 27)
    with h5py.File(tmp_path / "out" / "vol.h5") as f:
        assert list(f) == ["label"] and np.array_equal(f["label"][()], (vol > 0.5) * 3)
    r = rows(tmp_path / "out")
    assert set(r) == {"img", "photo", "vol"}
    assert float(r["img"]["LV_mm2"]) == pytest.approx(int(r["img"]["LV_voxels"]) * 0.25)
    assert r["vol"]["LV_ml"] == "" and r["vol"]["spacing_mm"] == ""     # 3D HDF5: no spacing known
    for name in ("img", "photo", "vol"):
        assert (tmp_path / "out" / "overlays" / f"{name}.png").is_file()


def test_failing_case_is_skipped_with_exit_code_1(run_dir, tmp_path, capsys):
    folder = tmp_path / "in"
    folder.mkdir()
    Image.fromarray(np.zeros((20, 30), np.uint8)).save(folder / "a_good.png")
    (folder / "b_broken.png").write_bytes(b"this is not a PNG")
    nifti(folder / "c_good.nii", np.random.default_rng(2).uniform(0, 1, (16, 18, 3)))
    rc = main(["predict", "--run", str(run_dir), str(folder), "--out", str(tmp_path / "out")])
    assert rc == 1
    err = capsys.readouterr().err
    assert "b_broken.png" in err and "failed" in err
    assert (tmp_path / "out" / "a_good.png").is_file() and (tmp_path / "out" / "c_good.nii").is_file()
    assert not (tmp_path / "out" / "b_broken.png").exists()
    assert set(rows(tmp_path / "out")) == {"a_good", "c_good"}
    assert nib.load(tmp_path / "out" / "c_good.nii").shape == (16, 18, 3)


@pytest.mark.parametrize("a,b,theta", [(60, 40, 0.3), (25, 15, 1.0), (120, 80, -0.7), (33, 31, 2.0)])
def test_head_circumference_of_a_drawn_ellipse(a, b, theta):
    size = 2 * a + 24
    mask = np.zeros((size, size + 10), bool)
    mask[draw.ellipse(size / 2 + 0.3, size / 2 + 4.7, b, a, shape=mask.shape, rotation=theta)] = True
    hc = head_circumference(mask.astype(np.uint8), pixel_size=0.1)
    assert hc.hc_mm == pytest.approx(ramanujan_perimeter(a, b) * 0.1, rel=0.005)
    assert sorted([hc.a_mm, hc.b_mm]) == pytest.approx([b * 0.1, a * 0.1], rel=0.01)
    # the largest component counts: a stray blob does not move the fit
    mask[2:6, 2:6] = True
    assert head_circumference(mask, 0.1).hc_mm == pytest.approx(hc.hc_mm, rel=1e-9)
    assert head_circumference(np.zeros((20, 20), bool), 0.1) is None     # empty: no circumference, never 0 mm


def test_predict_measures_hc_with_pixel_size_from_csv(run_dir, tmp_path, threshold_model, capsys):
    a, b, px = 30, 20, 0.2
    img = np.full((80, 90), 40, np.uint8)
    img[draw.ellipse(40, 44, b, a, shape=img.shape, rotation=0.4)] = 220
    folder = tmp_path / "in"
    folder.mkdir()
    Image.fromarray(img).save(folder / "007_HC.png")
    Image.fromarray(img).save(folder / "007_HC_Annotation.png")               # left out of folder inputs
    ref = ramanujan_perimeter(a, b) * px
    (tmp_path / "sizes.csv").write_text(f"filename,pixel size(mm),head circumference (mm)\n007_HC.png,{px},{ref}\n")
    args = ["predict", "--run", str(run_dir), str(folder), "--measure", "hc"]
    assert main(args + ["--out", str(tmp_path / "nopx")]) == 2                  # mm without a pixel size: user error
    err = capsys.readouterr().err.strip()
    assert err.startswith("ssmis: error:") and "--pixel-size" in err and "\n" not in err
    assert main(args + ["--out", str(tmp_path / "out"), "--pixel-csv", str(tmp_path / "sizes.csv"), "--overlay"]) == 0
    r = rows(tmp_path / "out")
    assert set(r) == {"007_HC"}
    assert float(r["007_HC"]["hc_mm"]) == pytest.approx(ref, rel=0.005)
    assert float(r["007_HC"]["hc_abs_err_mm"]) < 0.005 * ref
    assert main(args + ["--out", str(tmp_path / "px"), "--pixel-size", "0.1"]) == 0   # the option overrides the CSV
    assert float(rows(tmp_path / "px")["007_HC"]["hc_mm"]) == pytest.approx(ref / 2, rel=0.005)


def test_volumes_in_ml_and_ejection_fraction(run_dir, tmp_path, threshold_model):
    mask = np.zeros((4, 10, 10), np.int64)
    mask[0, :5, :4] = 3
    mask[1:3, 0, 0] = 1
    v = class_volumes(mask, [1, 2, 3], (10.0, 1.5, 1.5))
    assert v[3] == {"voxels": 20, "ml": pytest.approx(20 * 22.5 / 1000)} and v[2]["voxels"] == 0
    assert class_volumes(mask[0], [3], None)[3] == {"voxels": 20, "mm2": None}
    ef = ejection_fractions({"patient001_frame01": 150.0, "patient001_frame12": 60.0, "patient002_frame01": 80.0})
    assert set(ef) == {"patient001_frame01", "patient001_frame12"}           # one frame only: no EF
    assert ef["patient001_frame01"]["phase"] == "ED" and ef["patient001_frame12"]["phase"] == "ES"
    assert ef["patient001_frame01"]["ef_pct"] == pytest.approx(60.0)

    # end to end: two NIfTI frames whose "LV" (bright voxels) holds 1000 and 400 voxels of 1.5 x 1.5 x 10 mm
    for frame, n in (("01", 400), ("12", 1000)):              # ED need not be frame 01: the larger LV is ED
        data = np.zeros((40, 40, 5))
        data.reshape(-1)[:n] = 1.0
        nifti(tmp_path / f"patient007_frame{frame}.nii.gz", data, zooms=(1.5, 1.5, 10.0))
    assert predict(run_dir, [tmp_path], tmp_path / "out", progress=False) == 0
    r = rows(tmp_path / "out")
    ed, es = r["patient007_frame12"], r["patient007_frame01"]
    assert (ed["phase"], es["phase"]) == ("ED", "ES")
    assert float(ed["LV_ml"]) == pytest.approx(22.5) and float(ed["edv_ml"]) == pytest.approx(22.5)
    assert float(es["esv_ml"]) == pytest.approx(9.0)
    assert float(ed["ef_pct"]) == pytest.approx(60.0) and float(es["ef_pct"]) == pytest.approx(60.0)
