"""Batches made one step ahead in a thread (train.prefetch) are the batches made in place: same training,
exact resume, 2D and 3D."""

import torch

from conftest import assert_same, small_config, straight_and_resumed
from ssmis.engine.run import setup


def _batches(cfg, n):
    trainer = setup(cfg, None, log=lambda m: None)
    out = [trainer._batches() for _ in range(n)]
    for src in (trainer.lb_source, trainer.ub_source, trainer.mix_source):
        if src is not None:
            src.close()
    return out


def _same(a, b):
    for (la, ua), (lb_, ub_) in zip(a, b):
        assert torch.equal(la.image, lb_.image) and torch.equal(la.label, lb_.label)
        assert torch.equal(ua.image, ub_.image) and torch.equal(ua.index, ub_.index)
        if ua.mix is not None:
            assert torch.equal(ua.mix.image, ub_.mix.image)


def test_prefetched_batches_are_the_batches_made_in_place_2d():
    _same(_batches(small_config("fixmatch", 8, "train.prefetch=off"), 5),
          _batches(small_config("fixmatch", 8, "train.prefetch=on"), 5))


def test_prefetched_batches_are_the_batches_made_in_place_3d():
    sets = ["data.layout=sphere", "data.patch_size=[16,16,16]", "model.name=vnet", "model.widths=[4,8,16,32,64]",
            "train.labeled_bs=2", "train.unlabeled_bs=2"]
    _same(_batches(small_config("mean_teacher", 8, *sets, "train.prefetch=off"), 4),
          _batches(small_config("mean_teacher", 8, *sets, "train.prefetch=on"), 4))


def test_resume_is_exact_with_prefetch(tmp_path):
    cfg = small_config("fixmatch", 6, "train.prefetch=on", "train.deterministic=true", "train.ckpt_every=3")
    straight, resumed, _ = straight_and_resumed(cfg, tmp_path, 3)
    assert_same(straight["modules"], resumed["modules"])
    assert straight["streams"] == resumed["streams"]
