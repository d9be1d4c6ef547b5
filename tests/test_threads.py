"""Thread budget (ssmis.engine.threads), memory format per device (ssmis.engine.amp) and the bench's share of
threads per worker; no GPU needed: CUDA is faked where a rule depends on it."""

from __future__ import annotations

import concurrent.futures
import os
from pathlib import Path

import pytest
import torch

from ssmis.bench import grid
from ssmis.bench.grid import Cell
from ssmis.config import load_config
from ssmis.engine import threads
from ssmis.engine.amp import resolve_precision
from ssmis.engine.threads import thread_budget


def test_cpu_takes_its_share_of_the_cores():
    assert thread_budget("cpu", 16, 1, None) == (16, "CPU: 16 cores")
    assert thread_budget("cpu", 16, 4, None)[0] == 4               # torchrun, 4 processes on this machine


def test_cuda_takes_few_threads():
    n, why = thread_budget("cuda", 16, 1, None)
    assert n == 4 and "CUDA" in why and "4" in why
    assert thread_budget("cuda", 2, 1, None)[0] == 2               # below the cap: the cores there are
    assert thread_budget("cuda", 16, 8, None)[0] == 2              # 8 ranks on 16 cores


def test_jobs_divide_the_cores():
    assert thread_budget("cpu", 16, 1, None, jobs=4) == (4, "CPU: 16 cores // 4 processes on this machine")
    assert thread_budget("cuda", 16, 1, None, jobs=3)[0] == 4      # the three side-by-side H200 runs
    assert thread_budget("cuda", 6, 1, None, jobs=3)[0] == 2
    assert thread_budget("cpu", 16, 2, None, jobs=2)[0] == 4       # processes = local ranks x jobs


def test_explicit_threads_win():
    assert thread_budget("cuda", 16, 1, 12) == (12, "train.threads=12")
    assert thread_budget("cpu", 2, 4, 3, jobs=2) == (3, "train.threads=3")


def test_never_below_one_thread():
    assert thread_budget("cpu", 2, 4, None)[0] == 1
    assert thread_budget("cuda", 3, 2, None, jobs=4)[0] == 1
    assert thread_budget("cpu", 0, 0, None, jobs=0)[0] == 1


def test_apply_reads_the_machine(monkeypatch):
    monkeypatch.setattr(threads, "_given", None)
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert threads.apply("cpu", None) == (2, "CPU: 16 cores // 8 processes on this machine")
    assert torch.get_num_threads() == 2
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    assert threads.apply("cuda", None)[0] == 4
    assert threads.apply("cuda", 1) == (1, "train.threads=1")
    assert torch.get_num_threads() == 1


def test_a_given_share_holds_unless_train_threads(monkeypatch):
    monkeypatch.setattr(threads, "_given", None)
    threads.assign(2, "bench share")
    assert torch.get_num_threads() == 2
    assert threads.apply("cpu", None) == (2, "bench share")
    assert threads.apply("cpu", 1) == (1, "train.threads=1") and torch.get_num_threads() == 1


def test_setup_logs_the_thread_count_and_why():
    from conftest import small_config
    from ssmis.engine.run import setup

    lines = []
    setup(small_config(), None, log=lines.append)
    assert "device cpu, 1 threads (train.threads=1)" in lines[-1]
    assert "precision fp32 + channels_last (train.amp=off; memory format auto: 2D on CPU" in lines[-1]


# ---- memory format per device ----------------------------------------------------------------------------------
@pytest.mark.parametrize("bf16", [True, False])
def test_cuda_2d_auto_is_channels_last(monkeypatch, bf16):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    p = resolve_precision("auto", "auto", torch.device("cuda"), 2)
    assert p.channels_last and p.dtype == (torch.bfloat16 if bf16 else torch.float16)
    assert p.label == ("bf16" if bf16 else "fp16") + " + channels_last"
    assert p.reason.startswith("auto: CUDA with" + ("" if bf16 else "out") + " bf16; ")
    assert "2D on CUDA -> channels_last" in p.reason


