"""Exact resume (design.md section 4) and the run-directory rules (never overwritten silently)."""

from __future__ import annotations

import csv

import pytest
import torch

from conftest import small_config
from ssmis.engine.checkpoint import load_checkpoint
from ssmis.engine.run import train
from ssmis.errors import UserError

N = 4


def exact_config(method: str = "mean_teacher", *extra: str):
    return small_config(method, 2 * N, "train.deterministic=true", "train.threads=1", f"train.ckpt_every={N}",
                        f"train.eval_every={N}", "train.log_every=1", *extra)


def rows(run, split=None):
    with open(run / "metrics.csv") as f:
        return [r for r in csv.DictReader(f) if split is None or r["split"] == split]


def assert_same_tensors(a, b, where=""):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a, b), f"{where} differs"
    elif isinstance(a, dict):
        assert set(a) == set(b), where
        for k in a:
            assert_same_tensors(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_tensors(x, y, f"{where}.{i}")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    out = tmp_path_factory.mktemp("straight") / "run"
    n = torch.get_num_threads()
    train(exact_config(), out=out, progress=False, test_at_end=False)
    torch.use_deterministic_algorithms(False)
    torch.set_num_threads(n)
    return out


@pytest.mark.parametrize("stop", [N, N + 2], ids=["stop-at-checkpoint", "crash-after-checkpoint"])
def test_exact_resume_mean_teacher(straight, tmp_path, stop):
    """2N steps straight == N steps + --resume (bitwise weights of student and teacher, optimiser, streams,
    identical metrics rows). Stopping at N + 2 with the checkpoint at N also drops the rows past N."""
    out = tmp_path / "run"
    first = train(exact_config(), out=out, progress=False, stop_after=stop, test_at_end=False)
    assert first["step"] == stop
    assert load_checkpoint(out / "checkpoints" / "last.pt")["step"] == N
    assert max(int(r["step"]) for r in rows(out)) == stop
    train(exact_config(), out=out, resume=True, progress=False, test_at_end=False)

    a = load_checkpoint(straight / "checkpoints" / "last.pt")
    b = load_checkpoint(out / "checkpoints" / "last.pt")
    assert a["step"] == b["step"] == 2 * N
    assert set(a["modules"]) == {"student", "teacher"}
    assert_same_tensors(a["modules"], b["modules"], "modules")
    assert_same_tensors(a["eval_weights"], b["eval_weights"], "eval_weights")
    assert_same_tensors(a["optimizer"], b["optimizer"], "optimizer")
    assert a["streams"] == b["streams"]
    assert_same_tensors(a["rng"], b["rng"], "rng")
    assert (a["best"], a["best_step"]) == (b["best"], b["best_step"])
    # the teacher is really an EMA that differs from the student (so both were compared meaningfully)
    student, teacher = a["modules"]["student"], a["modules"]["teacher"]
    assert set(teacher) == {"module." + k for k in student}
    assert not torch.equal(student["head.weight"], teacher["module.head.weight"])
    ra, rb = rows(straight, "train"), rows(out, "train")
    assert len(ra) > 2 * N and ra == rb
    assert rows(straight, "val") == rows(out, "val")
    assert_same_tensors(load_checkpoint(straight / "checkpoints" / "best.pt")["modules"],
                        load_checkpoint(out / "checkpoints" / "best.pt")["modules"], "best")


def test_resume_with_a_different_config_is_refused(tmp_path):
    out = tmp_path / "run"
    train(exact_config(), out=out, progress=False, stop_after=N, test_at_end=False)
    before = (out / "checkpoints" / "last.pt").read_bytes()
    with pytest.raises(UserError) as e:
        train(exact_config("mean_teacher", "optim.lr=0.02"), out=out, resume=True, progress=False)
    assert "optim.lr: 0.01 -> 0.02" in str(e.value)
    assert "config differs" in str(e.value)
    with pytest.raises(UserError) as e:
        train(exact_config("mean_teacher", "method.lambda_u=0.5"), out=out, resume=True, progress=False)
    assert "method.lambda_u: 0.1 -> 0.5" in str(e.value)
    assert "optim.lr" not in str(e.value)
    assert (out / "checkpoints" / "last.pt").read_bytes() == before
    # settings that do not change the computation may differ (a long run resumed with more frequent checkpoints)
    r = train(exact_config("mean_teacher", "train.log_every=3", f"train.ckpt_every={N + 1}"), out=out, resume=True,
              progress=False, test_at_end=False)
    assert r["step"] == 2 * N


def test_resume_without_a_run_is_refused(tmp_path):
    with pytest.raises(UserError, match="no run to resume"):
        train(exact_config(), out=tmp_path / "nothing", resume=True, progress=False)


def test_existing_run_dir_needs_resume_or_overwrite(tmp_path):
    out = tmp_path / "run"
    train(small_config("supervised", 2), out=out, progress=False, test_at_end=False)
    marker = out / "checkpoints" / "last.pt"
    before = marker.read_bytes()
    with pytest.raises(UserError, match="run directory already exists.*--resume.*--overwrite"):
        train(small_config("supervised", 2), out=out, progress=False, test_at_end=False)
    assert marker.read_bytes() == before
    # --overwrite on an ssmis run replaces it
    (out / "stale.txt").write_text("x")
    train(small_config("supervised", 3), out=out, overwrite=True, progress=False, test_at_end=False)
    assert not (out / "stale.txt").exists()
    assert load_checkpoint(marker)["step"] == 3


def test_overwrite_refuses_a_folder_that_is_not_a_run(tmp_path):
    out = tmp_path / "precious"
    out.mkdir()
    (out / "thesis.tex").write_text("do not delete")
    with pytest.raises(UserError, match="not an ssmis run"):
        train(small_config("supervised", 2), out=out, overwrite=True, progress=False, test_at_end=False)
    assert (out / "thesis.tex").read_text() == "do not delete"
    assert sorted(p.name for p in out.iterdir()) == ["thesis.tex"]


def test_resume_before_the_first_checkpoint_drops_the_stale_rows(tmp_path):
    cfg = small_config("supervised", 6, "train.ckpt_every=6", "train.log_every=1", "train.eval_every=0")
    out = tmp_path / "run"
    train(cfg, out=out, progress=False, stop_after=3, test_at_end=False)     # interrupted, no last.pt yet
    assert not (out / "checkpoints" / "last.pt").exists()
    train(cfg, out=out, resume=True, progress=False, test_at_end=False)
    steps = [int(r["step"]) for r in rows(out, "train") if r["name"] == "loss"]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_keys_added_to_the_schema_since_a_run_do_not_block_resume():
    from ssmis.engine.rundir import config_differences

    old = {"train": {"iterations": 10}, "data": {"patch_size": [32, 32]}}
    new = {"train": {"iterations": 10, "intensity": 0.0}, "data": {"patch_size": [32, 32]}}
    defaults = {"train": {"iterations": 2000, "intensity": 0.0}}
    assert config_differences(old, new, defaults) == []
    new["train"]["intensity"] = 0.2
    assert config_differences(old, new, defaults) == ["train.intensity: (absent) -> 0.2"]
    new["train"]["intensity"], new["train"]["iterations"] = 0.0, 20
    assert config_differences(old, new, defaults) == ["train.iterations: 10 -> 20"]


def test_a_plugin_option_added_since_a_run_does_not_block_resume():
    """Plug-in sections are compared key by key, against that plug-in's own defaults (MetaSSL's ramp_start came
    after its ACDC-lite cells: their folders must still resume and be skipped)."""
    from ssmis.config import load_config
    from ssmis.engine.rundir import config_differences
    from ssmis.engine.run import default_config

    cfg = load_config(None, ["method.name=mean_teacher", "plugins=[{name: metassl}]"])
    new = cfg.model_dump(mode="json")
    old = cfg.model_dump(mode="json")
    del old["plugins"][0]["ramp_start"]
    assert config_differences(old, new, default_config(cfg)) == []
    new["plugins"][0]["ramp_start"] = 0.5
    assert config_differences(old, new, default_config(cfg)) == ["plugins.0.ramp_start: (absent) -> 0.5"]
    new["plugins"][0]["ramp_start"], new["plugins"][0]["rho"] = 0.0, 0.9
    assert config_differences(old, new, default_config(cfg)) == ["plugins.0.rho: 0.6 -> 0.9"]
