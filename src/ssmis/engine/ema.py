"""Exponential-moving-average teacher (never trained by the optimiser, never DDP-wrapped)."""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA(nn.Module):
    """Teacher θ' <- α θ' + (1-α) θ after each optimiser step.

    `warmup=True` uses SSL4MIS's α_t = min(1 - 1/(t+1), decay) (t = 0-based step, so α_0 = 0: teacher = student).
    `buffers=False` keeps the teacher's own BN statistics (SSL4MIS); True averages them too (BCP on ACDC).
    The teacher stays in train mode, as in the reference code (batch-statistics BN and active dropout).
    """

    def __init__(self, student: nn.Module, decay: float = 0.99, warmup: bool = True, buffers: bool = False):
        super().__init__()
        self.module = copy.deepcopy(student)
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.decay, self.warmup, self.average_buffers = decay, warmup, buffers

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def alpha(self, step: int) -> float:
        return min(1.0 - 1.0 / (step + 1), self.decay) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, student: nn.Module, step: int) -> None:
        a = self.alpha(step)
        tp = list(self.module.parameters())
        torch._foreach_mul_(tp, a)                 # one fused pass instead of a Python loop over ~100 tensors
        torch._foreach_add_(tp, [p.detach() for p in student.parameters()], alpha=1 - a)
        if self.average_buffers:
            for t, s in zip(self.module.buffers(), student.buffers()):
                if t.dtype.is_floating_point:
                    t.mul_(a).add_(s.detach(), alpha=1 - a)
                else:
                    t.copy_(s)
