"""Training batches of one stream, made on the training device, optionally one step ahead in a thread.

A batch is a function of the stream position only (indices and augmentation generator from `Stream.at`), so
making it ahead changes nothing: the stream's state counts the batches handed out, a resume starts from there,
and a batch made ahead for a position that is never reached is dropped. Ahead-making pays where work stays on
the CPU while a GPU trains (3D patch crops); on a CPU it would only compete with the step for the cores.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor

import torch

from ssmis.engine.streams import Stream
from ssmis.methods.base import Batch


class BatchSource:
    def __init__(self, data, stream: Stream, labeled: bool, augment: str, intensity: float,
                 device: torch.device, channels_last: bool, ahead: bool = False):
        self.data, self.stream, self.labeled = data, stream, labeled
        self.augment, self.intensity, self.device, self.channels_last = augment, intensity, device, channels_last
        self.ahead = ahead
        self._pool: ThreadPoolExecutor | None = None
        self._pending: tuple[int, Future] | None = None      # (stream position, batch being made)

    def _make(self, drawn: int) -> Batch:
        idx, gen = self.stream.at(drawn)
        img, lab, pos, num = self.data.batch(idx, gen, self.augment, self.intensity)
        img = img.to(self.device, non_blocking=True)
        if self.channels_last:
            img = img.contiguous(memory_format=torch.channels_last if img.ndim == 4 else torch.channels_last_3d)
        return Batch(img, lab.to(self.device) if self.labeled else None, idx, pos, num)

    def next(self) -> Batch:
        drawn = self.stream.drawn
        if self._pending is not None and self._pending[0] == drawn:
            batch = self._pending[1].result()
        else:
            batch = self._make(drawn)
        self.stream.drawn = drawn + self.stream.bs
        self._pending = None
        if self.ahead:
            self._pool = self._pool or ThreadPoolExecutor(1, thread_name_prefix="ssmis-batches")
            self._pending = (self.stream.drawn, self._pool.submit(self._make, self.stream.drawn))
        return batch

    def state_dict(self) -> dict:
        return self.stream.state_dict()

    def load_state_dict(self, s: dict) -> None:
        self.stream.load_state_dict(s)         # a batch made ahead for another position is not used

    def close(self) -> None:
        """Stop the thread (a later next() starts it again)."""
        self._pending = None
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
