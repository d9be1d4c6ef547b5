"""Multi-process training: 2 gloo processes end with identical weights, a 1-process run resumes their
checkpoint, and `torchrun -m ssmis train` works; plus the batch-divisibility error."""

import os
import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as mp

from ssmis.config import load_config
from ssmis.engine.checkpoint import load_checkpoint
from ssmis.errors import UserError

TINY = ["data.phantom.size=32", "data.patch_size=[32,32]", "data.phantom.patients=8", "split.labeled=2",
        "split.val=2", "split.test=1", "model.widths=[4,8,16,32,64]", "train.amp='off'", "train.threads=1",
        "train.eval_every=4", "train.ckpt_every=4", "method.name=mean_teacher"]


def _leave_group() -> None:
    """Both ranks meet, leave the group, and exit without interpreter finalisation: a gloo worker thread
    finalised after Python's teardown aborted rank 1 once (SIGABRT, 'terminate called without an active
    exception'). Called only after the worker's work succeeded, so failures still surface as exceptions."""
    from ssmis.engine import dist

    dist.shutdown()
    os._exit(0)


def _join_group(rank: int, world: int, store: str) -> None:
    """Set torchrun's environment and join the gloo group through a file store: no TCP port to pick, so no race
    with other processes for a port chosen free and then closed (torchrun's env:// path: test_torchrun_cli)."""
    import torch.distributed as tdist

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    tdist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)


def _worker(rank: int, world: int, store: str, out: str, overrides: list[str], stop_after: int) -> None:
    _join_group(rank, world, store)
    import torch.distributed as tdist

    from ssmis.engine.run import train

    torch.set_num_threads(1)
    cfg = load_config("phantom", overrides)
    try:
        train(cfg, out=out, progress=False, stop_after=stop_after, test_at_end=False)
    except BaseException:
        tdist.destroy_process_group()
        raise
    _leave_group()


def _run_world(tmp_path, world, overrides, stop_after):
    store = tmp_path / f"store-{len(list(tmp_path.glob('store-*')))}"     # a fresh store per world
    mp.start_processes(_worker, args=(world, str(store), str(tmp_path / "run"), overrides, stop_after), nprocs=world,
                       start_method="spawn", join=True)


@pytest.mark.timeout(240)
def test_two_gloo_processes_agree_and_one_process_resumes(tmp_path, monkeypatch):
    overrides = TINY + ["train.iterations=16"]
    _run_world(tmp_path, 2, overrides, stop_after=8)
    state = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert state["step"] == 8 and len(state["rng"]["torch"]) == 2
    # each rank has its own random stream (dropout, teacher noise), saved per rank
    assert not torch.equal(state["rng"]["torch"][0], state["rng"]["torch"][1])
    # a single process resumes the 2-process checkpoint and finishes the run
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    from ssmis.engine.run import train

    torch.set_num_threads(1)
    r = train(load_config("phantom", overrides), out=tmp_path / "run", resume=True, progress=False, test_at_end=False)
    assert r["step"] == 16
    log = (tmp_path / "run" / "log.txt").read_text()
    assert "2 processes" in log and "resumed at step 8" in log


@pytest.mark.timeout(240)
def test_weights_identical_on_both_ranks(tmp_path):
    mp.start_processes(_dump_worker, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2, start_method="spawn",
                       join=True)
    a = torch.load(tmp_path / "rank0.pt")
    b = torch.load(tmp_path / "rank1.pt")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _dump_worker(rank: int, world: int, store: str, tmp: str) -> None:
    _join_group(rank, world, store)
    from ssmis.engine import dist
    from ssmis.engine.run import setup

    torch.set_num_threads(1)
    # with stateful plug-ins: their statistics are summed over the two processes each step (class_threshold at
    # step end, MetaSSL inside the step, before its regions), so the thresholds agree after every step (not only
    # after the buffer averaging at checkpoints and at the end)
    cfg = load_config("phantom", TINY + ["train.iterations=6", "train.eval_every=3",
                                         "plugins=[{name: class_threshold}, {name: metassl}]"])
    dinfo = dist.init("cpu")
    trainer = setup(cfg, None, log=lambda m: None, dinfo=dinfo)
    plugin, metassl, taus = trainer.ctx.plugins.items[0], trainer.ctx.plugins.items[1], []
    after_step = trainer.method.after_step
    trainer.method.after_step = lambda step: (after_step(step),
                                              taus.append(torch.cat([plugin.tau, metassl.tau.flatten()])))
    trainer.fit(progress=False)
    flat = {f"{n}.{k}": v for n, m in trainer.ctx.modules.items() for k, v in m.state_dict().items()}
    flat["val"] = torch.tensor(trainer.history)
    flat["tau_per_step"] = torch.stack(taus)
    assert len(taus) == 6 and not (flat["tau_per_step"][:, 4:] == 0.9).all()
    torch.save(flat, f"{tmp}/rank{rank}.pt")
    _leave_group()


@pytest.mark.timeout(300)
def test_torchrun_cli(tmp_path):
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    cmd = [torchrun, "--standalone", "--nproc_per_node=2", "-m", "ssmis", "train", "phantom", "--out",
           str(tmp_path / "run")] + [a for o in TINY + ["train.iterations=8"] for a in ("--set", o)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=280)
    assert p.returncode == 0, p.stderr[-3000:]
    assert (tmp_path / "run" / "checkpoints" / "last.pt").is_file()
    assert (tmp_path / "run" / "eval" / "test-best" / "summary.json").is_file()
    assert "2 processes" in (tmp_path / "run" / "log.txt").read_text()


def test_batch_must_divide_by_world():
    from ssmis.engine.dist import check_batch

    with pytest.raises(UserError, match="train.labeled_bs.*does not divide by the 2 processes"):
        check_batch(2, 3, 4)
    check_batch(2, 4, 4)
