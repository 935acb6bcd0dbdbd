"""Learning-rate schedules against hand-computed values."""

import math

from amllm.config import ScheduleConfig
from amllm.schedule import lr_at


def test_warmup_then_cosine_to_floor():
    cfg = ScheduleConfig(name="cosine", warmup_steps=4, min_lr_ratio=0.1)
    lrs = [lr_at(s, 1.0, 14, cfg) for s in range(14)]
    assert lrs[:4] == [1 / 5, 2 / 5, 3 / 5, 4 / 5]          # (s+1)/(W+1): never a step at 0
    assert lrs[4] == 1.0                                       # the peak right after warmup
    assert math.isclose(lrs[9], 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:]))       # monotone decay
    assert math.isclose(lr_at(14, 1.0, 14, cfg), 0.1) and math.isclose(lr_at(99, 1.0, 14, cfg), 0.1)


def test_no_warmup_starts_at_peak():
    cfg = ScheduleConfig(name="cosine", warmup_steps=0, min_lr_ratio=0.0)
    assert lr_at(0, 2e-3, 10, cfg) == 2e-3
    assert math.isclose(lr_at(5, 2e-3, 10, cfg), 1e-3)


def test_constant():
    cfg = ScheduleConfig(name="constant", warmup_steps=1)
    assert [lr_at(s, 1.0, 5, cfg) for s in range(4)] == [0.5, 1.0, 1.0, 1.0]
