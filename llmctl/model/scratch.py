"""Reused buffers for temporaries that die inside the call that asks for them.

On CPU a fresh buffer of a few MB is often a new mmap on glibc (or heap that glibc just trimmed)
and page-faults on first write: silu into a fresh (768, 352) buffer took 515 us inside a training
step against 196 us into a reused one (profiled), and a rollout step's sampler spent more on its
fresh (rows, vocab) buffers than on the math.
`scratch` hands out one buffer per name (and thread), reshaped as asked, and keeps it for the next
call. A caller must be done with a buffer before anything asks for the same name again, and must
not return it.

    buf = scratch("sampler.probs", logits.shape, logits)   # (rows, vocab), logits' dtype and device
"""

from __future__ import annotations

import math
import threading

import torch

MAX_VIEWS = 64  # shaped views kept across names; more (many batch shapes) starts the cache over


class _Buffers(threading.local):
    """Per thread: one flat buffer per name, and the shaped views of it handed out so far (a step
    then asks a dict rather than slicing and viewing again)."""

    def __init__(self):
        self.flat: dict[str, torch.Tensor] = {}
        self.views: dict[tuple, torch.Tensor] = {}


_BUFFERS = _Buffers()


def scratch(
    name: str, shape: tuple[int, ...] | torch.Size, like: torch.Tensor, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """A buffer of `shape` with like's device and dtype (or `dtype`), reused from call to call."""
    dtype = dtype or like.dtype
    key = (name, tuple(shape), dtype, like.device)
    view = _BUFFERS.views.get(key)
    if view is None:
        n = math.prod(shape)
        flat = _BUFFERS.flat.get(name)
        if flat is None or flat.numel() < n or flat.dtype != dtype or flat.device != like.device:
            flat = _BUFFERS.flat[name] = torch.empty(n, dtype=dtype, device=like.device)
            _BUFFERS.views = {k: v for k, v in _BUFFERS.views.items() if k[0] != name}
        if len(_BUFFERS.views) >= MAX_VIEWS:
            _BUFFERS.views.clear()
        view = _BUFFERS.views[key] = flat[:n].view(shape)
    return view
