"""train.cpu_allocator: large CPU tensors from glibc's heap (kept and reused) or glibc's defaults (a fresh mapping per
tensor, returned on free). Each case runs in its own process: the setting is process-wide."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                                reason="mallopt is glibc's")

PROBE = """
import sys, torch
from ssmis.engine import allocator
print(allocator.apply(sys.argv[1]))
if len(sys.argv) > 2:
    print(allocator.apply(sys.argv[2]))
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * 4096
x = torch.ones(96 * 2**20 // 4)          # 96 MiB, above glibc's largest mmap threshold (32 MiB)
held = rss()
del x
print((held - rss()) / 2**20)
"""


def freed_mib(*modes: str) -> tuple[list[str], float]:
    out = subprocess.run([sys.executable, "-c", PROBE, *modes], capture_output=True, text=True, check=True)
    lines = out.stdout.strip().splitlines()
    return lines[:-1], float(lines[-1])


def test_heap_keeps_a_freed_large_tensor_for_reuse_and_system_returns_it():
    said, returned = freed_mib("heap")
    assert said == ["large tensors from the heap (train.cpu_allocator=heap)"]
    assert returned < 8                     # kept by the process: the next step's tensor reuses these pages
    said, returned = freed_mib("system")
    assert said == ["glibc defaults"]
    assert returned > 80                    # munmap: the next tensor is a fresh mapping, zero-filled page by page


def test_system_after_heap_restores_returning_memory():
    said, returned = freed_mib("heap", "system")
    assert said[-1] == "glibc defaults"
    assert returned > 80


def test_setup_applies_the_heap_allocator_and_says_so():
    from conftest import small_config
    from ssmis.engine import allocator
    from ssmis.engine.run import setup

    lines = []
    setup(small_config(), None, log=lines.append)
    assert lines[-1].endswith("; large tensors from the heap (train.cpu_allocator=heap)")
    assert allocator._state == "heap"
