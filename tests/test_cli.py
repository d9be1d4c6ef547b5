"""The `ssmis` command line: version, help without torch, methods, one-line user errors, train, eval, demo."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml

import ssmis
from conftest import SMALL, small_overrides
from ssmis.cli import main

PY = sys.executable
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"ssmis {ssmis.__version__}"


def test_help_does_not_import_torch():
    code = ("import sys\nfrom ssmis.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit as e:\n"
            "    assert e.code == 0, e.code\nelse:\n    raise AssertionError('--help did not exit')\n"
            "assert 'torch' not in sys.modules, 'torch imported'\nprint('OK')\n")
    p = subprocess.run([PY, "-c", code], capture_output=True, text=True, env=ENV, timeout=60)
    assert p.returncode == 0, p.stderr
    assert "usage: ssmis" in p.stdout and "train" in p.stdout and p.stdout.strip().endswith("OK")


def test_methods_lists_the_registered_methods(capsys):
    assert main(["methods"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    table = {ln.split()[0]: ln.split(None, 1)[1] for ln in lines}
    assert {"supervised", "mean_teacher", "ua_mt"} <= set(table)
    assert "Labels only" in table["supervised"]
    assert "Mean Teacher" in table["mean_teacher"]
    assert "uncertainty" in table["ua_mt"].lower()
    assert table["bcp"].startswith("2D/3D ") and table["fixmatch"].startswith("2D ")


@pytest.mark.parametrize("override,hint", [("method.lamda_u=1", "Did you mean 'lambda_u'?"),
                                           ("train.iteratons=5", "Did you mean 'iterations'?")])
def test_config_typo_is_one_line_exit_2(override, hint, tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(["train", "phantom", "--set", "method.name=mean_teacher", "--set", override, "--out", str(out)])
    assert rc == 2
    cap = capsys.readouterr()
    lines = cap.err.strip().splitlines()
    assert len(lines) == 1, cap.err
    key = override.split("=")[0]
    assert lines[0] == f"ssmis: error: phantom: {key}: unknown key. {hint}"
    assert "Traceback" not in cap.err and not out.exists()


def test_config_typo_through_the_console_entry_point(tmp_path):
    p = subprocess.run([PY, "-m", "ssmis", "train", "phantom", "--set", "method.lamda_u=1", "--out",
                        str(tmp_path / "r")], capture_output=True, text=True, env=ENV, timeout=120)
    assert p.returncode == 2
    assert p.stderr.strip().splitlines() == ["ssmis: error: phantom: method.lamda_u: unknown key. "
                                             "Did you mean 'lambda_u'?"]
    assert p.stdout == ""


def test_unknown_method_name_suggests_the_closest(capsys):
    assert main(["config", "show", "phantom", "--set", "method.name=mean_teachr"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ssmis: error:") and "Did you mean 'mean_teacher'?" in err[0]


def test_config_show_applies_overrides(capsys):
    assert main(["config", "show", "phantom", "--set", "train.iterations=7", "--set", "method.name=ua_mt"]) == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["train"]["iterations"] == 7
    assert cfg["method"]["name"] == "ua_mt" and cfg["method"]["compat_ln2"] is False
    assert cfg["data"]["layout"] == "phantom"


def test_set_takes_several_pairs_and_rejects_a_stray_word(capsys):
    assert main(["config", "show", "phantom", "--set", "train.iterations=9", "method.name=ua_mt", "--set", "seed=3"]) == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert (cfg["train"]["iterations"], cfg["method"]["name"], cfg["seed"]) == (9, "ua_mt", 3)
    with pytest.raises(SystemExit):
        main(["config", "show", "--set", "seed=3", "phantom"])        # config after --set: not a KEY=VALUE
    assert "is not KEY=VALUE (give the config file before --set)" in capsys.readouterr().err


def test_amp_off_unquoted_is_accepted():
    from ssmis.config import load_config

    assert load_config("phantom", ["train.amp=off"]).train.amp == "off"
    assert load_config("phantom", ["train.channels_last=off"]).train.channels_last == "off"


# ---- train and eval -----------------------------------------------------------------------------

def test_train_writes_the_run_directory(cli_run):
    out, rc, err = cli_run
    assert rc == 0, err
    for rel in ("config.yaml", "splits.json", "metrics.csv", "log.txt", "checkpoints/last.pt",
                "checkpoints/best.pt", "eval/test-best/summary.json", "eval/test-best/per_case.csv",
                "plots/curves.png"):
        assert (out / rel).is_file(), rel
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["ssmis"]["version"] == ssmis.__version__
    assert cfg["method"]["name"] == "mean_teacher" and cfg["train"]["iterations"] == 6
    splits = json.loads((out / "splits.json").read_text())
    assert len(splits["labeled"]) == 2 and len(splits["val"]) == 1 and len(splits["test"]) == 2
    assert not set(splits["labeled"]) & set(splits["unlabeled"])
    metrics = (out / "metrics.csv").read_text().splitlines()
    assert metrics[0] == "step,stage,split,name,value"
    assert any(",val,dice," in ln for ln in metrics) and any(",train,loss," in ln for ln in metrics)
    summary = json.loads((out / "eval" / "test-best" / "summary.json").read_text())
    assert 0.0 <= summary["mean"]["dice"] <= 1.0
    assert (out / "plots" / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_eval_last_checkpoint_of_the_run(cli_run, capsys):
    out, rc, _ = cli_run
    assert rc == 0
    written_by_train = json.loads((out / "eval" / "test-last" / "summary.json").read_text())
    target = out / "eval" / "val-last" / "summary.json"
    assert not target.exists()
    capsys.readouterr()
    assert main(["eval", "--run", str(out), "--checkpoint", "last", "--split", "val"]) == 0
    s = json.loads(target.read_text())
    conv = s["conventions"]
    assert (conv["split"], conv["checkpoint"], conv["step"]) == ("val", "last", 6)
    assert s["counts"]["cases"] == 1
    assert "last checkpoint" in capsys.readouterr().out
    # the test split again: the same numbers as the evaluation at the end of training
    (out / "eval" / "test-last" / "summary.json").unlink()
    assert main(["eval", "--run", str(out), "--checkpoint", "last"]) == 0
    again = json.loads((out / "eval" / "test-last" / "summary.json").read_text())
    assert again["mean"] == written_by_train["mean"]


def test_best_and_last_holding_the_same_weights_are_predicted_once(cli_run, tmp_path, monkeypatch):
    import shutil

    from ssmis.eval.run_eval import evaluate_checkpoints
    from ssmis.predict import Model

    out, rc, _ = cli_run
    run = tmp_path / "run"
    shutil.copytree(out, run, ignore=shutil.ignore_patterns("eval"))
    calls = []
    real = Model.predict
    monkeypatch.setattr(Model, "predict", lambda self, image: calls.append(self.state_step) or real(self, image))
    res = evaluate_checkpoints(run, "test", ("best", "last"), quiet=True)
    steps = {res[ck]["conventions"]["step"] for ck in res}
    assert len(calls) == 2 * len(steps)                       # 2 test cases per distinct checkpoint
    shutil.copyfile(run / "checkpoints" / "last.pt", run / "checkpoints" / "best.pt")
    calls.clear()
    res = evaluate_checkpoints(run, "test", ("best", "last"), quiet=True)
    assert calls == [6, 6]                                    # predicted once, for both reports
    assert res["best"]["mean"] == res["last"]["mean"]
    assert json.loads((run / "eval" / "test-last" / "summary.json").read_text())["conventions"]["selection"] == "last step"


def test_eval_of_a_folder_that_is_not_a_run(tmp_path, capsys):
    assert main(["eval", "--run", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not an ssmis run directory" in err[0]


def test_train_into_an_existing_run_is_a_user_error(cli_run, capsys):
    out, rc, _ = cli_run
    assert rc == 0
    args = ["train", "phantom", "--out", str(out)]
    for o in small_overrides("mean_teacher", 6):
        args += ["--set", o]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"ssmis: error: {out}: run directory already exists. Pass --resume to continue it or "
                   "--overwrite to replace it."]


# ---- demo -----------------------------------------------------------------------------------------

def test_demo_end_to_end(monkeypatch, tmp_path, capsys):
    """`ssmis demo --iterations 10` with the phantom and the network shrunk (the full-size demo takes ~60 s
    on 2 cores): both methods train, then results.md, demo.json and curves.png are written."""
    import ssmis.demo as demo

    real = demo.load_config
    monkeypatch.setattr(demo, "load_config", lambda ref, overrides=(): real(ref, [*SMALL, *overrides]))
    out = tmp_path / "demo"
    assert main(["demo", "--iterations", "10", "--out", str(out)]) == 0
    table = (out / "results.md").read_text().splitlines()
    assert table[0].startswith("| method | Dice")
    assert [ln.split("|")[1].strip() for ln in table[2:] if ln.startswith("|")] == ["Labels only", "BCP"]
    gap = next(ln for ln in table if ln.startswith("BCP − labels only:"))        # the table says what the gap is
    results = json.loads((out / "demo.json").read_text())
    assert f"{results['BCP']['test']['dice'] - results['Labels only']['test']['dice']:+.4f}" in gap
    assert (out / "curves.png").read_bytes()[:4] == b"\x89PNG"
    assert set(results) == {"Labels only", "BCP"}
    for name in ("supervised", "bcp"):
        assert (out / name / "checkpoints" / "best.pt").is_file()
        assert yaml.safe_load((out / name / "config.yaml").read_text())["train"]["iterations"] == 10
    capsys.readouterr()
    assert main(["demo", "--iterations", "10", "--out", str(out)]) == 2
    assert "demo folder already exists" in capsys.readouterr().err


def test_train_device_flag_is_a_config_override(tmp_path, monkeypatch):
    import ssmis.engine.run as run

    seen = {}
    monkeypatch.setattr(run, "train", lambda cfg, **k: seen.setdefault("device", cfg.train.device))
    assert main(["train", "phantom", "--device", "cpu", "--out", str(tmp_path / "r")]) == 0
    assert seen["device"] == "cpu"


def test_list_models_layouts_and_methods_by_pattern(capsys):
    assert main(["list", "models"]) == 0
    assert {line.split()[0] for line in capsys.readouterr().out.splitlines()} == {"one_logit", "resnet34_unet", "resnet34_vnet", "segformer", "unet2d", "unet3d", "vnet"}
    assert main(["list", "layouts", "*h5"]) == 0
    assert {line.split()[0] for line in capsys.readouterr().out.splitlines()} == {"la_h5", "ssl4mis_h5"}
    assert main(["list", "methods", "mean_*"]) == 0
    assert capsys.readouterr().out.split()[0] == "mean_teacher"


def test_config_validate_checks_the_method_section(capsys):
    assert main(["config", "validate", "phantom", "--set", "method.name=ua_mt", "method.passes=4"]) == 0
    assert "valid (method ua_mt" in capsys.readouterr().out
    assert main(["config", "validate", "phantom", "--set", "method.name=ua_mt", "method.passes=3"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "method.passes" in err


def test_data_split_writes_a_patient_level_split_and_never_overwrites(tmp_path, capsys):
    from ssmis.data.export import write_phantom
    from ssmis.data.splits import Splits

    root = write_phantom(tmp_path / "nn", "nnunet", patients=8)
    out = tmp_path / "splits.json"
    args = ["data", "split", str(root), "--labeled", "2", "--val", "1", "--test", "2", "--seed", "3", "-o", str(out)]
    assert main(args) == 0
    sp = Splits.read(out)
    assert (len(sp.labeled), len(sp.val), len(sp.test)) == (2, 1, 2)
    assert not set(sp.labeled) & set(sp.unlabeled) and "split.file=" in capsys.readouterr().out
    before = out.read_text()
    assert main(args) == 2 and "already exists" in capsys.readouterr().err
    assert main(args + ["--overwrite", "--seed", "4"]) == 0 and out.read_text() != before


def test_every_builtin_method_has_a_config_spelling_out_its_defaults():
    from pathlib import Path

    from ssmis.config import load_config
    from ssmis.methods import method_config
    from ssmis.registry import METHODS

    root = Path(__file__).resolve().parents[1] / "configs" / "methods"
    builtin = [n for n in METHODS.list() if METHODS.get(n).__module__.startswith("ssmis.")]
    assert {"supervised", "mean_teacher", "ua_mt", "cps", "fixmatch", "unimatch", "bcp", "abd"} <= set(builtin)
    for name in builtin:
        cfg = load_config(root / f"{name}.yaml")
        assert cfg.method == method_config({"name": name}).model_dump(), name
        assert cfg.data.layout == ("hc18" if name == "ersr" else "ssl4mis_h5"), name   # ERSR is binary: HC18-lite
        if 2 in METHODS.get(name).spatial_dims:
            assert cfg.train.iterations == 2000                                         # ACDC-lite
        else:                                                                           # 3D only (M&N): ACDC-3D
            assert cfg.data.restack_volumes and len(cfg.data.patch_size) == 3


def test_restore_run_loads_every_module_of_a_checkpoint(cli_run, tmp_path):
    """The analysis scripts' entry point: the trainer's modules hold the checkpoint's weights, not a fresh init."""
    import shutil

    import torch

    from ssmis.engine.checkpoint import load_checkpoint
    from ssmis.engine.run import setup
    from ssmis.errors import UserError
    from ssmis.eval.run_eval import load_run, restore_run

    out, rc, _ = cli_run
    assert rc == 0
    run = tmp_path / "run"
    shutil.copytree(out, run)
    cfg, splits, trainer, state = restore_run(run, "last")
    assert state["step"] == 6 and splits.test == load_run(run)[1].test
    saved = load_checkpoint(run / "checkpoints" / "last.pt")["modules"]
    fresh = setup(cfg, run, resuming=True, log=lambda *_: None).ctx.modules
    assert set(trainer.ctx.modules) == set(saved) and len(saved) >= 2      # Mean Teacher: student and teacher
    moved = 0
    for name, module in trainer.ctx.modules.items():
        for key, value in module.state_dict().items():
            assert torch.equal(value, saved[name][key]), f"{name}.{key}"
            moved += not torch.equal(value, fresh[name].state_dict()[key])
    assert moved > 0
    with pytest.raises(UserError, match="checkpoint not found"):
        restore_run(run, "step99")