def test_cuda_3d_auto_stays_contiguous(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    p = resolve_precision("auto", "auto", torch.device("cuda"), 3)
    assert not p.channels_last and p.label == "bf16"
    assert p.reason.endswith("3D on CUDA: contiguous until measured")


def test_explicit_memory_format_and_cpu_rules():
    cpu = torch.device("cpu")
    p = resolve_precision("off", "off", cpu, 2)
    assert not p.channels_last and p.reason == "train.amp=off; train.channels_last=off"
    assert resolve_precision("bf16", "on", torch.device("cuda"), 3).reason == "train.amp=bf16; train.channels_last=on"
    assert resolve_precision("off", "auto", cpu, 2).channels_last
    p3 = resolve_precision("auto", "auto", cpu, 3)
    assert not p3.channels_last and p3.reason.startswith("auto: 3D on CPU -> fp32") and "3D on CPU -> contiguous" in p3.reason


# ---- the bench: N workers, each its share ------------------------------------------------------------------------
class _InlinePool:
    """ProcessPoolExecutor stand-in: runs each submitted call at once, in this process."""

    def __init__(self, workers, mp_context=None):
        self.workers = workers

    def submit(self, fn, *args):
        f = concurrent.futures.Future()
        f.set_result(fn(*args))
        return f

    def shutdown(self, wait=True, cancel_futures=False):
        pass


@pytest.mark.parametrize("cuda,expected", [(False, 8), (True, 4)])
def test_bench_jobs_give_each_worker_its_share(monkeypatch, tmp_path, capsys, cuda, expected):
    monkeypatch.setattr(concurrent.futures, "ProcessPoolExecutor", _InlinePool)
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    calls = []
    monkeypatch.setattr(grid, "run_cell", lambda cfg, d, progress, t: calls.append(t) or {"cell": Path(d).name,
                                                                                          "action": "trained"})
    cfg = load_config("phantom")
    cells = [Cell(f"c{i}", {}, cfg, tmp_path / f"c{i}") for i in range(3)]
    results = grid._run_all(cells, jobs=2, progress=False)
    assert [r["action"] for r in results] == ["trained"] * 3
    assert [t[0] for t in calls] == [expected] * 3
    assert ("CUDA" if cuda else "CPU: 16 cores // 2 processes") in calls[0][1]
    assert f"2 at a time ({expected} threads each: {calls[0][1]}" in capsys.readouterr().err


def test_a_worker_takes_the_share_it_is_given(monkeypatch, tmp_path):
    monkeypatch.setattr(threads, "_given", None)
    d = tmp_path / "cell"                                  # a finished cell: skipped once the share is taken
    (d / "eval" / "test-best").mkdir(parents=True)
    (d / "train_summary.json").write_text("{}")
    (d / "eval" / "test-best" / "summary.json").write_text("{}")
    r = grid.run_cell(load_config("phantom").model_dump(mode="json"), str(d), False, (2, "bench share"))
    assert r == {"cell": "cell", "action": "skipped"}
    assert threads._given == (2, "bench share") and torch.get_num_threads() == 2


@pytest.mark.parametrize("jobs", [1, 2])
def test_bench_threads_option_sets_each_cells_threads(monkeypatch, tmp_path, jobs):
    monkeypatch.setattr(concurrent.futures, "ProcessPoolExecutor", _InlinePool)
    calls = []
    monkeypatch.setattr(grid, "run_cell", lambda cfg, d, progress, t: calls.append(t) or {"cell": Path(d).name,
                                                                                          "action": "trained"})
    cells = [Cell(f"c{i}", {}, load_config("phantom"), tmp_path / f"c{i}") for i in range(2)]
    grid._run_all(cells, jobs=jobs, progress=False, threads=1)
    assert calls == [(1, "ssmis bench --threads 1")] * 2
