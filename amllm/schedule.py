"""Learning-rate schedules as pure functions of the optimizer step.

A pure function (rather than a stateful torch LR scheduler) makes resume trivially exact: the
checkpoint stores the step and the lr follows. AM optimizers read the previous lr from their own
state, so any schedule -- including one with lr = 0 on a step -- is handled by them.

    cosine:   lr(s) = peak * (s + 1) / (W + 1)                               for s < W  (warmup)
              lr(s) = floor + (peak - floor) * (1 + cos(pi * p)) / 2,  p = (s - W) / (S - W)
    constant: the same warmup, then peak.

with W = warmup_steps (0: no warmup, the first step runs at the peak), S = total steps,
floor = min_lr_ratio * peak. The (s + 1) / (W + 1) ramp (nanoGPT's) never spends a step at lr 0.
"""

from __future__ import annotations

import math

from .config import ScheduleConfig


def lr_at(step: int, peak: float, total_steps: int, cfg: ScheduleConfig) -> float:
    """Learning rate for optimizer step `step` (0-based) of a `total_steps` run."""
    warmup = cfg.warmup_steps
    if step < warmup:
        return peak * (step + 1) / (warmup + 1)
    if cfg.name == "constant":
        return peak
    floor = cfg.min_lr_ratio * peak
    decay_steps = max(1, total_steps - warmup)
    progress = min(1.0, (step - warmup) / decay_steps)
    return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
