"""Shared fixtures: small phantom configs and one tiny trained run reused by the CLI tests."""

from __future__ import annotations

import pytest
import torch

# A tiny phantom: 32x32 slices, 8 patients (2 labelled, 3 unlabelled, 1 val, 2 test), a narrow UNet.
SMALL = [
    "data.phantom.size=32",
    "data.patch_size=[32,32]",
    "data.phantom.patients=8",
    "split.val=1",
    "split.test=2",
    "model.widths=[4,8,16,32,64]",
    "train.amp='off'",          # quoted: a bare `off` is YAML for False
    "train.threads=1",
    "train.device=cpu",
]


def small_overrides(method: str = "supervised", iterations: int = 10, *extra: str) -> list[str]:
    """--set style overrides for a fast phantom run of `method`."""
    return [*SMALL, f"method.name={method}", f"train.iterations={iterations}",
            f"train.eval_every={iterations}", f"train.ckpt_every={iterations}", *extra]


def small_config(method: str = "supervised", iterations: int = 10, *extra: str):
    from ssmis.config import load_config

    return load_config("phantom", small_overrides(method, iterations, *extra))


@pytest.fixture(autouse=True)
def _one_thread():
    """Every test runs on one thread (2 shared cores, no oversubscription); global state restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
    torch.use_deterministic_algorithms(False)


@pytest.fixture(scope="session")
def cli_run(tmp_path_factory):
    """`ssmis train` of a few steps on the tiny phantom; returns (run dir, exit code, stderr text)."""
    import contextlib
    import io

    from ssmis.cli import main

    out = tmp_path_factory.mktemp("cli") / "run"
    err = io.StringIO()
    args = ["train", "phantom", "--out", str(out)]
    for o in small_overrides("mean_teacher", 6, "train.eval_every=3", "train.ckpt_every=3"):
        args += ["--set", o]
    n = torch.get_num_threads()
    with contextlib.redirect_stderr(err):
        rc = main(args)
    torch.set_num_threads(n)
    return out, rc, err.getvalue()
