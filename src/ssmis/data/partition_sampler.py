"""SPCL's batch sampler (methods.md "SPCL", Components, Batch sampler; [CODE jizongFox/Self-paced-Contrastive-Learning
semi_seg/data/rearr.py, ContrastBatchSampler]): draw m scans at random, then from each one slice per partition
(a partition a scan has no slice of is skipped, as the reference), so a batch holds up to m·P slices.

Each batch is a pure function of (seed, step): the position is the only state, so a resumed run draws exactly
what a straight run draws. The m scans are drawn without replacement within a batch and independently across
batches (the reference's `random.sample` per batch).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ssmis.engine.streams import _seed

SAMPLER_STREAM = 11      # stream ids of the pre-training draws (the engine's streams use 0, 1, 2)
VIEW_STREAM = 12


class PartitionSampler:
    def __init__(self, scans: Tensor, partitions: Tensor, scans_per_batch: int, seed: int):
        """scans, partitions: N integer codes (scan of each slice, its partition)."""
        self.seed, self.m = seed, scans_per_batch
        self.groups: list[list[Tensor]] = []          # per scan: the slice indices of each partition it has
        parts = sorted(set(partitions.tolist()))
        for s in sorted(set(scans.tolist())):
            in_scan = scans == s
            self.groups.append([torch.nonzero(in_scan & (partitions == p)).flatten() for p in parts
                                if bool((in_scan & (partitions == p)).any())])
        if not 1 <= scans_per_batch <= len(self.groups):
            raise ValueError(f"scans per batch must be between 1 and the number of scans ({len(self.groups)}), "
                             f"got {scans_per_batch}")
        self.max_batch = scans_per_batch * len(parts)

    def at(self, step: int) -> Tensor:
        """The slice indices of the batch of optimiser step `step`."""
        g = torch.Generator().manual_seed(_seed(self.seed, SAMPLER_STREAM, step))
        picked = torch.randperm(len(self.groups), generator=g)[: self.m].tolist()
        out = []
        for s in picked:
            for members in self.groups[s]:
                out.append(members[int(torch.randint(len(members), (1,), generator=g))])
        return torch.stack(out)


def view_generators(seed: int, step: int, views: int = 2) -> list[torch.Generator]:
    """Independent augmentation generators of the views of step `step` (functions of the position only)."""
    return [torch.Generator().manual_seed(_seed(seed, VIEW_STREAM, step, v)) for v in range(views)]
