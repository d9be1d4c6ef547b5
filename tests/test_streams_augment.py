"""Two-stream sampler (design.md section 4), the labels-only sampler, and batch-wise geometric augmentation."""

from __future__ import annotations

import pytest
import torch

from conftest import small_config
from ssmis.data.augment import random_geometry, rotate_nearest
from ssmis.engine.streams import Stream


def draw(stream: Stream, batches: int) -> list[torch.Tensor]:
    return [stream.next()[0] for _ in range(batches)]


@pytest.mark.parametrize("n,bs", [(4, 2), (5, 2), (7, 3), (10, 4)])
def test_each_index_once_per_pass(n, bs):
    s = Stream(n, bs, seed=0, stream_id=0)
    flat = torch.cat(draw(s, 6 * n // bs + 1)).tolist()
    passes = [flat[p * n:(p + 1) * n] for p in range(len(flat) // n)]
    assert len(passes) >= 6
    for p in passes:
        assert sorted(p) == list(range(n))
    # fresh permutation each pass (not the same order repeated)
    assert len({tuple(p) for p in passes}) > 1


def test_stream_is_deterministic_from_the_seed():
    a = draw(Stream(20, 4, seed=3, stream_id=0), 12)
    b = draw(Stream(20, 4, seed=3, stream_id=0), 12)
    c = draw(Stream(20, 4, seed=4, stream_id=0), 12)
    d = draw(Stream(20, 4, seed=3, stream_id=1), 12)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))
    assert not all(torch.equal(x, y) for x, y in zip(a, d))
    # augmentation generators too: same seed and draw -> same random numbers, next draw -> different ones
    g1 = Stream(20, 4, 3, 0).next()[1]
    g2 = Stream(20, 4, 3, 0).next()[1]
    assert torch.equal(torch.rand(8, generator=g1), torch.rand(8, generator=g2))
    s = Stream(20, 4, 3, 0)
    r0, r1 = torch.rand(8, generator=s.next()[1]), torch.rand(8, generator=s.next()[1])
    assert not torch.equal(r0, r1)


def test_stream_resume_continues_identically():
    ref = Stream(9, 4, seed=1, stream_id=1)
    for _ in range(7):
        ref.next()
    state = ref.state_dict()
    assert state == {"drawn": 28}
    resumed = Stream(9, 4, seed=1, stream_id=1)
    resumed.load_state_dict(state)
    for _ in range(10):
        (i1, g1), (i2, g2) = ref.next(), resumed.next()
        assert torch.equal(i1, i2)
        assert torch.equal(torch.rand(5, generator=g1), torch.rand(5, generator=g2))


def test_ddp_shards_are_disjoint_and_make_up_the_global_batch():
    n, bs = 11, 4
    whole = Stream(n, bs, seed=5, stream_id=0)
    r0 = Stream(n, bs, seed=5, stream_id=0, rank=0, world=2)
    r1 = Stream(n, bs, seed=5, stream_id=0, rank=1, world=2)
    for _ in range(3 * n):
        w, (a, ga), (b, gb) = whole.next()[0], r0.next(), r1.next()
        assert len(a) == len(b) == bs // 2
        assert torch.equal(torch.cat([a, b]), w)
        # a batch that does not cross a pass boundary never repeats an index across the two ranks
        if len(set(w.tolist())) == bs:
            assert not set(a.tolist()) & set(b.tolist())
        # each rank augments with its own random numbers
        assert not torch.equal(torch.rand(4, generator=ga), torch.rand(4, generator=gb))
    assert r0.state_dict() == r1.state_dict() == whole.state_dict()


# ---- labels-only sampling ------------------------------------------------------------------------

def test_supervised_never_touches_the_unlabelled_set(monkeypatch):
    """Supervised: no unlabelled stream, no unlabelled case loaded, batches only from the labelled slices."""
    from ssmis.data.phantom import PhantomAdapter
    from ssmis.engine.run import setup

    loaded = []
    real_load = PhantomAdapter.load
    monkeypatch.setattr(PhantomAdapter, "load", lambda self, item: loaded.append(item.id) or real_load(self, item))
    cfg = small_config("supervised", 50, "train.labeled_bs=4", "train.unlabeled_bs=4")
    trainer = setup(cfg, None, log=lambda m: None)
    assert trainer.unlabeled is None and trainer.ub_source is None
    from ssmis.data.splits import make_splits
    from ssmis.data.adapter import make_adapter

    splits = make_splits(make_adapter("phantom", None, cfg.data), cfg.split)
    assert splits.unlabeled, "the test needs unlabelled patients to exist"
    assert not set(loaded) & set(splits.unlabeled)

    n = len(trainer.labeled)                       # 2 patients x 8 slices
    seen = []
    net = trainer.ctx.modules["student"]

    def recording_step(lb, ub, step):
        assert ub is None
        seen.append(lb.index.clone())
        from ssmis.methods.base import StepOutput
        return StepOutput(sum((p * 0).sum() for p in net.parameters()), {})

    trainer.method.train_step = recording_step
    trainer.val_cases = []
    trainer.fit(None, progress=False)
    flat = torch.cat(seen).tolist()
    assert len(seen) == 50 and max(flat) < n
    for p in range(len(flat) // n):
        assert sorted(flat[p * n:(p + 1) * n]) == list(range(n))


def test_mean_teacher_draws_both_streams():
    from ssmis.engine.run import setup

    trainer = setup(small_config("mean_teacher", 5), None, log=lambda m: None)
    assert trainer.unlabeled is not None and trainer.ub_source is not None
    assert trainer.unlabeled.labels is None                 # unlabelled masks are never carried
    assert len(trainer.unlabeled) == 3 * 8 and len(trainer.labeled) == 2 * 8
    assert set(trainer.labeled.cases).isdisjoint(trainer.unlabeled.cases)


# ---- augmentation --------------------------------------------------------------------------------

def label_maps(b: int, size: int = 16, seed: int = 0) -> torch.Tensor:
    """Asymmetric random label maps (classes 0-3 in blocks), so every rot/flip is distinguishable."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randint(0, 4, (b, size // 4, size // 4), generator=g)
    lab = coarse.repeat_interleave(4, 1).repeat_interleave(4, 2)
    lab[:, 0, 0] = 3                                # break symmetries further
    return lab


def reflections(x: torch.Tensor) -> list[torch.Tensor]:
    """The four results of rot90(k) + flip of an H×W map (the rot-flip branch)."""
    return [torch.rot90(x, k, (0, 1)).flip(ax) for k in range(4) for ax in (0, 1)]


@pytest.mark.parametrize("kind", ["ssl4mis", "bcp"])
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_augmentation_keeps_image_and_label_aligned(kind, seed):
    lab = label_maps(32, seed=seed)
    img = lab[:, None].float()
    out_img, out_lab = random_geometry(img, lab, torch.Generator().manual_seed(seed), kind)
    assert out_img.shape == img.shape and out_lab.shape == lab.shape and out_lab.dtype == lab.dtype
    assert torch.equal(out_img[:, 0], out_lab.float())
    changed = [not torch.equal(out_lab[i], lab[i]) for i in range(32)]
    assert sum(changed) >= 8                         # it does augment
    # the inputs are not modified in place
    assert torch.equal(img[:, 0], lab.float())
    # same generator seed -> same result
    again = random_geometry(img, lab, torch.Generator().manual_seed(seed), kind)
    assert torch.equal(again[0], out_img) and torch.equal(again[1], out_lab)


def test_augmentation_without_label_matches_the_labelled_geometry():
    lab = label_maps(16, seed=7)
    img = lab[:, None].float()
    a, _ = random_geometry(img, lab, torch.Generator().manual_seed(9), "ssl4mis")
    b, none = random_geometry(img, None, torch.Generator().manual_seed(9), "ssl4mis")
    assert none is None and torch.equal(a, b)
    c, lc = random_geometry(img, lab, torch.Generator().manual_seed(9), "none")
    assert c is img and lc is lab


@pytest.mark.parametrize("kind", ["ssl4mis", "bcp"])
def test_geometry_distribution(kind):
    """About half rot90+flip; the rest a rotation by an integer angle in [-20, 19] (ssl4mis), or for bcp
    a rotation with p = 0.5 and nothing otherwise."""
    b = 2000
    # per-pixel random labels on 64x64, so that even a 1-degree rotation moves some pixel
    lab = torch.randint(0, 4, (b, 64, 64), generator=torch.Generator().manual_seed(11))
    out_img, out_lab = random_geometry(lab[:, None].float(), lab, torch.Generator().manual_seed(1), kind)
    kinds = []
    for i in range(b):
        if any(torch.equal(out_lab[i], r) for r in reflections(lab[i])):
            kinds.append("rotflip")
        elif torch.equal(out_lab[i], lab[i]):
            kinds.append("identity")
        else:
            kinds.append("rotate")
    frac = {k: kinds.count(k) / b for k in ("rotflip", "identity", "rotate")}
    assert frac["rotflip"] == pytest.approx(0.5, abs=0.05)
    if kind == "ssl4mis":
        assert frac["identity"] < 0.04                   # only the angle-0 rotation (1/40 of the other half)
        assert frac["rotate"] == pytest.approx(0.5, abs=0.05)
    else:
        assert frac["identity"] == pytest.approx(0.25 + 0.25 / 40, abs=0.05)
        assert frac["rotate"] == pytest.approx(0.25 - 0.25 / 40, abs=0.05)
    # rotated samples are exactly a nearest-neighbour rotation by an angle in [-20, 19] degrees
    rot = [i for i, k in enumerate(kinds) if k == "rotate"][:6]
    angles = torch.arange(-20, 20)
    for i in rot:
        cands = rotate_nearest(lab[i][None, None].float().expand(40, 1, -1, -1), angles)
        assert any(torch.equal(cands[j, 0], out_lab[i].float()) for j in range(40)), f"sample {i}"
