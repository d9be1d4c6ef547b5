"""Every layout: the phantom written by export.py reads back as the same samples; bad files raise DataError."""

from __future__ import annotations

import csv
import json

import h5py
import nibabel as nib
import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from ssmis.config.schema import DataConfig
from ssmis.data.adapter import DataError, detect_layout, make_adapter
from ssmis.data.export import nifti_affine, phantom_cases, write_phantom
from ssmis.data.hc18 import CSV_NAME, annotation_to_mask
from ssmis.errors import UserError


def _adapter(root, **cfg):
    return make_adapter(detect_layout(root), root, DataConfig(**cfg) if cfg else None)


def _iou(a, b):
    return (a & b).sum() / (a | b).sum()


# --- ssl4mis_h5 (ACDC) and la_h5 ----------------------------------------------------------------------------

def test_ssl4mis_h5_reads_back_slices_and_volumes(tmp_path):
    write_phantom(tmp_path, "ssl4mis_h5")
    cases = phantom_cases()
    assert detect_layout(tmp_path) == "ssl4mis_h5"
    ad = _adapter(tmp_path)
    info = ad.info()
    assert (info.num_classes, info.spatial_dims, info.eval_spatial_dims, info.spacing_known) == (4, 2, 3, False)
    train = ad.items("train")
    assert len(train) == 4 * 6 and {it.patient for it in train} == {c[0] for c in cases[:4]}
    for it in train[::5]:
        s = ad.load(it)
        case = next(c for c in cases if c[0] == it.patient)
        d = s["slice_index"]
        assert it.id == f"{case[0]}_frame01_slice_{d + 1}"        # files number slices from 1, slice_index from 0
        assert s["image"].dtype == np.float32 and s["label"].dtype == np.int64
        np.testing.assert_array_equal(s["image"], case[1][d][None])
        np.testing.assert_array_equal(s["label"], case[2][d])
        assert (s["num_slices"], s["frame"], s["spacing"], s["case"]) == (6, 1, None, it.id)
    ev = ad.items("eval")
    assert [it.id for it in ev] == ["patient005_frame01", "patient006_frame01"]
    s = ad.load(ev[1])
    np.testing.assert_array_equal(s["image"], cases[5][1][None])
    np.testing.assert_array_equal(s["label"], cases[5][2])
    assert "slice_index" not in s and s["patient"] == "patient006"
    assert ad.fixed_eval_splits() == (["patient005_frame01"], ["patient006_frame01"])


def test_ssl4mis_h5_protocol_sizes_are_checked(tmp_path):
    ad = _adapter(write_phantom(tmp_path, "ssl4mis_h5"))
    with pytest.raises(UserError, match="136"):               # 5 is no protocol size: the message lists them
        ad.protocol_splits(5, 0)
    with pytest.raises(UserError, match="32 slices but train_slices.list has 24"):
        ad.protocol_splits(1, 0)                               # 1 patient = 32 slices, more than the fixture has


def test_la_h5_reads_volumes_and_protocol(tmp_path):
    write_phantom(tmp_path, "la_h5")
    cases = phantom_cases()
    assert detect_layout(tmp_path) == "la_h5"
    ad = _adapter(tmp_path)
    assert ad.info().num_classes == 2 and [it.id for it in ad.items("eval")] == ["patient005", "patient006"]
    s = ad.load(ad.items("train")[2])
    np.testing.assert_array_equal(s["image"], cases[2][1][None])
    np.testing.assert_array_equal(s["label"], cases[2][2] > 0)
    sp = ad.protocol_splits(2, 0)
    assert (sp.labeled, sp.unlabeled, sp.val, sp.test) == (
        ["patient001", "patient002"], ["patient003", "patient004"], [], ["patient005", "patient006"])
    assert "no val" in sp.meta["rule"] and sp.meta["labeled_cases"] == 2


