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


TINY_UNET = dict(widths=(4, 8, 16, 32, 64))
TINY_RESNET_UNET = '{widths: [4, 8, 8, 16, 16], blocks: [1, 1, 1, 1]}'    # a tiny method.net2_args (--set form)


class FixedLogits(torch.nn.Module):
    """A stub network returning the same logits (1×K×spatial, broadcast over the batch) for any input."""

    def __init__(self, logits: torch.Tensor, channels: int = 1):
        super().__init__()
        self.z = torch.nn.Parameter(logits)
        self.init_args = {"in_channels": channels, "num_classes": logits.shape[1]}

    def forward(self, x, need_features=False):
        from ssmis.models.output import SegOutput

        return SegOutput(self.z.expand(x.shape[0], *self.z.shape[1:]))


def tiny_method(cls, total=300, num_classes=4, spatial_dims=2, make_model=None, seed=0, plugins=None, **cfg):
    """A method built directly (no engine) on tiny UNet-2D networks, for behaviour tests; returns (method, ctx).
    `plugins`: a PluginSet for the method's slots (default none)."""
    from ssmis.methods.base import BuildContext
    from ssmis.models.unet import UNet2D

    torch.manual_seed(seed)
    make_model = make_model or (lambda: UNet2D(1, num_classes, **TINY_UNET))
    ctx = BuildContext(make_model, torch.device("cpu"), total, num_classes, spatial_dims, plugins=plugins)
    return cls(cls.Config(**cfg), ctx), ctx


def random_batches(nl=2, nu=2, size=16, classes=4, seed=0):
    """A labelled and an unlabelled Batch of random 2D images (labels uniform over the classes)."""
    from ssmis.methods.base import Batch

    g = torch.Generator().manual_seed(seed)
    lb = Batch(torch.rand(nl, 1, size, size, generator=g), torch.randint(0, classes, (nl, size, size), generator=g))
    ub = Batch(torch.rand(nu, 1, size, size, generator=g))
    ub.mix = Batch(torch.rand(nu, 1, size, size, generator=g))     # the independent batch of mix_batch methods
    return lb, ub


@pytest.fixture(autouse=True)
def _one_thread():
    """Every test runs on one thread (2 shared cores, no oversubscription), runs set up inside it too (the share a
    parent gives, as `ssmis bench` does; train.threads still wins); global state restored afterwards."""
    from ssmis.engine import threads

    n, given = torch.get_num_threads(), threads._given
    threads.assign(1, "tests: one thread")
    yield
    threads._given = given
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


def assert_same(a, b, where=""):
    """Nested checkpoint contents (dicts of tensors and plain values) are bitwise equal."""
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), f"{where} differs"
    elif isinstance(a, dict):
        assert set(a) == set(b), where
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}")
    else:
        assert a == b, where


def straight_and_resumed(cfg, tmp_path, stop: int) -> tuple[dict, dict, dict]:
    """Train `cfg` straight and, in a second folder, `stop` steps then resume to the end. Returns the last
    checkpoints (straight, resumed) and the resumed run's checkpoint at `stop`."""
    from ssmis.engine.checkpoint import load_checkpoint
    from ssmis.engine.run import train

    train(cfg, out=tmp_path / "straight", progress=False, test_at_end=False)
    train(cfg, out=tmp_path / "resumed", progress=False, stop_after=stop, test_at_end=False)
    mid = load_checkpoint(tmp_path / "resumed" / "checkpoints" / "last.pt")
    train(cfg, out=tmp_path / "resumed", resume=True, progress=False, test_at_end=False)
    torch.use_deterministic_algorithms(False)
    return (load_checkpoint(tmp_path / "straight" / "checkpoints" / "last.pt"),
            load_checkpoint(tmp_path / "resumed" / "checkpoints" / "last.pt"), mid)


def train_rows(run_dir) -> list[dict]:
    """The training rows of a run's metrics.csv (step, stage, split, name, value as strings)."""
    import csv

    with open(run_dir / "metrics.csv") as f:
        return [r for r in csv.DictReader(f) if r["split"] == "train"]


def ensemble_test_dice(run_dir) -> float:
    """Mean foreground Dice, on a two-network run's test split (last checkpoint), of the average of both networks'
    softmax (C3S3's published inference, MEDL's paper; `ssmis eval --ensemble`), with the run's own inference."""
    import numpy as np

    from ssmis.data.adapter import make_adapter
    from ssmis.eval.inference import dice_per_class
    from ssmis.eval.run_eval import load_run
    from ssmis.predict import load_trained_model

    cfg, splits = load_run(run_dir)
    model = load_trained_model(run_dir, "last", device="cpu", ensemble=True)
    adapter = make_adapter(cfg.data.layout, cfg.data.root, cfg.data)
    by_id = {it.id: it for it in adapter.items("train") + adapter.items("eval")}
    scores = []
    for cid in splits.test:
        s = adapter.load(by_id[cid])
        scores.append(np.nanmean(dice_per_class(model.predict(s["image"]), s["label"], model.num_classes)))
    return float(np.mean(scores))
