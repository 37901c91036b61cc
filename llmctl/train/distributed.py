"""Multi-process training: torchrun relaunch, process-group setup, DDP / FSDP2 wrapping, collectives.

How a multi-GPU run works (no launcher script to write):

1. The user types `llmctl pretrain --gpus 8` (plus `--nodes 2 --node-rank 0 --master-addr host
   --master-port 29500` on each node for multi-node). Any stage registered with `distributed=True`
   takes the same flags.
2. The launcher (`llmctl.stages.launch`) checks the device, resolves the inputs and runs the stage's
   preflight once, reuses an up-to-date artifact, and otherwise calls `maybe_relaunch(sys.argv,
   options)`: it re-executes the same command line as
   `python -m torch.distributed.run --standalone --nproc-per-node 8 -m llmctl pretrain --gpus 8 ...`
   and returns torchrun's exit code; inside torchrun (RANK/WORLD_SIZE set) it returns None.
3. Every torchrun child runs the same `llmctl pretrain` command and joins the process group. Rank 0
   goes through the stage runner (run folder, publish) and broadcasts the job to the other ranks,
   which run the same stage function and publish nothing (see `llmctl.stages.launch`).

`--gpus N` needs N CUDA devices; N CPU processes (gloo backend, e.g. to test DDP/FSDP on a laptop, as the
tests do) must be asked for with `--device cpu`: a missing GPU is an error, never a silent CPU run.
Checkpoints are read by every rank from the run folder, so multi-node runs need a shared filesystem
for the workspace (the usual SLURM setup).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import nn

from llmctl.errors import UsageError

DEFAULT_MASTER_PORT = 29500


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the job."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    local_world_size: int = 1
    device: str = "cpu"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def in_torchrun() -> bool:
    """Whether this process was started by torchrun (or anything setting RANK and WORLD_SIZE)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def env_rank() -> int:
    """The global rank from the environment (0 outside torchrun)."""
    return int(os.environ.get("RANK", "0"))


