"""Learning-rate schedules and weight ramps; lengths are fractions of the run (budget-scaled)."""

from __future__ import annotations

import math


def sigmoid_ramp(current: float, length: float) -> float:
    """SSL4MIS sigmoid ramp-up exp(-5 (1 - clip(current/length))²); 1 when length is 0."""
    if length <= 0:
        return 1.0
    phase = 1.0 - min(max(current, 0.0), length) / length
    return float(math.exp(-5.0 * phase * phase))


def lr_factor(name: str, step: int, total: int, power: float = 0.9, step_fraction: float = 0.4, gamma: float = 0.1) -> float:
    """Multiplier of the base lr applied after `step` optimiser steps (so step 0 trains at the base lr)."""
    if name == "poly":
        return (1.0 - step / total) ** power
    if name == "step":
        return gamma ** (step // max(1, int(round(step_fraction * total))))
    return 1.0