# --- nnunet ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("msd", [False, True], ids=["nnunet_v2", "decathlon"])
def test_nnunet_channels_transposition_spacing_affine(tmp_path, msd):
    write_phantom(tmp_path, "nnunet", msd=msd)
    cases = phantom_cases()
    ad = _adapter(tmp_path)
    assert ad.name == "nnunet"
    info = ad.info()
    assert (info.channels, info.spatial_dims, info.num_classes, info.class_names[1]) == (2, 3, 4, "RV")
    train, ev = ad.items("train"), ad.items("eval")
    assert [it.has_label for it in train] == [True] * 5 + [False]
    assert [it.id for it in ev] == [c[0] for c in cases[:5]]
    s = ad.load(train[1])
    case = cases[1]
    np.testing.assert_array_equal(s["image"], np.stack([case[1], 1 - case[1]]))   # _0000/_0001 stacked in order
    np.testing.assert_array_equal(s["label"], case[2])
    # the NIfTI convention itself: file voxel (x, y, z) is sample [z, y, x], zooms (x, y, z) reversed
    first = tmp_path / "imagesTr" / (f"{case[0]}.nii.gz" if msd else f"{case[0]}_0000.nii.gz")
    raw = nib.load(first)
    assert raw.shape[:3] == (32, 32, 6)
    np.testing.assert_array_equal(s["image"][0], np.asarray(raw.dataobj)[..., 0].T if msd else np.asarray(raw.dataobj).T)
    assert s["spacing"] == pytest.approx(raw.header.get_zooms()[:3][::-1])
    assert s["spacing"] == pytest.approx(case[3]) and s["spacing"][1] != s["spacing"][2]
    np.testing.assert_allclose(s["affine"], nifti_affine(case[3]))
    unlabelled = ad.load(train[-1])
    assert "label" not in unlabelled and unlabelled["image"].shape == (2, 6, 32, 32)


def test_nnunet_single_slice_volumes_read_as_2d(tmp_path):
    write_phantom(tmp_path, "nnunet", slices=1)
    ad = _adapter(tmp_path)
    assert ad.info().spatial_dims == 2
    s = ad.load(ad.items("train")[0])
    case = phantom_cases(slices=1)[0]
    assert s["image"].shape == (2, 32, 32) and s["label"].shape == (32, 32) and len(s["spacing"]) == 2
    np.testing.assert_array_equal(s["label"], case[2][0])


# --- folders --------------------------------------------------------------------------------------------------

def test_folders_pairs_by_stem_and_groups_patients(tmp_path):
    write_phantom(tmp_path, "folders")
    cases = phantom_cases()
    assert detect_layout(tmp_path) == "folders"
    ad = _adapter(tmp_path, num_classes=4)
    train = ad.items("train")
    assert len(train) == 36 and len({it.patient for it in train}) == 6
    assert [it.has_label for it in train].count(False) == 6 and len(ad.items("eval")) == 30
    it = next(i for i in train if i.id == "patient002__s03")
    s = ad.load(it)
    assert it.patient == "patient002" and s["image"].shape == (1, 32, 32) and s["spacing"] is None
    np.testing.assert_allclose(s["image"][0], np.round(cases[1][1][3] * 255) / 255, atol=1e-6)
    np.testing.assert_array_equal(s["label"], cases[1][2][3])
    assert "label" not in ad.load(train[-1])                   # patient006 has no masks
    with pytest.raises(DataError, match="mask_values"):        # 4 classes but the default is binary
        _adapter(tmp_path).load(it)


