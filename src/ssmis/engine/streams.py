"""Two-stream sampling: labelled and unlabelled streams, each an endless series of seeded permutations.

The position in a stream is the only state (number of samples drawn), so resume is exact and
workers or prefetching change nothing. Under DDP each rank takes its share of the global batch.
"""

from __future__ import annotations

import torch


def _seed(*parts: int) -> int:
    h = 1469598103934665603
    for p in parts:
        h = ((h ^ (p & 0xFFFFFFFF)) * 1099511628211) & 0x7FFFFFFFFFFFFFFF
    return h


class Stream:
    def __init__(self, n: int, batch_size: int, seed: int, stream_id: int, rank: int = 0, world: int = 1):
        self.n, self.bs, self.seed, self.sid, self.rank, self.world = n, batch_size, seed, stream_id, rank, world
        self.drawn = 0          # global samples drawn so far
        self._perm_cache: dict[int, torch.Tensor] = {}

    def _perm(self, p: int) -> torch.Tensor:
        if p not in self._perm_cache:
            g = torch.Generator().manual_seed(_seed(self.seed, self.sid, p))
            self._perm_cache = {p: torch.randperm(self.n, generator=g)}
        return self._perm_cache[p]

    def at(self, drawn: int) -> tuple[torch.Tensor, torch.Generator]:
        """The draw after `drawn` samples: this rank's indices and the generator of their augmentation (a pure
        function of the position, so a batch can be made ahead of its step)."""
        local = self.bs // self.world
        ks = range(drawn + self.rank * local, drawn + (self.rank + 1) * local)
        idx = torch.stack([self._perm(k // self.n)[k % self.n] for k in ks])
        return idx, torch.Generator().manual_seed(_seed(self.seed, self.sid, drawn // self.bs, self.rank, 7))

    def next(self) -> tuple[torch.Tensor, torch.Generator]:
        """Indices of this rank's share of the next global batch, and a generator for its augmentation."""
        out = self.at(self.drawn)
        self.drawn += self.bs
        return out

    def state_dict(self) -> dict:
        return {"drawn": self.drawn}

    def load_state_dict(self, s: dict) -> None:
        self.drawn = int(s["drawn"])
