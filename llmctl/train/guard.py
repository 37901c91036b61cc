"""The NaN/spike guard: skip an optimizer step whose loss or gradient norm is not finite, or whose
loss jumps far above the recent mean, and abort after too many bad steps in a row.

Every rank sees the same all-reduced loss and norm, so every rank skips the same steps.
Its state (recent good losses, the bad-step streak) is part of a checkpoint, so a resumed run
judges the next step exactly as the uninterrupted run would.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Any

SPIKE_WINDOW = 50  # good losses averaged for the spike test
SPIKE_MIN_HISTORY = 5  # no spike test before this many good steps (early loss falls fast)


class LossGuard:
    def __init__(self, spike_factor: float, max_bad_steps: int):
        self.spike_factor = spike_factor
        self.max_bad_steps = max_bad_steps
        self.recent: deque[float] = deque(maxlen=SPIKE_WINDOW)
        self.bad_steps = 0

    def is_bad(self, loss: float, grad_norm: float) -> bool:
        """Whether this step must be skipped (does not change the state)."""
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            return True
        if self.spike_factor <= 0 or len(self.recent) < SPIKE_MIN_HISTORY:
            return False
        return loss > self.spike_factor * (sum(self.recent) / len(self.recent))

    def record(self, loss: float, skipped: bool) -> None:
        if skipped:
            self.bad_steps += 1
        else:
            self.bad_steps = 0
            self.recent.append(loss)

    @property
    def exhausted(self) -> bool:
        return self.bad_steps >= self.max_bad_steps

    def state_dict(self) -> dict[str, Any]:
        return {"recent_losses": list(self.recent), "bad_steps": self.bad_steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.recent.clear()
        self.recent.extend(state["recent_losses"])
        self.bad_steps = int(state["bad_steps"])
