"""ACDC training volumes rebuilt from their slices (for 3D training): K order, labels, protocol split."""

import random

import numpy as np

from ssmis.config.schema import DataConfig
from ssmis.data.export import phantom_cases, write_phantom
from ssmis.data.ssl4mis_h5 import SSL4MISAdapter


def test_restacked_volumes_equal_the_original_volumes(tmp_path):
    root = write_phantom(tmp_path / "acdc", "ssl4mis_h5", patients=5, slices=7, size=32)
    lst = root / "train_slices.list"
    names = lst.read_text().split()
    random.Random(0).shuffle(names)                 # the list order must not matter, only K
    lst.write_text("\n".join(names) + "\n")
    ad = SSL4MISAdapter(root, DataConfig(restack_volumes=True))
    vols = {it.id: it for it in ad.items("train")}
    assert sorted(vols) == [f"patient00{i}_frame01" for i in (1, 2, 3)]
    for case, img, lab, _ in phantom_cases(5, 7, 32)[:3]:
        s = ad.load(vols[f"{case}_frame01"])
        assert s["image"].shape == (1, 7, 32, 32)
        assert np.array_equal(s["image"][0], img) and np.array_equal(s["label"], lab)


def test_protocol_split_on_volumes_keeps_patients_together(tmp_path):
    root = write_phantom(tmp_path / "acdc", "ssl4mis_h5", patients=5, slices=4, size=32)
    ad = SSL4MISAdapter(root, DataConfig(restack_volumes=True))
    names = (root / "train_slices.list").read_text().split()
    # a tiny fixture has no 68/136-slice protocol size: check the rule on the first volume's slices instead
    from ssmis.data import ssl4mis_h5

    ssl4mis_h5.ACDC_PATIENT_SLICES[99] = 4
    try:
        s = ad.protocol_splits(99, 0)
    finally:
        del ssl4mis_h5.ACDC_PATIENT_SLICES[99]
    assert s.labeled == ["patient001_frame01"] and s.unlabeled == ["patient002_frame01", "patient003_frame01"]
    assert len(names) == 12 and s.meta["restacked_volumes"] == {"labeled": 1, "unlabeled": 2}
