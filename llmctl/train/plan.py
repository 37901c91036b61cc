"""Plan a training run before running it: devices, memory per device, FLOPs and wall time.

    dev = device_spec("H100-SXM")                       # or "cpu" (this machine's cores and RAM)
    mem = memory_per_device(mc, micro_batch_size=32, seq_len=1024, dtype="bf16", device=dev,
                            strategy="fsdp", world_size=8, activation_checkpointing=False)
    mem.total, mem.largest()                            # bytes; ("activations", 41.2e9)
    flops = training_flops(mc, seq_len=1024, tokens=2.5e9)
    seconds = wall_seconds(flops, dev, world_size=8, mfu=0.4)

The memory model follows what our training library keeps (llmctl.train.setup / precision / optim):
weights, gradients and AdamW's two moments are fp32 (bf16 runs under autocast, so there is no
separate fp32 master copy); DDP replicates all three and keeps a gradient bucket copy
(`gradient_as_bucket_view` is off); FSDP2 (`fully_shard` per block, then the root) divides them by
the world size and gathers one unit (a block, or the root's embedding/head) at a time. Activations
are counted from the transformer's own ops (see `activation_bytes_per_token`). The total is what is
alive at the start of backward plus every gradient: an upper bound by the gradients that are made
while activations are freed (measured on CPU: 4-11% above the allocator's peak, tests/test_plan.py).
Not modelled: the CUDA context and allocator fragmentation (hence the 90% budget), torch.compile's
buffers, GRPO's rollout KV cache, DPO's reference forward (no grad: transient).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Literal

from llmctl.model.config import ModelConfig, flops_per_token, num_params
from llmctl.train.metrics import GPU_PEAK_FLOPS, cpu_flops_per_core

GIB = 1 << 30
# The share of a device's memory a plan may fill: the rest is the CUDA context (~0.5 GiB), the
# caching allocator's fragmentation and what the model does not count.
MEMORY_BUDGET = 0.9
DEFAULT_MFU = {"cuda": 0.4, "cpu": 0.3}  # cpu: the tiny template measured 0.35 of the ISA peak, 1 core

# (name, fragment of GPU_PEAK_FLOPS in llmctl.train.metrics, memory in GiB as sold).
_GPUS: tuple[tuple[str, str, float], ...] = (
    ("H100-SXM", "H100", 80),
    ("H200", "H200", 141),
    ("A100-80GB", "A100", 80),
    ("A100-40GB", "A100", 40),
    ("L40S", "L40S", 48),
    ("RTX-4090", "RTX 4090", 24),
)
DEVICE_NAMES = (*(name for name, _, _ in _GPUS), "cpu")


@dataclass(frozen=True)
class DeviceSpec:
    """One accelerator (or this machine's CPU): dense peak FLOP/s and memory."""

    name: str
    kind: Literal["cuda", "cpu"]
    peak_bf16: float
    peak_fp32: float
    memory_bytes: int

    def peak(self, dtype: str) -> float:
        return self.peak_bf16 if dtype == "bf16" else self.peak_fp32


def device_spec(name: str, *, threads: int | None = None) -> DeviceSpec:
    """A device of the table (DEVICE_NAMES); `cpu` is this machine: `threads` cores (default all)
    at the nominal ISA peak of llmctl.train.metrics, and its physical memory. ValueError if unknown."""
    if name == "cpu":
        cores = threads or os.cpu_count() or 1
        peak = cores * cpu_flops_per_core()
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        return DeviceSpec(f"cpu x{cores}", "cpu", peak, peak, memory)
    peaks = {fragment: (bf16, fp32) for fragment, bf16, fp32 in GPU_PEAK_FLOPS}
    for gpu, fragment, gib in _GPUS:
        if gpu.lower() == name.lower():
            bf16, fp32 = peaks[fragment]
            return DeviceSpec(gpu, "cuda", bf16, fp32, int(gib * GIB))
    raise ValueError(f"unknown device {name!r}; known: {', '.join(DEVICE_NAMES)}")


def table_name(gpu_name: str, memory_bytes: int) -> str | None:
    """The table's name for a CUDA device name (torch.cuda.get_device_name) and its memory."""
    for gpu, fragment, gib in _GPUS:
        if fragment in gpu_name and abs(memory_bytes / GIB - gib) < 0.25 * gib:
            return gpu
    return None


# ---- parameters ----------------------------------------------------------------------------------


def layer_params(cfg: ModelConfig) -> int:
    """Parameters of one block (num_params without the embedding, head and final norm, per layer)."""
    return (num_params(cfg, non_embedding=True) - cfg.n_embd) // cfg.n_layer


def lora_params(cfg: ModelConfig, rank: int, targets: list[str] | tuple[str, ...]) -> int:
    """Adapter parameters: rank * (in + out) for each targeted linear of each block (llmctl.model.lora)."""
    d, f = cfg.n_embd, cfg.intermediate_size
    q, kv = cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim
    shapes = {
        "q_proj": (d, q),
        "k_proj": (d, kv),
        "v_proj": (d, kv),
        "o_proj": (q, d),
        "gate_proj": (d, f),
        "up_proj": (d, f),
        "down_proj": (f, d),
    }
    return cfg.n_layer * sum(rank * sum(shapes[t]) for t in targets if t in shapes)


# ---- activations ---------------------------------------------------------------------------------


def activation_bytes_per_token(cfg: ModelConfig, *, dtype: str, device_kind: str) -> int:
    """Bytes one block keeps for backward, per token, from the ops of llmctl.model.transformer.

    With d = n_embd, q = n_head * head_dim, kv = n_kv_head * head_dim, f = intermediate_size, a block
    saves: its input x (d, the residual stream) and the norm's rstd (1); the norm's output (d, input
    of q/k/v_proj); rotated q and k and v (q + 2kv, for attention); attention's output and
    log-sum-exp (q + n_head); o_proj's contiguous input (q); the mid residual (d) and rstd (1); the
    second norm's output (d); gate and up (2f); SwiGLU's output (f, down_proj's input); plus
    silu(gate) (f) where F.silu * up runs instead of the CPU SwiGLUFunction (autocast, or CUDA).
    In fp32 all are 4 bytes:  4 * (4d + 3q + 2kv + 3f (+f) + n_head + 2).
    Under bf16 autocast the residual stream, rstd and log-sum-exp stay fp32 and the matmul
    inputs/outputs are bf16:  4 * (2d + n_head + 2) + 2 * (2d + 3q + 2kv + 4f).
    QK-norm adds q and k before their norm (q + kv).
    CPU training without QK-norm runs the fused blocks (transformer.py), which keep less (no copy of
    o_proj's input, SwiGLU's output recomputed) but hold reused scratch buffers: their measured peak
    was within 5% of the module path's (test-1m, 8 x 256 tokens: 54.2 vs 51.7 MiB), so one estimate
    serves both (tests/test_plan.py checks it against the fused path).
    """
    d, f = cfg.n_embd, cfg.intermediate_size
    q, kv = cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim
    extra = q + kv if cfg.qk_norm else 0
    if dtype == "bf16":
        return 4 * (2 * d + cfg.n_head + 2) + 2 * (2 * d + 3 * q + 2 * kv + 4 * f + extra)
    swiglu = 3 if device_kind == "cpu" else 4
    return 4 * (4 * d + 3 * q + 2 * kv + swiglu * f + cfg.n_head + 2 + extra)


def head_bytes_per_token(cfg: ModelConfig, *, dtype: str) -> int:
    """The final norm's input and rstd (fp32) and output (lm_head's input) per token."""
    return 4 * (cfg.n_embd + 1) + (2 if dtype == "bf16" else 4) * cfg.n_embd


def logits_bytes(cfg: ModelConfig, tokens: int, *, dtype: str, device_kind: str) -> int:
    """The output layer's (tokens, vocab) buffers at their peak.

    F.cross_entropy keeps the fp32 log-probabilities, and backward adds two more (tokens, vocab)
    buffers (nll_loss's gradient and log_softmax's): 3 x 4 bytes; under bf16 the bf16 logits' gradient
    too (+2). On CPU in fp32, from 32 MiB of logits the model's CrossEntropyFunction writes the
    gradient into the log-probabilities in forward: logits and that buffer, 2 x 4 bytes.
    """
    n = tokens * cfg.vocab_size
    if dtype == "bf16":
        return 14 * n
    if device_kind == "cpu" and 4 * n >= 32 << 20:
        return 8 * n
    return 12 * n


# ---- memory --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per device by term, in order, and their total (see `memory_per_device`)."""

    terms: dict[str, int]
    total: int
    formula: str = ""
    notes: list[str] = field(default_factory=list)

    def largest(self) -> tuple[str, int]:
        name = max(self.terms, key=lambda k: self.terms[k])
        return name, self.terms[name]


def memory_per_device(
    cfg: ModelConfig,
    *,
    micro_batch_size: int,
    seq_len: int,
    dtype: str,
    device: DeviceSpec,
    strategy: str,
    world_size: int,
    activation_checkpointing: bool,
    trainable_params: int | None = None,
    frozen_copies: int = 0,
) -> MemoryEstimate:
    """Peak bytes on one device for a training step of `micro_batch_size` rows of `seq_len` tokens.

    - weights: 4 bytes per parameter (fp32, also under bf16), / world_size under FSDP;
      `frozen_copies` more (a DPO/GRPO reference model, sharded the same way);
    - gradients: 4 bytes per trainable parameter (all of them, or LoRA's), / world_size under FSDP;
    - optimizer state: AdamW's exp_avg and exp_avg_sq, 8 bytes per trainable parameter, idem;
    - DDP gradient buckets (world_size > 1): a second copy of the gradients, 4 bytes per trainable;
    - FSDP unsharded unit (world_size > 1): the largest unit (a block, or the root's embedding, head
      and norm) gathered in fp32 twice (the current one and the prefetched next) plus its gradients;
    - autocast weight copies (bf16): a bf16 copy of every matrix, saved for backward (2 bytes/param);
    - activations: `activation_bytes_per_token` x n_layer + `head_bytes_per_token`, per token of the
      micro-batch; with activation checkpointing each block keeps only its input (4 * n_embd
      bytes), and one block is recomputed at a time;
    - logits and loss: `logits_bytes`.
    Total: the sum; with checkpointing the logits' buffers are freed before the first block is
    recomputed, so only the larger of the two counts.
    """
    n = num_params(cfg)
    trainable = n if trainable_params is None else trainable_params
    sharded = strategy == "fsdp" and world_size > 1
    share = world_size if sharded else 1
    tokens = micro_batch_size * seq_len
    per_block = activation_bytes_per_token(cfg, dtype=dtype, device_kind=device.kind)
    head = head_bytes_per_token(cfg, dtype=dtype)
    terms: dict[str, int] = {
        "weights": 4 * n * (1 + frozen_copies) // share,
        "gradients": 4 * trainable // share,
        "optimizer state": 8 * trainable // share,
    }
    if strategy != "fsdp" and world_size > 1:
        terms["DDP gradient buckets"] = 4 * trainable
    if sharded:
        root = cfg.vocab_size * cfg.n_embd * (1 if cfg.tie_embeddings else 2) + cfg.n_embd
        unit = max(layer_params(cfg), root)
        terms["FSDP unsharded unit"] = 4 * unit * 2 + 4 * unit
    if dtype == "bf16":
        # every matmul weight (the embedding is a lookup, cast only where it is the tied head)
        matrices = (
            n
            - cfg.n_embd * (2 * cfg.n_layer + 1)
            - (0 if cfg.tie_embeddings else cfg.vocab_size * cfg.n_embd)
        )
        terms["autocast weight copies"] = 2 * matrices
    logits = logits_bytes(cfg, tokens, dtype=dtype, device_kind=device.kind)
    overlap = 0
    if activation_checkpointing:
        recompute = tokens * per_block
        terms["activations"] = tokens * (cfg.n_layer * 4 * cfg.n_embd + head) + recompute
        overlap = min(recompute, logits)
        formula = "sum of the terms - min(one block's recompute, logits and loss)"
    else:
        terms["activations"] = tokens * (cfg.n_layer * per_block + head)
        formula = "sum of the terms"
    terms["logits and loss"] = logits
    return MemoryEstimate(terms, sum(terms.values()) - overlap, formula)


# ---- compute -------------------------------------------------------------------------------------


def training_flops(cfg: ModelConfig, *, seq_len: int, tokens: float, forward_only_copies: int = 0) -> float:
    """Training FLOPs for `tokens` tokens at `seq_len` (flops_per_token: 6N + attention), plus a
    forward-only pass (a third of it) per `forward_only_copies` (a reference model)."""
    per_token = flops_per_token(cfg, seq_len)
    return per_token * tokens * (1 + forward_only_copies / 3)


def wall_seconds(flops: float, device: DeviceSpec, *, world_size: int, mfu: float, dtype: str) -> float:
    """Seconds for `flops` on `world_size` devices running at `mfu` of their dense peak."""
    return flops / (device.peak(dtype) * world_size * mfu)
