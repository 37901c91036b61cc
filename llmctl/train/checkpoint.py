"""Resumable training checkpoints in a run folder: `checkpoints/step_000500/`.

One checkpoint folder holds:
- the model as an HF-compatible model folder (`model.safetensors` + `config.json`, fp32), so any
  checkpoint can also be loaded, evaluated or published as it is;
- `optimizer.pt`: the optimizer state dict via `torch.save` (tensors only; loaded back with
  `weights_only=True`, so no arbitrary pickle is ever executed on load);
- `trainer_state.json`: step, tokens seen, data loader position, RNG states (torch, CUDA, numpy,
  python; binary states as base64), guard state and anything else the loop needs, as JSON.

A checkpoint is written into a hidden temporary folder and renamed into place, so a folder named
`step_*` is always complete; a crash mid-write leaves only a `.tmp` folder, removed on the next save.

    save_checkpoint(run_dir / "checkpoints", step, model_state, cfg, optim_state, state, keep=2)
    path = latest_checkpoint(run_dir / "checkpoints")
    model_state, optim_state, state = load_checkpoint(path)
"""

from __future__ import annotations

import base64
import json
import os
import random
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llmctl.errors import InputError
from llmctl.faults import fault_point
from llmctl.model.checkpoint import load_safetensors, save_state_dict_folder, weight_files
from llmctl.model.config import ModelConfig

CHECKPOINTS_DIR = "checkpoints"
OPTIMIZER_FILE = "optimizer.pt"
STATE_FILE = "trainer_state.json"
STATE_VERSION = 1


def checkpoint_name(step: int) -> str:
    return f"step_{step:06d}"


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under root, oldest first."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step_*") if p.is_dir() and (p / STATE_FILE).is_file())


def latest_checkpoint(root: Path) -> Path | None:
    found = list_checkpoints(root)
    return found[-1] if found else None


def save_checkpoint(
    root: Path,
    step: int,
    model_state: Mapping[str, torch.Tensor],
    model_config: ModelConfig,
    optim_state: dict[str, Any],
    state: dict[str, Any],
    *,
    keep: int,
) -> Path:
    """Write checkpoint `step` atomically and delete all but the newest `keep`; returns its folder."""
    root.mkdir(parents=True, exist_ok=True)
    final = root / checkpoint_name(step)
    tmp = root / f".{final.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    save_state_dict_folder(model_state, model_config, tmp, dtype=torch.float32)
    fault_point("checkpoint-save")  # tests kill the process here: weights written, the rest not
    torch.save(optim_state, tmp / OPTIMIZER_FILE)
    payload = {"version": STATE_VERSION, "step": step, **state}
    (tmp / STATE_FILE).write_text(json.dumps(payload, indent=1) + "\n")
    if final.exists():  # re-saving the same step (interrupt right after a periodic save)
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in list_checkpoints(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob(".step_*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)
    return final


def load_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
    """(model tensors by HF name, optimizer state dict, trainer state) of one checkpoint folder.

    InputError naming the damaged file when any part is missing or unreadable (no hint: the
    caller knows what to do instead, e.g. fall back to an older checkpoint)."""
    try:
        state = json.loads((path / STATE_FILE).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise InputError(f"{path / STATE_FILE}: unreadable checkpoint state ({e})") from None
    if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
        version = state.get("version") if isinstance(state, dict) else None
        raise InputError(f"{path}: checkpoint version {version}, expected {STATE_VERSION}")
    try:
        tensors = load_safetensors(weight_files(path))
    except InputError as e:
        raise InputError(e.message) from None
    try:
        optim_state = torch.load(path / OPTIMIZER_FILE, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises a zoo of types for missing, truncated or bad zip/pickle data
        raise InputError(
            f"{path / OPTIMIZER_FILE}: unreadable optimizer state ({type(e).__name__}: {e})"
        ) from None
    return tensors, optim_state, state


def load_latest_checkpoint(
    root: Path, warn: Callable[[str], None]
) -> tuple[Path, dict[str, torch.Tensor], dict[str, Any], dict[str, Any]] | None:
    """The newest checkpoint under root that loads, as (folder, *load_checkpoint(folder)); None if
    there is none. A damaged newer one (a disk fault, a hand edit) is reported through `warn` and
    the one before it is used; InputError when every checkpoint is damaged."""
    found = list_checkpoints(root)
    damaged = []
    for path in reversed(found):
        try:
            return (path, *load_checkpoint(path))
        except InputError as e:
            damaged.append(e.message)
            warn(f"checkpoint {path.name} is damaged: {e.message}; falling back to the one before it")
    if damaged:
        raise InputError(
            f"{root}: no readable checkpoint to resume from ({len(damaged)} damaged; newest: {damaged[0]})",
            hint="start the run again with `--force` (without --resume); the damaged run folder is left as it is",
        )
    return None


# ---- RNG states as JSON --------------------------------------------------------------------------


def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode("ascii")


def _unb64(s: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8)


def rng_state() -> dict[str, Any]:
    """Every RNG a training step may draw from, JSON-serialisable."""
    np_state = np.random.get_state(legacy=True)
    py_state = random.getstate()
    return {
        "torch": _b64(torch.get_rng_state()),
        "cuda": [_b64(s) for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else [],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "python": [py_state[0], list(py_state[1]), py_state[2]],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore `rng_state()`; CUDA states only when the device count matches."""
    torch.set_rng_state(_unb64(state["torch"]))
    cuda = state.get("cuda") or []
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([_unb64(s) for s in cuda])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), int(pos), int(has_gauss), float(cached)))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))


# ---- the checkpointer a training loop uses -------------------------------------------------------


class Checkpointer:
    """Save and restore a training run's whole state (weights, optimizer, trainer state, RNG) in
    `root`, under any strategy: saving gathers full state dicts (collective under FSDP, so every
    rank calls it) and rank 0 writes; restoring reads the newest readable checkpoint on every rank."""

    def __init__(self, root: Path, model_config: ModelConfig, *, keep: int, is_main: bool):
        self.root = root
        self.model_config = model_config
        self.keep = keep
        self.is_main = is_main

    def save(self, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
        from llmctl.train.distributed import full_state_dicts

        model_state, optim_state = full_state_dicts(model, optimizer)
        if self.is_main:
            save_checkpoint(
                self.root, step, model_state, self.model_config, optim_state, state, keep=self.keep
            )

    def restore(
        self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, warn: Callable[[str], None]
    ) -> tuple[Path, dict[str, Any]] | None:
        """Load the newest readable checkpoint into model and optimizer; (its folder, trainer state),
        or None when there is none."""
        from llmctl.train.distributed import load_full_state_dicts

        found = load_latest_checkpoint(self.root, warn)
        if found is None:
            return None
        path, model_state, optim_state, state = found
        load_full_state_dicts(model, optimizer, model_state, optim_state)
        return path, state
