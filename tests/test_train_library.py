"""Pieces of the training library every training stage shares: schedules and the NaN/spike guard."""

from __future__ import annotations

import math

import pytest

from llmctl.train.guard import SPIKE_MIN_HISTORY, LossGuard
from llmctl.train.optim import lr_at


def test_linear_and_constant_schedules_after_warmup():
    linear = [lr_at(s, 11, 1.0, schedule="linear", warmup=1, min_lr_ratio=0.0) for s in range(11)]
    assert linear[0] == linear[1] == 1.0 and linear[-1] == pytest.approx(0.0)  # decay starts after warmup
    assert all(math.isclose(a - b, 1 / 9) for a, b in zip(linear[1:], linear[2:], strict=False))
    constant = [lr_at(s, 10, 2.0, schedule="constant", warmup=4) for s in range(10)]
    assert constant == [0.5, 1.0, 1.5, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0]


def test_guard_skips_non_finite_and_spikes_and_counts_a_streak():
    guard = LossGuard(spike_factor=3.0, max_bad_steps=2)
    assert guard.is_bad(float("nan"), 1.0) and guard.is_bad(1.0, float("inf"))
    for _ in range(SPIKE_MIN_HISTORY - 1):
        guard.record(1.0, skipped=False)
    assert not guard.is_bad(10.0, 1.0)  # too little history to call a spike
    guard.record(1.0, skipped=False)
    assert guard.is_bad(3.5, 1.0) and not guard.is_bad(2.9, 1.0)
    guard.record(3.5, skipped=True)
    assert not guard.exhausted
    state = guard.state_dict()
    again = LossGuard(spike_factor=3.0, max_bad_steps=2)
    again.load_state_dict(state)
    again.record(9.0, skipped=True)
    assert again.exhausted and list(again.recent) == [1.0] * SPIKE_MIN_HISTORY
    again.record(1.0, skipped=False)
    assert not again.exhausted
