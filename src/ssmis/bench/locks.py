"""Advisory locks beside run folders, so that two `ssmis bench` processes of one suite (two `--only` selections in
two terminals, or two machines on one shared disk) never write one run at once. `.<run name>.lock` in the run's
parent folder; flock, released when the process ends however it ends. Where the OS has no flock (Windows) every
lock is granted."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def run_lock(run_dir: Path, wait: bool, what: str = "run") -> Iterator[bool]:
    """Hold the lock of `run_dir` while the block runs; yields whether this process holds it. With `wait` a busy
    lock is waited for (said on stderr); without, the block runs with False at once."""
    try:
        import fcntl
    except ImportError:
        yield True
        return
    run_dir = Path(run_dir)
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(run_dir.parent / f".{run_dir.name}.lock", "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if not wait:
                yield False
                return
            print(f"waiting for {run_dir}: another process is making this {what}", file=sys.stderr)
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield True
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
