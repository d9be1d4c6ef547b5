"""Where large CPU tensors come from: glibc's heap, reused from step to step, not a fresh memory mapping each time.

glibc serves every allocation above its mmap threshold (at most 32 MiB on 64-bit Linux) with a new `mmap` and gives it
back with `munmap` when freed. A training step allocates and frees the same large tensors every step (activations and
their gradients; C3S3's four 4×64×16×128×128 projector maps in 3D are 256 MiB each), so every step maps fresh memory
whose pages the kernel zero-fills on first touch. On a 2-core Intel Xeon (AMX), torch 2.13, one C3S3 step on
configs/acdc3d.yaml took 27.8 s with glibc's defaults and 12.8 s with the heap settings below: the page faults were
more than half of the step (docs/benchmarks.md, "CPU allocator"). The numbers computed are the same; only where the
memory sits changes.

`heap` (train.cpu_allocator, the default) sets, through `mallopt`: M_MMAP_MAX = 0 (no block from its own mapping),
M_TRIM_THRESHOLD = 2 GiB (freed memory, up to that much, stays with the process for the next step instead of going
back to the kernel) and M_TOP_PAD = 1 GiB (the heap grows in large steps; untouched pages cost no RAM). The price: the
process keeps most of its peak memory until it exits. `system` leaves glibc's defaults (if a run earlier in this
process set the heap ones, it sets glibc's default values back, with the mmap threshold fixed at its initial 128 KiB).
Elsewhere than glibc (macOS, musl) there is nothing to set and both are the same.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform
from typing import Literal

M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD, M_MMAP_MAX = -1, -2, -3, -4
HEAP = {M_MMAP_MAX: 0, M_TRIM_THRESHOLD: 2**31 - 1, M_TOP_PAD: 1 << 30}
# glibc's defaults (malloc/malloc.c: DEFAULT_MMAP_MAX, DEFAULT_TRIM_THRESHOLD, DEFAULT_TOP_PAD, DEFAULT_MMAP_THRESHOLD);
# setting any of the thresholds turns glibc's dynamic mmap threshold off, as its own M_* environment variables do
SYSTEM = {M_MMAP_MAX: 65536, M_TRIM_THRESHOLD: 128 * 1024, M_TOP_PAD: 128 * 1024, M_MMAP_THRESHOLD: 128 * 1024}

_state: str | None = None     # what this process was last set to


def _mallopt():
    """glibc's mallopt, or None where the C library is not glibc."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    fn = getattr(libc, "mallopt", None)
    if fn is not None:
        fn.argtypes, fn.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return fn


def apply(mode: Literal["heap", "system"]) -> str:
    """Set this process's allocator for large blocks; returns a few words for the run's header line."""
    global _state
    fn = _mallopt()
    if fn is None:
        return "system allocator (not glibc)"
    if mode == _state:
        return _describe(mode)
    if mode == "heap":
        ok = all(fn(k, v) == 1 for k, v in HEAP.items())
    elif _state == "heap":            # undo a previous run's heap settings in this process
        ok = all(fn(k, v) == 1 for k, v in SYSTEM.items())
    else:
        ok = True
    _state = mode if ok else None
    return _describe(mode) if ok else "glibc allocator settings refused (mallopt); glibc defaults"


def _describe(mode: str) -> str:
    return "large tensors from the heap (train.cpu_allocator=heap)" if mode == "heap" else "glibc defaults"
