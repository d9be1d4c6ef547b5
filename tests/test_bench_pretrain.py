"""Suites with `pretrain:` (SPCL initialisation in a bench): one pre-training per seed before the cells, every cell
starting from its encoder, the report's pre-training table, a missing (uncommitted) checkpoint re-made when a cell
needs it, and the mistakes as one clear error."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import yaml

from conftest import SMALL
from ssmis.bench import run_suite
from ssmis.cli import main
from ssmis.errors import UserError

COMMON = {k: yaml.safe_load(v) for k, v in (o.split("=", 1) for o in SMALL)}


def write_suite(tmp_path, **extra):
    pre = {"base": "phantom", **{k: v for k, v in COMMON.items() if not k.startswith("split")}}
    pre.update({"pretrain.scans_per_batch": 3, "train.iterations": 4, "train.ckpt_every": 4, "train.log_every": 1,
                "train.deterministic": True})
    (tmp_path / "pre.yaml").write_text(yaml.safe_dump(_nest(pre)))
    common = {**COMMON, "train.iterations": 6, "train.eval_every": 6, "train.ckpt_every": 6, "train.log_every": 3}
    suite = {"name": "spcl", "base": "phantom", "pretrain": "pre.yaml", "set": common,
             "grid": {"method.name": ["supervised", "mean_teacher"], "split.labeled": [1, 2], "seed": [0, 1]},
             "qualitative": {"slices": 1},
             **extra}
    path = tmp_path / "spcl.yaml"
    path.write_text(yaml.safe_dump(suite, sort_keys=False))
    return path


def _nest(dotted):
    out = {}
    for k, v in dotted.items():
        node = out
        *parents, last = k.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = v
    return out


@pytest.fixture(scope="module")
def ran(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bench_pre")
    path, out = write_suite(tmp), tmp / "out"
    n = torch.get_num_threads()
    assert run_suite(path, out=out, progress=False) == 0
    torch.use_deterministic_algorithms(False)
    torch.set_num_threads(n)
    return path, out


def test_each_seed_is_pretrained_once_and_its_cells_start_from_it(ran):
    path, out = ran
    pres = sorted(p.name for p in out.glob("pretrain-*"))
    assert pres == ["pretrain-s0", "pretrain-s1"]                 # one per seed, for both labelled counts
    for p in pres:
        summary = json.loads((out / p / "pretrain_summary.json").read_text())
        assert summary["step"] == summary["total"] == 4
        assert (out / p / "plots" / "pretrain.png").is_file()
        assert yaml.safe_load((out / p / "config.yaml").read_text())["seed"] == int(p[-1])
    cells = [f"{m}-l{n}-s{k}" for m in ("supervised", "mean_teacher") for n in (1, 2) for k in (0, 1)]
    for cell in cells:
        seed = cell[-1]
        cfg = yaml.safe_load((out / cell / "config.yaml").read_text())
        assert cfg["init"]["encoder"] == (out / f"pretrain-s{seed}").as_posix()
        info = json.loads((out / cell / "train_summary.json").read_text())["init_encoder"]
        assert info["path"].endswith(f"pretrain-s{seed}/checkpoints/last.pt") and info["pretrain_step"] == 4
        # the pre-training used the cell's training cases (labelled or not) and never its val or test cases
        mine = json.loads((out / cell / "splits.json").read_text())
        pre = json.loads((out / f"pretrain-s{seed}" / "splits.json").read_text())
        assert sorted(mine["labeled"] + mine["unlabeled"]) == sorted(pre["labeled"] + pre["unlabeled"])
        assert (mine["val"], mine["test"]) == (pre["val"], pre["test"])
    md = (out / "results.md").read_text()
    assert "## Pre-training" in md and "| `pretrain-s0` | 4 |" in md and "| `pretrain-s1` | 4 |" in md


def test_a_missing_pretraining_checkpoint_is_remade_only_when_a_cell_needs_it(ran, tmp_path, capsys):
    path, out = ran
    copy = tmp_path / "copy"
    shutil.copytree(out, copy, ignore=shutil.ignore_patterns("*.pt"))     # as committed: no checkpoints
    assert main(["bench", str(path), "--out", str(copy), "--dry-run"]) == 0
    assert "pre-training: finished, checkpoint missing" in capsys.readouterr().out
    n = torch.get_num_threads()
    assert run_suite(path, out=copy, progress=False) == 0                 # every cell finished: nothing re-made
    assert not (copy / "pretrain-s0" / "checkpoints" / "last.pt").exists()
    shutil.rmtree(copy / "supervised-l1-s1")
    assert run_suite(path, out=copy, progress=False, only=["supervised-l1-s1"]) == 0
    torch.use_deterministic_algorithms(False)
    torch.set_num_threads(n)
    assert "not committed" in capsys.readouterr().err
    assert (copy / "pretrain-s1" / "checkpoints" / "last.pt").is_file()
    assert not (copy / "pretrain-s0" / "checkpoints" / "last.pt").exists()
    # deterministic: the re-made pre-training is the committed one
    a = torch.load(out / "pretrain-s1" / "checkpoints" / "last.pt", weights_only=False)
    b = torch.load(copy / "pretrain-s1" / "checkpoints" / "last.pt", weights_only=False)
    for k, v in a["encoder"].items():
        assert torch.equal(v, b["encoder"][k]), k


def test_pretrain_suite_mistakes(tmp_path):
    path = write_suite(tmp_path, grid={"method.name": ["supervised"], "split.seed": [1, 2], "seed": [0]})
    with pytest.raises(UserError, match="share pretrain-s0 but their splits differ"):
        run_suite(path, dry_run=True)
    path = write_suite(tmp_path, set={**COMMON, "init.encoder": "somewhere"})
    with pytest.raises(UserError, match="init.encoder comes from `pretrain`"):
        run_suite(path, dry_run=True)
    path = write_suite(tmp_path)
    raw = yaml.safe_load(path.read_text())
    raw["set"]["data.patch_size"] = [24, 24]
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(UserError, match="data.patch_size"):
        run_suite(path, dry_run=True)


def test_a_pretraining_another_process_is_making_is_waited_for_not_made_twice(tmp_path, monkeypatch, capsys):
    """Two `ssmis bench` processes of one suite (two --only selections) need pretrain-s0: the second waits for the
    first's lock and then finds the run ready instead of writing the same folder at once."""
    fcntl = pytest.importorskip("fcntl")          # POSIX; Windows runs without the lock
    import threading
    import time

    import ssmis.spcl.pretrain as pretrain_module
    from ssmis.bench.pretraining import SUMMARY, PretrainRun, ensure_pretrained

    calls = []
    monkeypatch.setattr(pretrain_module, "pretrain", lambda *a, **k: calls.append(k) or {"step": 1, "total": 1})
    run = PretrainRun("pretrain-s0", None, tmp_path / "pretrain-s0")
    assert run.state == "new"
    with open(tmp_path / ".pretrain-s0.lock", "w") as held:      # the "other process" (another open file description)
        fcntl.flock(held, fcntl.LOCK_EX)
        worker = threading.Thread(target=ensure_pretrained, args=([run], None, False))
        worker.start()
        time.sleep(0.5)
        assert worker.is_alive() and calls == []                # blocked on the lock, nothing written
        (run.dir / "checkpoints").mkdir(parents=True)           # the other process finishes the run
        (run.dir / "checkpoints" / "last.pt").write_bytes(b"x")
        (run.dir / SUMMARY).write_text("{}")
        fcntl.flock(held, fcntl.LOCK_UN)
    worker.join(10)
    assert not worker.is_alive() and calls == []
    assert "another process is making this pre-training" in capsys.readouterr().err
    ensure_pretrained([PretrainRun("pretrain-s1", None, tmp_path / "pretrain-s1")], None, False)   # free: made
    assert len(calls) == 1
