"""LA as users have it (issue 19): both public layouts found where they lie, the LA presets, and the rough edges
of a first 3D run (spacing, half-made run directories, JSON without NaN, runs without validation, subsets)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest

from ssmis.cli import main
from ssmis.config import load_config
from ssmis.data.adapter import DataError, detect_layout, make_adapter
from ssmis.data.export import write_phantom
from ssmis.data.la_h5 import CASE_FOLDER, VOLUME
from ssmis.errors import UserError

ROOT = Path(__file__).resolve().parents[1]

# configs/la.yaml shrunk to seconds: tiny VNet, 16^3 patches on 32x32x16 volumes, 2 steps, a stride that fits
TINY_LA = ["data.patch_size=[16,16,16]", "model.widths=[4,8,16,32,64]", "split.labeled=2", "train.iterations=2",
           "train.ckpt_every=2", "train.threads=1", "train.amp='off'", "eval.stride=[8,8,8]", "eval.batch_size=4",
           "method.name=supervised"]


def strict_json(path: Path):
    """The file's JSON, refusing NaN and Infinity (which Python's json module would otherwise accept)."""
    def refuse(token):
        raise AssertionError(f"{path.name} holds {token}")
    return json.loads(path.read_text(), parse_constant=refuse)


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ssmis: error:"), err
    return err[0]


def train_la(root: Path, out: Path, *extra: str) -> int:
    args = ["train", str(ROOT / "configs" / "la.yaml"), "--out", str(out), "--set", f"data.root={root}"]
    args += TINY_LA + list(extra)
    return main(args)


@pytest.fixture(scope="module", params=["bcp", "uamt"])
def la_run(request, tmp_path_factory):
    """`ssmis data check` and `ssmis train configs/la.yaml` (shrunk) on one public LA layout, as written on disk."""
    base = tmp_path_factory.mktemp(f"la_{request.param}")
    root = write_phantom(base / "data", "la_h5", slices=16, la_form=request.param)
    out = base / "run"
    return request.param, root, out, train_la(root, out)


# ---- layouts -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("form", ["bcp", "uamt", "flat"])
def test_la_layouts_are_found_where_they_lie(form, tmp_path):
    root = write_phantom(tmp_path / "data", "la_h5", la_form=form)
    assert detect_layout(root) == "la_h5"
    ad = make_adapter("la_h5", root)
    folder = tmp_path / "data" / (CASE_FOLDER if form != "flat" else "")
    assert ad.case_folder == folder
    train, test = ad.items("train"), ad.items("eval")
    listed = (tmp_path / "data" / "train.list").read_text().split()
    assert [it.id for it in train] == listed and len(test) == 2
    assert all(Path(it.source) == folder / it.id / VOLUME for it in train + test)
    s = ad.load(train[0])
    assert s["image"].shape == ((1, 32, 32, 6) if form != "flat" else (1, 6, 32, 32)) and s["spacing"] is None
    assert set(np.unique(s["label"])) <= {0, 1}


def test_data_check_reads_both_public_layouts(la_run, capsys):
    form, root, _, _ = la_run
    capsys.readouterr()
    assert main(["data", "check", str(root)]) == 0
    out = capsys.readouterr().out
    assert "layout     la_h5" in out and f"files      {root if form == 'uamt' else root / CASE_FOLDER}" in out
    assert "4 training volumes, 2 eval volumes" in out and "read       6 of 6 cases" in out
    assert "1 left atrium:" in out and out.rstrip().endswith("0 problems")


def test_missing_volumes_name_where_they_were_looked_for(tmp_path, capsys):
    root = write_phantom(tmp_path / "bcp", "la_h5", la_form="bcp")
    first = (root / "train.list").read_text().split()[0]
    (root / CASE_FOLDER / first / VOLUME).unlink()
    assert main(["data", "check", str(root)]) == 1
    out = capsys.readouterr().out.splitlines()
    assert any(ln.startswith("read       5 of 6 cases") and "1 could not be read" in ln for ln in out)
    problems = [ln for ln in out if ln.startswith("problem")]
    assert len(problems) == 1 and first in problems[0] and "file not found" in problems[0]
    assert f"read from '{root / CASE_FOLDER}'" in problems[0]
    # every volume elsewhere: one line naming the folders tried and what was expected there
    shutil.move(root / CASE_FOLDER, tmp_path / "moved")
    assert main(["data", "check", str(root)]) == 2
    assert f"no <case>/{VOLUME} in '{root}' or '{root / CASE_FOLDER}'" in one_error_line(capsys)
    with pytest.raises(DataError) as e:
        make_adapter("la_h5", root).items("train")
    assert "found none of the 6 cases" in str(e.value) and f"looked in '{root}', '{root / CASE_FOLDER}'" in str(e.value)


def test_cases_never_read_are_not_counted_as_read(tmp_path, capsys):
    root = write_phantom(tmp_path / "flat", "la_h5")
    for case in ("patient001", "patient002"):
        (root / case / VOLUME).write_bytes(b"not hdf5")
    assert main(["data", "check", str(root)]) == 1
    out = capsys.readouterr().out
    assert "read       4 of 6 cases" in out and "2 could not be read" in out and "2 problems" in out


def test_restack_volumes_on_la_is_refused(tmp_path):
    from ssmis.config.schema import DataConfig

    root = write_phantom(tmp_path / "flat", "la_h5")
    with pytest.raises(UserError, match="data.restack_volumes: applies to the ssl4mis_h5 layout only"):
        make_adapter("la_h5", root, DataConfig(layout="la_h5", root=str(root), restack_volumes=True))


# ---- presets -------------------------------------------------------------------------------------------------

def test_la_presets_state_the_literature_protocol_and_a_cpu_variant():
    la = load_config(str(ROOT / "configs" / "la.yaml"))
    assert (la.data.layout, la.data.patch_size, la.data.rot_plane, la.model.name) == ("la_h5", [112, 112, 80], [0, 1], "vnet")
    assert (la.train.labeled_bs, la.train.unlabeled_bs, la.train.iterations, la.split.labeled) == (2, 2, 6000, 8)
    assert (la.eval.stride, la.eval.blend, la.data.spacing, la.train.eval_every) == ([18, 18, 4], "constant", [0.625], 0)
    assert not la.data.restack_volumes and la.sched.name == "step"
    text = (ROOT / "configs" / "la.yaml").read_text()
    assert "LAST step" in text and "16 = 20 %" in text         # the selection rule and the other labelled count
    cpu = load_config(str(ROOT / "configs" / "la_cpu.yaml"))
    assert cpu.data.layout == "la_h5" and cpu.split.labeled == 8 and cpu.train.iterations < la.train.iterations
    assert all(p % 16 == 0 for p in cpu.data.patch_size) and cpu.eval.stride is None


def test_rot_plane_rotates_and_flips_only_within_its_axes():
    import torch

    from ssmis.data.augment import random_geometry_3d

    x = torch.arange(2 * 4 * 4 * 3, dtype=torch.float32).reshape(2, 1, 4, 4, 3)
    lab = x[:, 0].long()
    for seed in range(6):
        img, lb = random_geometry_3d(x, lab, torch.Generator().manual_seed(seed), plane=(0, 1))
        assert img.shape == x.shape and torch.equal(lb, img[:, 0].long())
        for b in range(2):      # the z column of every (x, y) position moves as a whole: axis 2 untouched
            cols = {tuple(v.tolist()) for v in img[b, 0].reshape(-1, 3)}
            assert cols == {tuple(v.tolist()) for v in x[b, 0].reshape(-1, 3)}


# ---- a 3D run on each public layout -----------------------------------------------------------------------

def test_train_and_sliding_window_test_on_both_public_layouts(la_run):
    form, root, out, rc = la_run
    assert rc == 0
    summary = strict_json(out / "eval" / "test-best" / "summary.json")
    conv = summary["conventions"]
    assert summary["counts"]["cases"] == 2 and 0.0 <= summary["mean"]["dice"] <= 1.0
    assert conv["inference"] == "sliding window [16, 16, 16], stride [8, 8, 8], constant weights"
    assert conv["selection"] == "last step (no validation cases)" and conv["step"] == 2
    # the stated spacing is recorded and gives distances in mm (isotropic: voxels x 0.625)
    assert "0.625" in conv["spacing"] and conv["units"] == "vox and mm"
    assert summary["mean"]["hd95_mm"] == pytest.approx(0.625 * summary["mean"]["hd95_vox"])
    assert "0.625" in (out / "config.yaml").read_text()


def test_a_run_without_validation_names_its_best_checkpoint_and_writes_valid_json(la_run):
    _, _, out, rc = la_run
    assert rc == 0
    result = strict_json(out / "train_summary.json")
    assert result["best_val_dice"] is None and result["best_step"] == 2
    assert result["selection"] == "last step (no validation cases)"
    strict_json(out / "splits.json")
    log = (out / "log.txt").read_text()
    assert "no val cases (the 'best' checkpoint is the last step)" in log
    assert "checkpoints/best.pt is the last step (2)" in log


def test_start_line_counts_the_unlabelled_cases_a_supervised_run_leaves_out(la_run):
    _, _, out, rc = la_run
    splits = json.loads((out / "splits.json").read_text())
    start = next(ln for ln in (out / "log.txt").read_text().splitlines() if ln.startswith("ssmis "))
    assert f"{len(splits['unlabeled'])} unlabelled cases in the split, not used (supervised trains on labels only)" in start
    assert len(splits["unlabeled"]) == 2 and "spacing 0.625 mm (data.spacing)" in start


def test_eval_a_subset_with_per_case_timing(la_run, capsys):
    _, _, out, rc = la_run
    assert rc == 0
    test_ids = json.loads((out / "splits.json").read_text())["test"]
    log_before = (out / "log.txt").read_text()
    assert f"case 2/2 {test_ids[1]}: " in log_before                    # the evaluation at the end of training
    capsys.readouterr()
    assert main(["eval", "--run", str(out), "--max-cases", "1"]) == 0
    first = strict_json(out / "eval" / "test-best-first1" / "summary.json")
    assert first["counts"]["cases"] == 1 and first["conventions"]["case_ids"] == test_ids[:1]
    assert first["conventions"]["cases"] == "subset: the first 1 of the 2 test cases"
    assert f"case 1/1 {test_ids[0]}: " in capsys.readouterr().err
    new_lines = (out / "log.txt").read_text()[len(log_before):].splitlines()
    assert len(new_lines) == 1 and " s, Dice " in new_lines[0]
    assert main(["eval", "--run", str(out), "--cases", test_ids[1]]) == 0
    chosen = strict_json(out / "eval" / "test-best-cases1" / "summary.json")
    assert chosen["conventions"]["case_ids"] == test_ids[1:]
    full = strict_json(out / "eval" / "test-best" / "summary.json")
    assert full["counts"]["cases"] == 2                                   # the whole-split report is kept
    capsys.readouterr()
    assert main(["eval", "--run", str(out), "--cases", "NOSUCHCASE"]) == 2
    assert "['NOSUCHCASE'] not in the test split" in one_error_line(capsys)


# ---- spacing ---------------------------------------------------------------------------------------------------

def test_stated_spacing_is_used_only_where_the_files_have_none(tmp_path):
    from ssmis.config.schema import DataConfig

    la = write_phantom(tmp_path / "la", "la_h5")
    ad = make_adapter("la_h5", la, DataConfig(layout="la_h5", spacing=[1.5, 0.5, 0.5]))
    s = ad.load(ad.items("train")[0])
    assert s["spacing"] == (1.5, 0.5, 0.5) and ad.info().spacing_known
    acdc = write_phantom(tmp_path / "acdc", "ssl4mis_h5")
    ad = make_adapter("ssl4mis_h5", acdc, DataConfig(layout="ssl4mis_h5", spacing=[10, 1.5, 1.5]))
    assert ad.load(ad.items("train")[0])["spacing"] == (1.5, 1.5)      # 2D slices: the in-plane values
    assert ad.load(ad.items("eval")[0])["spacing"] == (10.0, 1.5, 1.5)
    with pytest.raises(UserError, match="data.spacing: .* has 2 values; la_h5 data are 3D"):
        make_adapter("la_h5", la, DataConfig(layout="la_h5", spacing=[1, 1]))
    nn = write_phantom(tmp_path / "nn", "nnunet")
    with pytest.raises(UserError, match="the nnunet layout stores the spacing of every case"):
        make_adapter("nnunet", nn, DataConfig(layout="nnunet", spacing=[1.0]))


# ---- run directories and splits -------------------------------------------------------------------------------

def test_a_failed_setup_leaves_no_run_directory_and_the_retry_needs_no_overwrite(tmp_path, capsys):
    root = write_phantom(tmp_path / "data", "la_h5", slices=16, la_form="bcp")
    out = tmp_path / "run"
    assert train_la(root, out, "split.labeled=100") == 2               # fails in setup: 100 of 4 training cases
    assert "asks for 100 labelled cases but train.list has 4" in one_error_line(capsys)
    assert not out.exists()
    assert train_la(root, out, "train.iterations=1", "train.ckpt_every=1") == 0
    assert (out / "checkpoints" / "last.pt").is_file()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert train_la(root, empty, "split.labeled=100") == 2               # a folder the user made stays, empty
    assert empty.is_dir() and not any(empty.iterdir())


def test_non_finite_values_are_written_as_null(tmp_path):
    from ssmis.atomic import atomic_write_json

    atomic_write_json(tmp_path / "x.json", {"a": float("-inf"), "b": [float("nan"), 1.5], "c": (float("inf"),)})
    assert strict_json(tmp_path / "x.json") == {"a": None, "b": [None, 1.5], "c": [None]}


def test_data_split_refuses_val_and_test_on_layouts_with_fixed_lists(tmp_path, capsys):
    root = write_phantom(tmp_path / "data", "la_h5", la_form="bcp")
    out = tmp_path / "splits.json"
    assert main(["data", "split", str(root), "--labeled", "2", "--val", "1", "--test", "2", "-o", str(out)]) == 2
    line = one_error_line(capsys)
    assert "--val --test: the la_h5 layout fixes val and test by its list files (0 val, 2 test cases)" in line
    assert not out.exists()
    assert main(["data", "split", str(root), "--labeled", "2", "-o", str(out)]) == 0
    sp = json.loads(out.read_text())
    assert (len(sp["labeled"]), len(sp["unlabeled"]), sp["val"], len(sp["test"])) == (2, 2, [], 2)


def test_h5_arrays_of_the_public_forms_are_stored_x_y_z(tmp_path):
    root = write_phantom(tmp_path / "d", "la_h5", slices=5, la_form="bcp")
    case = (root / "test.list").read_text().split()[0]
    with h5py.File(root / CASE_FOLDER / case / VOLUME, "r") as f:
        assert f["image"].shape == (32, 32, 5) and f["label"].dtype == np.uint8
