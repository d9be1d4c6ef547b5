"""BCP and ABD start self-training from the best-validated pre-training state, as the reference code loads its
best pre-training checkpoint (network and optimiser) into the student(s) and the teacher (issue 16): the
pre-training stage is validated (also at its last step), its best state travels in the checkpoint so that a
resumed run is exact, ABD's second network gets network 1's optimiser state, and the run's best checkpoint is
chosen among the self-training validations only."""

from __future__ import annotations

import pytest
import torch

from ssmis.config import load_config
from ssmis.engine.checkpoint import load_checkpoint
from ssmis.engine.run import setup, train
from ssmis.engine.trainer import Trainer

SMALL = ["data.phantom.size=32", "data.patch_size=[32,32]", "data.phantom.patients=8", "split.labeled=2",
         "split.val=1", "split.test=2", "model.widths=[4,8,16,32,64]", "train.amp='off'", "train.threads=1",
         "train.device=cpu", "train.deterministic=true", "train.log_every=1"]

# 16 steps, pre-training half of them (steps 0-7), validation every 3 steps: in pre-training at steps 3 and 6
# and at its last step 8 (the hand-over validation); the scripted Dice makes step 3 the best pre-training state.
SCRIPTED_DICE = {3: 0.6, 6: 0.4, 8: 0.5, 9: 0.1, 12: 0.3, 15: 0.2, 16: 0.25}


def config(method: str, *extra: str):
    return load_config("phantom", [*SMALL, f"method.name={method}", "method.pretrain=0.5", "train.iterations=16",
                                   "train.eval_every=3", "train.ckpt_every=2", *extra])


@pytest.fixture
def scripted_validation(monkeypatch):
    """Trainer.validate returns SCRIPTED_DICE[step] and records at which steps it ran."""
    seen = []

    def validate(self):
        seen.append(self.step)
        return SCRIPTED_DICE[self.step]

    monkeypatch.setattr(Trainer, "validate", validate)
    return seen


def clone_state(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def same_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def momentum(trainer, name):
    return [trainer.opt.state[p]["momentum_buffer"].clone() if p in trainer.opt.state else None
            for p in trainer.ctx.modules[name].parameters()]


@pytest.mark.parametrize("method", ["bcp", "abd"])
def test_selftraining_starts_from_the_best_pretraining_state(method, scripted_validation, monkeypatch):
    trainer = setup(config(method), None, log=lambda m: None)
    at_step, at_switch = {}, {}
    real_after = trainer.method.after_step

    def after_step(step):                     # the state after step 3 (0-based step 2) is the best one
        real_after(step)
        if step + 1 in (3, 8):
            at_step[step + 1] = (clone_state(trainer.ctx.modules["student"]), momentum(trainer, "student"))

    real_start = trainer.method.start_selftrain

    def start_selftrain():
        real_start()
        at_switch["modules"] = {n: clone_state(m) for n, m in trainer.ctx.modules.items()}
        at_switch["momentum"] = {n: momentum(trainer, n) for n in trainer.ctx.trainable}

    monkeypatch.setattr(trainer.method, "after_step", after_step)
    monkeypatch.setattr(trainer.method, "start_selftrain", start_selftrain)
    result = trainer.fit(None, progress=False)

    assert scripted_validation == [3, 6, 8, 9, 12, 15, 16]          # step 8 = last pre-training step
    best_student, best_momentum = at_step[3]
    assert not same_state(best_student, at_step[8][0])               # pre-training moved on after step 3 ...
    assert same_state(at_switch["modules"]["student"], best_student)  # ... and self-training starts from step 3
    assert same_state(at_switch["modules"]["teacher"], {f"module.{k}": v for k, v in best_student.items()})
    assert all(torch.equal(a, b) for a, b in zip(at_switch["momentum"]["student"], best_momentum))
    if method == "abd":
        assert same_state(at_switch["modules"]["student2"], best_student)
        # network 2 gets network 1's pre-training momentum (it had none: no gradient in pre-training)
        assert all(m is not None and torch.equal(m, b)
                   for m, b in zip(at_switch["momentum"]["student2"], best_momentum))
    # the run's best checkpoint is a self-training one (0.3 at step 12), not the pre-training 0.6
    assert (result["best_val_dice"], result["best_step"]) == (0.3, 12)


def test_last_option_keeps_the_last_pretraining_step(scripted_validation, monkeypatch):
    trainer = setup(config("bcp", "method.selftrain_from=last"), None, log=lambda m: None)
    trainer.fit(None, progress=False, stop_after=8)
    last = clone_state(trainer.ctx.modules["student"])
    trainer.fit(None, progress=False, stop_after=9)
    assert 8 not in scripted_validation                              # no hand-over validation
    # the teacher started from the step-8 student (one EMA step since: α 0.99 of the step-8 weights + 0.01 new)
    student = trainer.ctx.modules["student"].state_dict()
    teacher = trainer.ctx.modules["teacher"].module.state_dict()
    key = "head.weight"
    assert torch.allclose(teacher[key], 0.99 * last[key] + 0.01 * student[key], atol=1e-6)


@pytest.mark.parametrize("method,stop", [("bcp", 6), ("bcp", 8), ("abd", 8), ("abd", 12)],
                         ids=["bcp-in-pretraining", "bcp-at-switch", "abd-at-switch", "abd-in-selftraining"])
def test_exact_resume_with_the_best_pretraining_state(method, stop, scripted_validation, tmp_path):
    """16 steps straight == `stop` steps + resume: the kept best pre-training state is in the checkpoint, so a
    run stopped before or exactly at the switch starts self-training from the same state."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train(config(method), out=straight, progress=False, test_at_end=False)
    train(config(method), out=resumed, progress=False, stop_after=stop, test_at_end=False)
    mid = load_checkpoint(resumed / "checkpoints" / "last.pt")
    assert mid["step"] == stop
    assert (mid["stage_best"] is not None) == (stop <= 8)             # dropped once handed over
    train(config(method), out=resumed, resume=True, progress=False, test_at_end=False)
    a = load_checkpoint(straight / "checkpoints" / "last.pt")
    b = load_checkpoint(resumed / "checkpoints" / "last.pt")
    assert a["step"] == b["step"] == 16
    for name in a["modules"]:
        assert same_state(a["modules"][name], b["modules"][name]), name
    assert same_state(a["optimizer"]["state"][0], b["optimizer"]["state"][0])
    assert a["best"] == b["best"] == 0.3 and a["best_step"] == b["best_step"] == 12