def env_world_size() -> int:
    """The number of processes in the job from the environment (1 outside torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1")) if in_torchrun() else 1


def relaunch_command(argv: list[str], options: dict[str, Any]) -> list[str] | None:
    """The torchrun command line for `options`, or None when one process suffices.

    argv is `sys.argv`; argv[0] is replaced by `-m llmctl`, so the console script and
    `python -m llmctl` relaunch the same way.
    """
    gpus = int(options.get("gpus") or 1)
    nodes = int(options.get("nodes") or 1)
    check_launch(gpus, nodes, options.get("device") or "auto")
    if gpus == 1 and nodes == 1:
        return None
    cmd = [sys.executable, "-m", "torch.distributed.run"]
    if nodes == 1:
        cmd.append("--standalone")
    else:
        if options.get("node_rank") is None or not options.get("master_addr"):
            raise UsageError(
                f"--nodes {nodes} needs --node-rank and --master-addr",
                hint="e.g. --nodes 2 --node-rank 0 --master-addr node001 (see examples/slurm_pretrain.sh)",
            )
        cmd += [
            f"--nnodes={nodes}",
            f"--node-rank={int(options['node_rank'])}",
            f"--master-addr={options['master_addr']}",
            f"--master-port={int(options.get('master_port') or DEFAULT_MASTER_PORT)}",
        ]
    return [*cmd, f"--nproc-per-node={gpus}", "-m", "llmctl", *argv[1:]]


def resolve_device(device: str = "auto", key: str = "pretrain.device") -> str:
    """The device type for a `<section>.device` value (`key` names it in errors): auto = cuda when
    there is one, else cpu."""
    if device == "cpu":
        return "cpu"
    if torch.cuda.is_available():
        return "cuda"
    if device == "cuda":
        raise UsageError(
            f"{key} is cuda but no CUDA device was found ({_cuda_build()})",
            hint=f"set {key}=cpu (or auto), or run on a machine with a GPU",
        )
    return "cpu"


def _cuda_build() -> str:
    return f"torch {torch.__version__}, " + (
        f"CUDA {torch.version.cuda}" if torch.version.cuda else "CPU-only build"
    )


def check_launch(gpus: int, nodes: int, device: str = "auto") -> None:
    """Refuse a multi-process launch that cannot get what it asks for, before any process starts.

    `--gpus N` means N GPUs: without CUDA it is an error (silently running N CPU processes hid a
    missing driver), unless CPU processes are asked for explicitly with device cpu.
    """
    if gpus < 1 or nodes < 1:
        raise UsageError(f"--gpus and --nodes must be >= 1 (got {gpus}, {nodes})")
    if gpus * nodes <= 1 or device == "cpu":
        return
    if not torch.cuda.is_available():
        raise UsageError(
            f"--gpus {gpus}: no CUDA device found ({_cuda_build()})",
            hint=f"to run {gpus} CPU processes (gloo) instead, add --device cpu; "
            "for GPUs, check the driver (nvidia-smi) and install a CUDA build of torch",
        )
    if gpus > torch.cuda.device_count():
        raise UsageError(
            f"--gpus {gpus} but this machine has {torch.cuda.device_count()} CUDA device(s)",
            hint=f"use --gpus {torch.cuda.device_count()}",
        )


def maybe_relaunch(argv: list[str], options: dict[str, Any]) -> int | None:
    """Re-run this command under torchrun when more than one process is asked for.

    Returns torchrun's exit code when it relaunched; None when the caller should go on in this
    process (one process requested, or already a torchrun child).
    """
    if in_torchrun():
        return None
    cmd = relaunch_command(argv, options)
    if cmd is None:
        return None
    from llmctl.threads import choose_threads

    env = dict(os.environ)
    # Each child starts OpenMP with its share of this process's thread budget, not all cores each.
    env["OMP_NUM_THREADS"] = str(max(1, choose_threads() // int(options.get("gpus") or 1)))
    return subprocess.run(cmd, env=env).returncode


def init_distributed(timeout_s: float = 1800, device: str = "auto") -> DistInfo:
    """Join the process group when under torchrun (NCCL on CUDA, gloo on CPU); else a 1-process info.
    `device` is the stage's `device` setting (auto, cpu or cuda). Idempotent: a second call returns
    the same info without joining again."""
    device = resolve_device(device)
    if not in_torchrun() or int(os.environ["WORLD_SIZE"]) == 1:
        return DistInfo(device=device)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    if device == "cuda":
        torch.cuda.set_device(local_rank)
        device = f"cuda:{local_rank}"
    if not dist.is_initialized():
        dist.init_process_group(
            backend="nccl" if device.startswith("cuda") else "gloo", timeout=timedelta(seconds=timeout_s)
        )
    return DistInfo(rank, local_rank, world, local_world, device)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def wrap_model(model: nn.Module, strategy: Literal["auto", "ddp", "fsdp"], info: DistInfo) -> nn.Module:
    """DDP (replicated weights, all-reduced grads) or FSDP2 `fully_shard` per block then the root
    (sharded weights, grads and optimizer state: for models that do not fit one device)."""
    if not info.distributed:
        return model
    if strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for block in model.model.layers:
            fully_shard(block)
        fully_shard(model)
        return model
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [info.local_rank] if info.device.startswith("cuda") else None
    return DistributedDataParallel(model, device_ids=device_ids)


def unwrap(model: nn.Module) -> nn.Module:
    """The module holding the parameters under their HF names (DDP adds `module.`)."""
    from torch.nn.parallel import DistributedDataParallel

    return model.module if isinstance(model, DistributedDataParallel) else model


@contextlib.contextmanager
def grad_sync(model: nn.Module, sync: bool) -> Iterator[None]:
    """Skip the gradient all-reduce on all but the last micro-batch of an accumulation."""
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(model, DistributedDataParallel) and not sync:
        with model.no_sync():
            yield
        return
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(sync)
    yield


def all_reduce(t: torch.Tensor, op: Literal["sum", "mean"] = "sum") -> torch.Tensor:
    """In-place all-reduce (identity outside a process group)."""
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        if op == "mean":
            t /= dist.get_world_size()
    return t


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank src's picklable object on every rank (identity outside a process group)."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def full_state_dicts(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Full (unsharded, CPU) model and optimizer state dicts, keyed by parameter name.

    Collective under FSDP: every rank must call it (rank 0 gets the tensors). The same format for
    1 process, DDP and FSDP, so a checkpoint resumes under any strategy and world size.
    """
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    module = unwrap(model)
    return get_model_state_dict(module, options=opts), get_optimizer_state_dict(
        module, optimizer, options=opts
    )


def load_full_state_dicts(
    model: nn.Module, optimizer: torch.optim.Optimizer | None, model_state: dict, optim_state: dict | None
) -> None:
    """Inverse of `full_state_dicts`; every rank passes the full dicts (read from the checkpoint)."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    opts = StateDictOptions(full_state_dict=True, strict=False)
    module = unwrap(model)
    result = set_model_state_dict(module, model_state, options=opts)
    missing = [k for k in result.missing_keys if k != "lm_head.weight"]  # tied head: stored once
    assert not missing and not result.unexpected_keys, (missing, result.unexpected_keys)
    if optimizer is not None and optim_state is not None:
        set_optimizer_state_dict(
            module, optimizer, optim_state, options=StateDictOptions(full_state_dict=True)
        )
