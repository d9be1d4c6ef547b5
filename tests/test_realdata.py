"""The real ACDC and HC18 copies in ../shared/data: counts, the ACDC protocol, HC18 pixel sizes and HC."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from skimage import measure

from ssmis.data.adapter import detect_layout, make_adapter
from ssmis.data.hc18 import CSV_NAME, fit_ellipse, ramanujan_perimeter

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
pytestmark = pytest.mark.realdata


def _root(name: str) -> Path:
    if not (DATA / name).is_dir():
        pytest.skip(f"real data not found at {DATA / name} (only the project's development machines have it)")
    return DATA / name


@pytest.fixture(scope="module")
def acdc():
    root = _root("ACDC")
    assert detect_layout(root) == "ssl4mis_h5"
    return make_adapter("auto", root)


@pytest.fixture(scope="module")
def hc18():
    root = _root("HC18")
    assert detect_layout(root) == "hc18"
    return make_adapter("auto", root)


def test_acdc_counts(acdc):
    train, ev = acdc.items("train"), acdc.items("eval")
    assert len(train) == 1312 and len(ev) == 60
    assert len({it.patient for it in train}) == 70 and len({it.patient for it in ev}) == 30
    assert not {it.patient for it in train} & {it.patient for it in ev}
    s = acdc.load(train[0])
    assert s["case"] == "patient099_frame01_slice_15" and s["image"].ndim == 3 and s["label"].max() <= 3
    assert 0 <= s["slice_index"] < s["num_slices"] == 16 and s["spacing"] is None
    v = acdc.load(ev[0])
    assert v["image"].ndim == 4 and v["label"].shape == v["image"].shape[1:]


@pytest.mark.parametrize("labeled,patients", [(7, 7), (136, 7), (3, 3), (256, 14)])
def test_acdc_protocol_split(acdc, labeled, patients):
    sp = acdc.protocol_splits(labeled, seed=0)
    n = {3: 68, 7: 136, 14: 256}[patients]
    assert len(sp.labeled) == n and len(sp.unlabeled) == 1312 - n and (len(sp.val), len(sp.test)) == (20, 40)
    patient = {it.id: it.patient for it in acdc.items("train") + acdc.items("eval")}
    lab, unl = {patient[c] for c in sp.labeled}, {patient[c] for c in sp.unlabeled}
    assert len(lab) == patients and not lab & unl
    assert sp.meta["labeled_patients"] == patients
    sp.check(patient)                                         # no patient on two sides, every id known
    if patients == 7:
        assert lab == {"patient099", "patient038", "patient050", "patient100", "patient058", "patient021", "patient049"}


def test_hc18_counts_subjects_and_pixel_sizes(hc18):
    items = hc18.items("train")
    assert len(items) == 799 and len({it.patient for it in items}) == 644 and len(hc18.items("eval")) == 799
    assert sum("_HC" not in it.id for it in items) == 155
    assert next(it for it in items if it.id == "014_2HC").patient == "014"
    with open(DATA / "HC18" / CSV_NAME, newline="") as f:
        rows = {r["filename"]: float(r["pixel size(mm)"]) for r in csv.DictReader(f)}
    for it in items[::100]:
        assert hc18.load(it)["spacing"] == (rows[f"{it.id}.png"],) * 2


def test_hc18_head_circumference_from_masks_matches_csv(hc18):
    # methods.md HC18-lite "sanity check": HC from the reference masks with the evaluation's own ellipse code
    # (ssmis.eval.hc_error.hc_row: largest component, sub-pixel contour, EllipseModel, Ramanujan, times the pixel
    # size) against the CSV. Measured once over all 799: max |error| 3.53 mm (637_HC), mean 1.23 mm, every error
    # positive: the filled masks reach 1.41 px (sd 0.07) beyond the reference ellipse (the outer edge of the drawn
    # outline). Every 4th image here (~8 s): max 3.53, mean 1.25. This bounds what an HC error can mean.
    from ssmis.eval.hc_error import hc_row

    rows = []
    for it in hc18.items("eval")[::4]:
        s = hc18.load(it)
        rows.append(hc_row(s["label"] > 0, s["spacing"], s["hc_ref_mm"]))
    assert all(r["hc_note"] == "" for r in rows)
    signed = np.array([r["hc_mm"] - r["hc_ref_mm"] for r in rows])
    errors = np.abs(signed)
    assert errors.max() < 3.8 and errors.mean() < 1.4 and (signed > 0).mean() > 0.95


def test_hc18_lite_split_counts_and_nested_labelled_sets(hc18):
    from ssmis.config import load_config
    from ssmis.data.splits import make_splits

    cfg = load_config(str(Path(__file__).resolve().parents[1] / "configs" / "hc18.yaml"))
    subj = {it.id: it.patient for it in hc18.items("train")}

    def subjects(ids):
        return {subj[i] for i in ids}

    ten = make_splits(hc18, cfg.split)
    twenty = make_splits(hc18, cfg.split.model_copy(update={"labeled": 0.2}))
    # methods.md HC18-lite: test round(0.2 * 644) = 129, val 64, train 451; labelled 45 / 90 subjects
    assert len(subjects(ten.test)) == 129 and len(subjects(ten.val)) == 64
    assert len(subjects(ten.labeled)) == 45 and len(subjects(twenty.labeled)) == 90
    assert len(subjects(ten.labeled) | subjects(ten.unlabeled)) == 451
    assert subjects(ten.labeled) < subjects(twenty.labeled)                     # the 10 % set is inside the 20 %
    assert (ten.test, ten.val) == (twenty.test, twenty.val)


def test_acdc_labelled_scans_split_spcl_protocol(acdc):
    """split.labeled_scans (SPCL's labelled-scan protocol): exactly the slices of the named scans are labelled, the
    other phase of the same patient stays unlabelled, val/test are the ACDC lists; a val/test scan is refused."""
    from ssmis.config.schema import SplitConfig
    from ssmis.data.splits import make_splits

    scans = ["patient100_frame01", "patient027_frame02"]
    sp = make_splits(acdc, SplitConfig(labeled_scans=scans))
    assert len(sp.labeled) == 8 + 10 and len(sp.unlabeled) == 1312 - 18 and (len(sp.val), len(sp.test)) == (20, 40)
    assert {c.rsplit("_slice_", 1)[0] for c in sp.labeled} == set(scans)
    assert sum(c.startswith("patient100_frame02_") for c in sp.unlabeled) == 8
    assert sp.meta["labeled_scans"] == scans and sp.meta["labeled_patients"] == 2      # not the protocol default's 7
    assert "labeled_slices" not in sp.meta and sp.meta["unlabeled_cases"] == 1312 - 18
    with pytest.raises(Exception, match="val/test scans"):
        make_splits(acdc, SplitConfig(labeled_scans=[sp.val[0]]))
    with pytest.raises(Exception, match="not scans of the training split"):
        make_splits(acdc, SplitConfig(labeled_scans=["patient999_frame01"]))
