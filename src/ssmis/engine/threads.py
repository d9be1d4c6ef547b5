"""How many CPU threads a run takes: its share of the machine's cores, never all of them when others share it.

Explicit `train.threads` wins. Otherwise the cores are divided among the processes on this machine (torchrun's
LOCAL_WORLD_SIZE, times `ssmis bench --jobs`); a CUDA run takes at most CUDA_MAX_THREADS of its share (the GPU does
the work: three side-by-side H200 runs with all 16 cores each ran 20-30x slower than with 4 each, issue 18).
"""

from __future__ import annotations

import os

import torch

CUDA_MAX_THREADS = 4
_given: tuple[int, str] | None = None      # this process's share, set by the parent that split the machine


def thread_budget(device_type: str, cores: int, local_processes: int, requested: int | None,
                  jobs: int = 1) -> tuple[int, str]:
    """(threads, why) for one process."""
    if requested:
        return requested, f"train.threads={requested}"
    procs = max(1, local_processes) * max(1, jobs)
    share = max(1, cores // procs)
    split = f"{cores} cores // {procs} processes on this machine" if procs > 1 else f"{cores} cores"
    if device_type == "cuda":
        return min(share, CUDA_MAX_THREADS), f"CUDA: min({split}, {CUDA_MAX_THREADS}); the GPU does the work"
    return share, f"CPU: {split}"


def assign(threads: int, why: str) -> None:
    """Fix this process's share (in a worker of `ssmis bench --jobs`): torch uses it now, and runs set up later
    take it unless their train.threads says otherwise."""
    global _given
    _given = (threads, why)
    torch.set_num_threads(threads)


def apply(device_type: str, requested: int | None) -> tuple[int, str]:
    """Set torch's intra-op (and, while it can still be set, inter-op) thread counts; returns (threads, why)."""
    if not requested and _given is not None:
        n, why = _given
    else:
        n, why = thread_budget(device_type, os.cpu_count() or 1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")),
                               requested)
    torch.set_num_threads(n)
    try:
        torch.set_num_interop_threads(min(n, 2))   # ssmis runs no inter-op parallel work; keep that pool small
    except RuntimeError:                            # once set, or once parallel work started, it is fixed
        pass
    return n, why