def test_folders_mask_values_rgb_and_binary_masks(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    rgb = np.random.default_rng(0).integers(0, 256, (8, 10, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "images" / "a.png")
    Image.fromarray(rgb).save(tmp_path / "images" / "b.png")
    cls = np.zeros((8, 10), np.uint8)
    cls[2:5, 3:7], cls[6:, :2] = 1, 2
    Image.fromarray(np.choose(cls, [0, 128, 255]).astype(np.uint8)).save(tmp_path / "labels" / "a.png")
    Image.fromarray(((cls > 0) * 255).astype(np.uint8)).save(tmp_path / "labels" / "b.png")
    ad = _adapter(tmp_path, mask_values={0: 0, 128: 1, 255: 2})
    s = ad.load(ad.items("train")[0])
    assert ad.info().channels == 3 and ad.info().num_classes == 3
    np.testing.assert_allclose(s["image"], rgb.transpose(2, 0, 1) / 255, atol=1e-6)
    np.testing.assert_array_equal(s["label"], cls)
    np.testing.assert_array_equal(_adapter(tmp_path).load(ad.items("train")[1])["label"], cls > 0)   # {0,255} -> {0,1}
    with pytest.raises(DataError, match="128"):                # a value missing from mask_values
        _adapter(tmp_path, mask_values={0: 0, 255: 1}).load(ad.items("train")[0])
    Image.fromarray(cls).save(tmp_path / "labels" / "c.png")
    with pytest.raises(DataError, match="masks without an image: c") as e:
        _adapter(tmp_path).items("train")
    assert "labels" in e.value.where


# --- hc18 -----------------------------------------------------------------------------------------------------

def test_hc18_subjects_spacing_and_filled_masks(tmp_path):
    write_phantom(tmp_path, "hc18")
    assert detect_layout(tmp_path) == "hc18"
    ad = _adapter(tmp_path)
    items = ad.items("train")
    assert [it.id for it in items][:2] == ["001_2HC", "001_HC"] and len(items) == 7
    assert {it.patient for it in items} == {f"{i:03d}" for i in range(1, 7)} and items[0].patient == "001"
    rows = {r["filename"]: r for r in csv.DictReader(open(tmp_path / CSV_NAME))}
    s = ad.load(items[0])
    px = float(rows["001_2HC.png"]["pixel size(mm)"])
    assert s["spacing"] == (px, px) and s["hc_ref_mm"] == pytest.approx(float(rows["001_2HC.png"]["head circumference (mm)"]))
    png = np.asarray(Image.open(tmp_path / "training_set" / "001_2HC.png"))
    np.testing.assert_array_equal(s["image"][0], png.astype(np.float32) / 255)
    ann = np.asarray(Image.open(tmp_path / "training_set" / "001_2HC_Annotation.png"))
    np.testing.assert_array_equal(s["label"], ann[..., 0] > 0)
    assert 0.1 < s["label"].mean() < 0.5


def test_hc18_outlines_become_filled_ellipses(tmp_path):
    filled, outline = _adapter(write_phantom(tmp_path / "f", "hc18")), _adapter(write_phantom(tmp_path / "o", "hc18", outline=True))
    for a, b in zip(filled.items("train"), outline.items("train")):
        ann = np.asarray(Image.open(b.meta["annotation"]))
        assert ndimage.binary_fill_holes(ann > 0).sum() == (ann > 0).sum()   # the gap defeats hole filling
        ref, got = filled.load(a)["label"].astype(bool), outline.load(b)["label"].astype(bool)
        assert _iou(ref, got) > 0.97
    ref = filled.load(filled.items("train")[3])["label"].astype(bool)
    closed = ref & ~ndimage.binary_erosion(ref)                # a closed outline: hole filling alone restores it
    np.testing.assert_array_equal(annotation_to_mask(closed.astype(np.uint8) * 255), ref)


def test_hc18_missing_csv_row_and_missing_csv(tmp_path):
    write_phantom(tmp_path, "hc18")
    lines = (tmp_path / CSV_NAME).read_text().splitlines()
    (tmp_path / CSV_NAME).write_text("\n".join(ln for ln in lines if not ln.startswith("003_HC")) + "\n")
    ad = _adapter(tmp_path)
    with pytest.raises(DataError, match="no row") as e:
        ad.load(next(it for it in ad.items("train") if it.id == "003_HC"))
    assert e.value.where.endswith("003_HC.png")
    (tmp_path / CSV_NAME).unlink()
    with pytest.raises(DataError) as e:
        make_adapter("hc18", tmp_path).items("train")
    assert e.value.where.endswith(CSV_NAME)


# --- bad input ------------------------------------------------------------------------------------------------

def test_h5_corrupt_file_bad_label_and_shape_mismatch_name_the_file(tmp_path):
    write_phantom(tmp_path, "ssl4mis_h5")
    ad = _adapter(tmp_path)
    items = ad.items("train")
    (tmp_path / "data" / f"{items[0].id}.h5").write_bytes(b"not an hdf5 file" * 10)
    with h5py.File(tmp_path / "data" / f"{items[1].id}.h5", "r+") as f:
        f["label"][0, 0] = 7
    with h5py.File(tmp_path / "data" / f"{items[2].id}.h5", "r+") as f:
        del f["label"]
        f["label"] = np.zeros((16, 16), np.uint8)
    for it, what in zip(items[:3], ["cannot read HDF5", r"label values \[7\]", "label shape"]):
        with pytest.raises(DataError, match=what) as e:
            ad.load(it)
        assert e.value.where == it.source and it.id in it.source


def test_missing_list_file_names_it(tmp_path):
    write_phantom(tmp_path, "ssl4mis_h5")
    (tmp_path / "val.list").unlink()
    with pytest.raises(DataError, match="list file not found") as e:
        _adapter(tmp_path).items("eval")
    assert e.value.where.endswith("val.list")


def test_nnunet_bad_label_value_and_corrupt_file(tmp_path):
    write_phantom(tmp_path, "nnunet")
    ad = _adapter(tmp_path)
    items = ad.items("eval")
    lab_path = tmp_path / "labelsTr" / "patient001.nii.gz"
    lab = nib.load(lab_path)
    data = np.asarray(lab.dataobj).copy()
    data[0, 0, 0] = 9
    nib.save(nib.Nifti1Image(data, lab.affine), lab_path)
    with pytest.raises(DataError, match=r"label values \[9\]") as e:
        ad.load(items[0])
    assert e.value.where == str(lab_path)
    bad = tmp_path / "imagesTr" / "patient002_0001.nii.gz"
    bad.write_bytes(bad.read_bytes()[:200])                   # truncated gzip
    with pytest.raises(DataError, match="cannot read NIfTI") as e:
        ad.load(items[1])
    assert e.value.where == str(bad)
    spec = json.loads((tmp_path / "dataset.json").read_text())
    spec["labels"] = {"background": 0, "tumour": 2}
    (tmp_path / "dataset.json").write_text(json.dumps(spec))
    with pytest.raises(DataError, match="not 0..K-1"):
        _adapter(tmp_path).info()


# --- SSMIS_DATA: a fallback for roots, never an override ----------------------------------------------------------

def test_ssmis_data_is_a_fallback_for_missing_or_absent_roots(tmp_path, monkeypatch):
    store = tmp_path / "store"
    write_phantom(store / "MyData", "folders")
    elsewhere = tmp_path / "work"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    cfg = DataConfig(num_classes=4)
    monkeypatch.delenv("SSMIS_DATA", raising=False)
    with pytest.raises(UserError, match=r"does not exist.*set \$SSMIS_DATA"):
        make_adapter("folders", "../shared/MyData", cfg)
    monkeypatch.setenv("SSMIS_DATA", str(store))
    # a config's relative root that is missing here: found as $SSMIS_DATA/<last part>
    assert make_adapter("folders", "../shared/MyData", cfg).root == store / "MyData"
    assert make_adapter("auto", "MyData", cfg).root == store / "MyData"          # and as $SSMIS_DATA/<root>
    # no root at all: $SSMIS_DATA itself, detected
    monkeypatch.setenv("SSMIS_DATA", str(store / "MyData"))
    assert make_adapter("auto", None, cfg).root == store / "MyData"
    # a root that exists wins over $SSMIS_DATA
    write_phantom(elsewhere / "MyData", "folders")
    assert make_adapter("folders", "MyData", cfg).root.resolve() == (elsewhere / "MyData").resolve()
    # still missing: the error says where it also looked
    with pytest.raises(UserError, match=r"also looked under \$SSMIS_DATA"):
        make_adapter("folders", "Nowhere", cfg)
