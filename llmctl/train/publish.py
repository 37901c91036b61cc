"""What a training stage puts in its published folder besides the tokenizer: the weights as an
HF-compatible model folder, and the run's training log (metrics.jsonl and a loss plot)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from llmctl.model.checkpoint import save_state_dict_folder
from llmctl.model.config import ModelConfig
from llmctl.train.loop import METRICS_FILE
from llmctl.train.metrics import plot_losses

LOSS_PLOT = "loss.png"


def save_trained_model(
    out: Path,
    state: Mapping[str, torch.Tensor],
    config: ModelConfig,
    *,
    bos_id: int | None,
    eos_id: int | None,
    pad_id: int | None,
    stop_ids: Sequence[int],
) -> None:
    """fp32 weights and config.json, with generation_config.json stopping at `stop_ids`."""
    save_state_dict_folder(
        state,
        config,
        out,
        dtype=torch.float32,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        generation_config={"eos_token_id": list(stop_ids)},
    )


def save_training_log(run_dir: Path, out: Path, title: str) -> None:
    """The run's metrics.jsonl and its loss plot, into the published folder."""
    metrics_path = Path(run_dir) / METRICS_FILE
    (out / METRICS_FILE).write_bytes(metrics_path.read_bytes())
    plot_losses(metrics_path, out / LOSS_PLOT, title=title)
