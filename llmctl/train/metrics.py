"""Training metrics: peak FLOPs and MFU, the metrics.jsonl writer, optional TensorBoard/W&B, loss plot.

    peak, name = peak_flops(device="cuda", dtype="bf16")       # 989e12, 'NVIDIA H100 80GB HBM3'
    mfu(flops_per_token, tokens_per_s, peak)                   # model FLOPs utilisation, 0..1
    writer = MetricsWriter(run_dir / "metrics.jsonl"); writer.write({"step": 1, "loss": 9.1})
    plot_losses(run_dir / "metrics.jsonl", out / "loss.png")

MFU follows PaLM (Chowdhery et al. 2022, appendix B): model FLOPs per token (6N + attention, see
`llmctl.model.config.flops_per_token`) times tokens/s, over the device's peak dense FLOPs.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from llmctl.errors import ConfigError

# Dense (no sparsity) peak FLOP/s per device by name fragment, from vendor datasheets.
# Matched in order against torch.cuda.get_device_name(); the first fragment found wins.
GPU_PEAK_FLOPS: tuple[tuple[str, float, float], ...] = (
    # (name fragment, bf16, fp32 [TF32 tensor cores are not used by fp32 matmuls by default])
    ("H200", 989e12, 67e12),
    ("H100 PCIe", 756e12, 51e12),
    ("H100", 989e12, 67e12),  # SXM
    ("GH200", 989e12, 67e12),
    ("B200", 2250e12, 80e12),
    ("A100", 312e12, 19.5e12),
    ("A10G", 125e12, 31.2e12),
    ("L40S", 362e12, 91.6e12),
    ("L4", 121e12, 30.3e12),
    ("RTX 4090", 165e12, 82.6e12),
    ("RTX 3090", 71e12, 35.6e12),
    ("V100", 125e12, 15.7e12),  # fp16 tensor cores; no bf16
    ("T4", 65e12, 8.1e12),
)
# CPUs: a nominal fp32 peak from the vector ISA, FLOPs/cycle/core = FMA units x lanes x 2 (AVX-512:
# 2 x 16 x 2 = 64; AVX2: 2 x 8 x 2 = 32; else 16) at the reported clock (3 GHz when unknown). It is a
# ceiling, not a promise (clocks throttle; some cores split 512-bit ops): compare CPU MFU between runs
# on one machine, never across machines. A fixed 50 GFLOP/s/core was measured to give MFU > 100%.
DEFAULT_CPU_HZ = 3.0e9


def cpu_flops_per_core() -> float:
    flags, hz = "", DEFAULT_CPU_HZ
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags") and not flags:
                    flags = line
                elif line.startswith("cpu MHz"):
                    hz = max(hz if hz != DEFAULT_CPU_HZ else 0.0, float(line.split(":")[1]) * 1e6)
    except (OSError, ValueError):
        pass
    words = set(flags.split())
    per_cycle = 64 if "avx512f" in words else 32 if {"avx2", "fma"} <= words else 16
    return per_cycle * (hz or DEFAULT_CPU_HZ)


def peak_flops(device: str, dtype: str, threads: int | None = None) -> tuple[float | None, str]:
    """(peak FLOP/s, device description) for MFU; None when the GPU is not in the table."""
    if device.startswith("cuda"):
        import torch

        name = torch.cuda.get_device_name(torch.device(device))
        for fragment, bf16, fp32 in GPU_PEAK_FLOPS:
            if fragment in name:
                return (bf16 if dtype == "bf16" else fp32), name
        return None, name
    cores = threads or os.cpu_count() or 1
    return cores * cpu_flops_per_core(), f"cpu x{cores} (nominal ISA peak)"


def mfu(flops_per_token: float, tokens_per_s: float, peak: float | None) -> float | None:
    """Model FLOPs utilisation in [0, 1]; None without a known peak."""
    return None if not peak else flops_per_token * tokens_per_s / peak


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The rows of a metrics.jsonl (none when it is missing or unreadable), up to a torn last line."""
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return []
    rows = []
    for line in lines:
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            break  # a torn last line from a killed process
    return rows


class MetricsWriter:
    """Append-only JSONL, one object per line, flushed per line so a killed run keeps its history."""

    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)

    def truncate_after(self, step: int) -> None:
        """Drop lines logged after `step` (a resumed run repeats those steps from its checkpoint)."""
        if not self.path.exists():
            return
        kept = [line for line in self.read() if line.get("step", 0) <= step]
        self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))

    def read(self) -> list[dict[str, Any]]:
        return read_metrics(self.path)

    def write(self, row: dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")


class ExternalLoggers:
    """Optional TensorBoard and W&B sinks (imported only when enabled)."""

    def __init__(
        self,
        *,
        tensorboard: bool,
        wandb: bool,
        log_dir: Path,
        project: str,
        config: dict,
        section: str = "pretrain",
    ):
        self.tb = None
        self.wandb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ConfigError(
                    f"{section}.tensorboard is true but tensorboard is not installed",
                    hint=f"pip install tensorboard, or set {section}.tensorboard=false",
                ) from None
            self.tb = SummaryWriter(str(log_dir / "tensorboard"))
        if wandb:
            try:
                import wandb as wandb_module
            except ImportError:
                raise ConfigError(
                    f"{section}.wandb is true but wandb is not installed",
                    hint=f"pip install wandb, or set {section}.wandb=false",
                ) from None
            self.wandb = wandb_module
            wandb_module.init(project=project, config=config, dir=str(log_dir))

    def log(self, step: int, values: dict[str, Any]) -> None:
        scalars = {k: v for k, v in values.items() if isinstance(v, (int, float)) and k != "step"}
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, step)
        if self.wandb is not None:
            self.wandb.log(scalars, step=step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


PANEL_METRICS = ("rewards/accuracies",)  # drawn in a second panel, train and val, when a run logs them


def plot_losses(metrics_path: Path, out_path: Path, title: str = "pretrain") -> Path | None:
    """Train (and val) loss against tokens as a PNG, with a second panel for a preference run's
    reward accuracy; None when there is nothing to plot."""
    import matplotlib

    matplotlib.use("Agg")  # no display; safe in threads and on servers
    import matplotlib.pyplot as plt

    rows = MetricsWriter(metrics_path).read()
    train = [(r["tokens"], r["loss"]) for r in rows if "loss" in r]
    val = [(r["tokens"], r["val_loss"]) for r in rows if r.get("val_loss") is not None]
    if not train:
        return None
    panels = [key for key in PANEL_METRICS if any(key in r for r in rows)]
    fig, axes = plt.subplots(1 + len(panels), 1, figsize=(7, 4 + 2.5 * len(panels)), dpi=100, sharex=True)
    axes = list(axes) if panels else [axes]
    _curves(axes[0], train, val, "loss (nats/token)" if not panels else "loss")
    for ax, key in zip(axes[1:], panels, strict=True):
        _curves(
            ax,
            [(r["tokens"], r[key]) for r in rows if key in r],
            [(r["tokens"], r[f"val_{key}"]) for r in rows if r.get(f"val_{key}") is not None],
            key,
        )
    axes[0].set_title(title)
    axes[-1].set_xlabel("tokens")
    fig.tight_layout()
    fig.savefig(out_path)
    plt.close(fig)
    return out_path


def _curves(ax, train: list[tuple[float, float]], val: list[tuple[float, float]], label: str) -> None:
    ax.plot(*zip(*train, strict=True), label="train", linewidth=1)
    if val:
        ax.plot(*zip(*val, strict=True), "o-", label="val", markersize=3)
    ax.set_ylabel(label)
    ax.grid(alpha=0.3)
    ax.legend()
