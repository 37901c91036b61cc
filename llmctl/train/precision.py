"""Compute precision: which dtype a run trains in, and the autocast context for it.

Weights and optimizer state stay fp32; `bf16` runs the forward (and so the backward) under
`torch.autocast`. `auto` is bf16 on CUDA and fp32 on CPU, where bf16 autocast is slower.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch

from llmctl.errors import ConfigError


def device_type(device: str) -> str:
    return "cuda" if device.startswith("cuda") else "cpu"


def resolve_dtype(dtype: str, device: str, section: str = "pretrain") -> str:
    """`fp32` or `bf16` for a config value (`auto`, `fp32`, `bf16`) on `device`."""
    kind = device_type(device)
    resolved = dtype if dtype != "auto" else ("bf16" if kind == "cuda" else "fp32")
    if resolved == "bf16" and kind == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError(
            f"{section}.dtype is bf16 but this GPU has no bf16 support", hint=f"set {section}.dtype=fp32"
        )
    return resolved


def autocast_factory(dtype: str, device: str) -> Callable[[], Any]:
    """A zero-argument factory of the autocast context for `dtype` (a null context for fp32)."""
    kind = device_type(device)
    if dtype == "bf16":
        return lambda: torch.autocast(kind, dtype=torch.bfloat16)
    return contextlib.nullcontext
