"""Largest-connected-component post-processing (BCP's LA test, `--nms 1`): per class, full connectivity."""

from __future__ import annotations

import json

import numpy as np

from ssmis.cli import main
from ssmis.eval.postprocess import largest_component_per_class


def test_keeps_the_largest_component_of_each_class_in_3d():
    lab = np.zeros((6, 8, 8), np.int64)
    lab[0:3, 0:3, 0:3] = 1             # 27 voxels of class 1
    lab[5, 7, 7] = 1                   # a stray voxel of class 1: removed
    lab[3, 3, 3] = 1                   # corner-to-corner with the block: the same component under 26-connectivity
    lab[4:6, 0:2, 5:8] = 2             # the only class-2 component: kept
    lab[0, 7, 0] = 3
    lab[1, 6, 1] = 3                   # diagonal neighbour (26-connectivity): one component of 2 voxels
    lab[5, 0, 0] = 3                   # a single voxel: removed
    out = largest_component_per_class(lab, 4)
    assert (out[0:3, 0:3, 0:3] == 1).all() and out[3, 3, 3] == 1     # (3,3,3) is a 26-neighbour of (2,2,2)
    assert out[5, 7, 7] == 0
    assert ((out == 2) == (lab == 2)).all()
    assert out[0, 7, 0] == out[1, 6, 1] == 3 and out[5, 0, 0] == 0
    assert set(np.unique(out)) == {0, 1, 2, 3}


def test_absent_class_stays_absent_and_2d_works():
    lab = np.zeros((5, 5), np.int64)
    lab[0, 0] = lab[4, 4] = 2
    lab[2, 2] = lab[2, 3] = 2
    out = largest_component_per_class(lab, 3)
    assert out.sum() == 4 and out[2, 2] == out[2, 3] == 2 and (out == 1).sum() == 0


def test_eval_largest_component_writes_a_separate_report(cli_run, capsys):
    out, rc, _ = cli_run
    own = (out / "eval" / "test-best" / "summary.json").read_text()
    assert main(["eval", "--run", str(out), "--largest-component"]) == 0
    lcc = json.loads((out / "eval" / "test-best-lcc" / "summary.json").read_text())
    assert lcc["conventions"]["postprocess"] == "largest connected component per class"
    assert (out / "eval" / "test-best" / "summary.json").read_text() == own       # the run's report is kept
    assert main(["eval", "--run", str(out), "--no-largest-component"]) == 0        # the run's own setting: same folder
    assert json.loads((out / "eval" / "test-best" / "summary.json").read_text())["conventions"]["postprocess"] == "none"
