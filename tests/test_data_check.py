"""`ssmis data check`: summary and exit 0 on good fixtures, one line per broken file and exit 1, exit 2 on user errors."""

from __future__ import annotations

import shutil

import h5py
import pytest

from ssmis.cli import main
from ssmis.data.check import check_dataset
from ssmis.data.export import write_phantom


@pytest.fixture(scope="module")
def acdc(tmp_path_factory):
    return write_phantom(tmp_path_factory.mktemp("acdc"), "ssl4mis_h5")


def test_good_fixture_passes_with_summary(acdc, capsys):
    assert check_dataset(acdc) == 0
    out = capsys.readouterr().out
    assert "ssl4mis_h5" in out and "24 training slices, 2 eval volumes" in out and "patients   4 training, 2 eval" in out
    assert "min 1×32×32" in out and "min 1×6×32×32" in out and "3 LV:" in out
    assert out.count("stores no spacing") == 1 and out.rstrip().endswith("0 problems")


@pytest.mark.parametrize("layout,expect", [("hc18", "7 images"), ("nnunet", "6 training volumes, 5 eval volumes")])
def test_layouts_with_spacing_pass(tmp_path, capsys, layout, expect):
    assert check_dataset(write_phantom(tmp_path, layout)) == 0
    out = capsys.readouterr().out
    assert expect in out and "spacing    min" in out and "warning" not in out


def test_broken_files_are_reported_one_line_each(acdc, tmp_path, capsys):
    root = shutil.copytree(acdc, tmp_path / "copy")
    corrupt, wrong = root / "data" / "patient002_frame01_slice_3.h5", root / "data" / "patient005_frame01.h5"
    corrupt.write_bytes(b"\x89HDF garbage" * 50)
    with h5py.File(wrong, "r+") as f:
        f["label"][2, 5, 5] = 9
    assert main(["data", "check", str(root)]) == 1
    out = capsys.readouterr().out.splitlines()
    problems = [ln for ln in out if ln.startswith("problem")]
    assert len(problems) == 2 and out[-1] == "2 problems"
    assert str(corrupt) in problems[0] and "cannot read" in problems[0]
    assert str(wrong) in problems[1] and "[9]" in problems[1]
    assert main(["data", "check", str(root), "--num-classes", "10"]) == 1     # 9 is a class now: only the corrupt file
    assert capsys.readouterr().out.rstrip().endswith("1 problem")


@pytest.mark.parametrize("case", ["empty", "unknown", "forced", "missing_list"])
def test_user_errors_exit_2_with_one_line(acdc, tmp_path, capsys, case):
    root = tmp_path / "ds"
    root.mkdir()
    args = ["data", "check", str(root)]
    if case == "unknown":
        (root / "notes.txt").write_text("hello")
    elif case == "forced":
        args = ["data", "check", str(acdc), "--layout", "nnunnet"]
    elif case == "missing_list":
        root = shutil.copytree(acdc, root, dirs_exist_ok=True)
        (root / "test.list").unlink()
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ssmis: error:")
    assert {"empty": "folder is empty", "unknown": "unknown data layout", "forced": "Did you mean 'nnunet'",
            "missing_list": "test.list: list file not found"}[case] in err[0]
