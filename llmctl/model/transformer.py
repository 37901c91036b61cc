"""The llmctl transformer: a Llama-style decoder in one file (read it top to bottom).

Features:
- pre-norm blocks with RMSNorm (Zhang & Sennrich 2019, https://arxiv.org/abs/1910.07467);
- rotary position embeddings with configurable theta, "rotate-half" layout as in HF Llama
  (Su et al. 2021, https://arxiv.org/abs/2104.09864), cos/sin cached as buffers, with the
  long-context frequency scalings of imported models (linear, llama3, yarn; see RopeScaling);
- grouped-query attention via `n_kv_head` (Ainslie et al. 2023, https://arxiv.org/abs/2305.13245),
  optional per-head QK-norm (Qwen3) and optional q/k/v biases (Qwen2), computed with
  `F.scaled_dot_product_attention` (the `is_causal` fast path when there is no mask or cache; CPU
  training of sequences up to 128 positions uses three batched products instead, faster there);
- SwiGLU MLP (Shazeer 2020, https://arxiv.org/abs/2002.05202);
- optional tied input/output embeddings;
- on CPU, autograd Functions with hand-written backwards for RMSNorm, rotary, SwiGLU and the
  cross-entropy, and for training each block's two halves as one Function each (fewer ops and
  fewer fresh buffers than autograd's composites; plain formulas elsewhere, checked against them
  by gradcheck in tests/test_model.py);
- a preallocated KV cache, 2-D padding masks for ragged (left-padded) batches and position ids, so
  one model serves training, evaluation, RL rollouts and the generation engine;
- parameter names identical to Hugging Face Llama (`model.layers.0.self_attn.q_proj.weight`, ...),
  so checkpoints convert by copying tensors.

    model = Transformer(preset("tiny", vocab_size=8192))
    loss = model(idx, targets)                  # idx, targets: (B, T) int64; -100 = ignore
    logits = model(idx)                         # (B, T, vocab_size)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from llmctl.model.config import ModelConfig, RopeScaling, flops_per_token
from llmctl.model.scratch import scratch as _scratch

IGNORE_INDEX = -100  # target value that contributes no loss (the PyTorch / HF convention)


# ---- small functions -----------------------------------------------------------------------------


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm's output and rstd = 1/sqrt(mean(x^2) + eps) (..., 1). Reads x once for the sum of
    squares (vector_norm: no (..., C) temporary of squares) and writes the output in one buffer."""
    rstd = torch.linalg.vector_norm(x, dim=-1, keepdim=True).square_().div_(x.shape[-1]).add_(eps).rsqrt_()
    return torch.mul(x, rstd).mul_(weight), rstd


def _rms_norm_backward(
    grad: torch.Tensor,
    x: torch.Tensor,
    rstd: torch.Tensor,
    weight: torch.Tensor,
    *,
    weight_grad: bool,
    in_place: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Gradients of RMSNorm for x and weight. With t = grad * x: gw = t^T rstd and
    sum(grad * w * x) = t @ w as two matrix-vector products, and
    gx = rstd * grad * w - x * rstd^3 * sum(grad * w * x) / C.
    in_place writes gx over grad (for a caller's own buffer, never autograd's)."""
    C = x.shape[-1]
    t = torch.mul(grad, x, out=_scratch("norm.t", grad.shape, grad)) if in_place else grad * x
    t = t.reshape(-1, C)
    rows = rstd.reshape(-1)
    g_weight = t.T @ rows if weight_grad else None  # sum over rows of grad * xhat
    scale = (t @ weight).mul_(rows.pow(3)).mul_(-1 / C).view_as(rstd)  # (..., 1)
    g_x = grad.mul_(weight) if in_place else grad * weight
    return g_x.mul_(rstd).addcmul_(x, scale), g_weight


class RMSNormFunction(torch.autograd.Function):
    """RMSNorm y = x * rstd * w with a hand-written backward (_rms_norm_backward).

    On CPU autograd runs the norm as a composite of ~6 ops and differentiates each one (pow, mean,
    rsqrt, two muls, and their backward muls/sums/divs): measured 3x slower forward+backward than
    this at (16, 256, 384), and ~10% of a small-model training step. It saves x (alive anyway: the
    residual stream) and rstd. Any dtype/device works; the model uses it for fp32/fp64 CPU (see
    RMSNorm) where the fused blocks below do not apply.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        y, rstd = _rms_norm(x, weight, eps)
        ctx.save_for_backward(x, rstd, weight)
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, rstd, weight = ctx.saved_tensors
        g_x, g_weight = _rms_norm_backward(grad, x, rstd, weight, weight_grad=ctx.needs_input_grad[1])
        return g_x, g_weight, None


class RMSNorm(nn.RMSNorm):
    """nn.RMSNorm (parameter `weight`, as HF); RMSNormFunction for fp32/fp64 on CPU without
    autocast, where F.rms_norm is a slow composite; F.rms_norm (fused kernels, bf16) elsewhere."""

    def eps_for(self, dtype: torch.dtype) -> float:
        """eps, or the dtype's machine epsilon when None (as F.rms_norm takes it)."""
        return self.eps if self.eps is not None else torch.finfo(dtype).eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cpu_fp = x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64)
        if cpu_fp and not torch.is_autocast_enabled("cpu"):
            return RMSNormFunction.apply(x, self.weight, self.eps_for(x.dtype))
        return super().forward(x)


def rope_frequencies(
    head_dim: int, theta: float, scaling: RopeScaling | None = None
) -> tuple[torch.Tensor, float]:
    """Inverse frequencies (head_dim/2,) and the cos/sin multiplier, computed exactly as HF does
    (transformers' modeling_rope_utils) so imported long-context models match to fp32 rounding."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    inv_freq = 1.0 / (theta**exponents)
    if scaling is None:
        return inv_freq, 1.0
    factor = scaling.factor
    if scaling.rope_type == "linear":
        return inv_freq / factor, 1.0
    original = scaling.original_max_position_embeddings
    if scaling.rope_type == "llama3":
        low_wavelen = original / scaling.low_freq_factor
        high_wavelen = original / scaling.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (original / wavelen - scaling.low_freq_factor) / (
            scaling.high_freq_factor - scaling.low_freq_factor
        )
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return torch.where(medium, smoothed, scaled), 1.0

    # yarn: interpolate (/ factor) the slow dimensions, keep the fast ones, ramp in between.
    def correction_dim(rotations: float) -> float:
        return head_dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(scaling.beta_fast), correction_dim(scaling.beta_slow)
    if scaling.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001  # as HF: no division by zero
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    pos_freqs = theta**exponents
    keep = 1 - ramp  # 1: extrapolate (keep the frequency), 0: interpolate (/ factor)
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - keep) + (1.0 / pos_freqs) * keep
    attention_factor = scaling.attention_factor
    if attention_factor is None:
        attention_factor = 0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0
    return inv_freq, attention_factor


def rope_tables(
    head_dim: int,
    max_seq_len: int,
    theta: float,
    device=None,
    scaling: RopeScaling | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary tables (max_seq_len, head_dim): cos = [cos, cos], sin = [-sin, sin] (sign folded in).

    Angles are computed exactly as HF Llama does (fp32 outer product), so imported models match to
    fp32 rounding; folding the sign into sin makes `apply_rotary` three elementwise ops.
    """
    inv_freq, attention_factor = rope_frequencies(head_dim, theta, scaling)
    t = torch.arange(max_seq_len, dtype=torch.int64, device=device).float()
    freqs = torch.outer(t, inv_freq.to(device))  # (T, head_dim/2)
    cos, sin = freqs.cos() * attention_factor, freqs.sin() * attention_factor
    return torch.cat((cos, cos), dim=-1), torch.cat((-sin, sin), dim=-1)


def apply_rotary(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate the (x1, x2) halves of the last dim of q and k ("rotate-half" layout, as HF Llama):
    [x1 cos - x2 sin, x2 cos + x1 sin] = x * cos + roll(x) * sin, with roll(x) = [x2, x1] and the
    tables from rope_tables. q, k (B, T, heads, hd); cos/sin broadcastable to (B, T, 1, hd), or
    (B, T, n_head, hd) per head (k, with fewer heads under GQA, takes the first n_kv_head).
    (3 ops instead of 7 for chunk/mul/cat: measured 3-10x faster forward+backward on CPU.)
    On CPU, RotaryFunction: roll is a copy through cat there (~1/3 of the rotary's time)."""
    if q.device.type == "cpu":
        return RotaryFunction.apply(q, k, cos, sin)
    half = q.shape[-1] // 2
    return tuple(
        torch.addcmul(x * _first_heads(cos, x), x.roll(half, dims=-1), _first_heads(sin, x)) for x in (q, k)
    )


def _first_heads(table: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A rotary table (.., T, heads, hd) cut to x's heads (k has fewer under GQA); tables without a
    heads dim, or with one of size 1, broadcast as they are."""
    return table[..., : x.shape[-2], :] if table.dim() >= 3 else table


def _rotate_halves(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, sign: float, out: torch.Tensor | None = None
) -> torch.Tensor:
    """x * cos + sign * roll(x) * sin without materialising roll(x): each half takes the other.
    Written into `out` (shaped like x) when given."""
    h = x.shape[-1] // 2
    out = torch.mul(x, cos, out=out) if out is not None else x * cos
    out[..., :h].addcmul_(x[..., h:], sin[..., :h], value=sign)
    out[..., h:].addcmul_(x[..., :h], sin[..., h:], value=sign)
    return out


class RotaryFunction(torch.autograd.Function):
    """apply_rotary with its backward as the inverse rotation: the rotation is orthogonal, so
    dx = rotate(grad, -theta) = grad * cos - roll(grad) * sin (roll(sin) = -sin with the folded
    sign). Measured ~12% faster forward+backward than autograd through addcmul/roll on CPU
    (fewer ops, no roll copies); q and k in one call halves the Python overhead, which matters
    for small models. Any dtype/device works."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        ctx.save_for_backward(cos, sin)
        cos_k, sin_k = _first_heads(cos, k), _first_heads(sin, k)
        return _rotate_halves(q, cos, sin, 1.0), _rotate_halves(k, cos_k, sin_k, 1.0)

    @staticmethod
    def backward(ctx, grad_q: torch.Tensor, grad_k: torch.Tensor):
        cos, sin = ctx.saved_tensors
        cos_k, sin_k = _first_heads(cos, grad_k), _first_heads(sin, grad_k)
        return _rotate_halves(grad_q, cos, sin, -1.0), _rotate_halves(grad_k, cos_k, sin_k, -1.0), None, None


class CrossEntropyFunction(torch.autograd.Function):
    """Cross-entropy of logits (N, V) against targets (N,) (IGNORE_INDEX rows add nothing), as
    F.cross_entropy, computing the gradient in forward into the log-softmax buffer.

    The loss needs log_softmax(logits); the gradient is softmax - onehot(target), scaled, which
    forward writes over that same buffer. Backward then returns it as is (for the usual grad of
    1) instead of allocating two more (N, V) buffers (nll_loss_backward's zeros and
    log_softmax_backward's result): each is a fresh mmap that page-faults every step (131k -> 65k
    faults per step at 4096 x 8192, measured -70 ms of a 2.2 s CPU step). Backward does not
    modify saved tensors, so it may run twice (retain_graph).
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, reduction: str) -> torch.Tensor:
        grad = torch.log_softmax(logits, dim=-1)  # (N, V): log-probabilities, then the gradient
        valid = targets != IGNORE_INDEX
        safe = torch.where(valid, targets, 0)[:, None]  # (N, 1)
        nll = torch.where(valid, -grad.gather(1, safe).squeeze(1), 0.0)  # (N,)
        count = valid.sum().to(grad.dtype)
        loss = {"mean": nll.sum() / count, "sum": nll.sum(), "none": nll}[reduction]
        per_target = valid.to(grad.dtype)  # (N,): what each row's target takes off its softmax
        if reduction == "mean":
            per_target /= count
            grad.sub_(count.log())  # so that exp gives softmax / count in the same pass
        grad.exp_().scatter_add_(1, safe, -per_target[:, None])
        if not bool(valid.all()):
            grad[~valid] = 0
        ctx.save_for_backward(grad)
        ctx.reduction = reduction
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        (grad,) = ctx.saved_tensors
        if ctx.reduction == "none":
            return grad * grad_loss[:, None], None, None
        if bool(grad_loss == 1):  # the usual loss.backward(): no new buffer
            return grad, None, None
        return grad * grad_loss, None, None


# ---- KV cache ------------------------------------------------------------------------------------


class KVCache:
    """Preallocated keys/values for all layers: (n_layer, B, n_kv_head, max_len, head_dim) each.

    All rows share one write position `pos` (ragged batches are left-padded, with a padding mask
    passed to forward). The model advances `pos` once per forward, after every layer wrote.
    The first `rows` rows are in use (all B until `keep_rows` drops finished ones).
    """

    def __init__(
        self,
        cfg: ModelConfig,
        batch_size: int,
        max_len: int,
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ):
        shape = (cfg.n_layer, batch_size, cfg.n_kv_head, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.max_len = max_len
        self.pos = 0
        self.rows = batch_size

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (rows, n_kv_head, T, hd) at pos; return views of all keys/values so far."""
        end = self.pos + k.shape[2]
        assert end <= self.max_len, f"KV cache overflow: {end} > {self.max_len}"
        assert k.shape[0] == self.rows, (k.shape, self.rows)
        self.k[layer, : self.rows, :, self.pos : end] = k
        self.v[layer, : self.rows, :, self.pos : end] = v
        return self.k[layer, : self.rows, :, :end], self.v[layer, : self.rows, :, :end]

    def keep_rows(self, kept: list[int]) -> list[int]:
        """Keep rows `kept` (of the first `rows`) as the first len(kept) rows; returns which old row
        each new row is. A kept row below the new count stays where it is; each one beyond it moves
        into a dropped row's place, so only the movers' keys and values are copied."""
        n = len(kept)
        placed = list(range(n))
        movers = [r for r in kept if r >= n]
        holes = sorted(set(range(n)) - set(kept))
        if movers:
            src = torch.tensor(movers, device=self.k.device)
            dst = torch.tensor(holes, device=self.k.device)
            for cache in (self.k, self.v):
                cache[:, dst, :, : self.pos] = cache[:, src, :, : self.pos]
            for hole, mover in zip(holes, movers, strict=True):
                placed[hole] = mover
        self.rows = n
        return placed

    def reset(self) -> None:
        self.pos = 0
        self.rows = self.k.shape[1]


# ---- attention -----------------------------------------------------------------------------------


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        q_dim, kv_dim = cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim
        self.q_proj = nn.Linear(cfg.n_embd, q_dim, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(cfg.n_embd, kv_dim, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(cfg.n_embd, kv_dim, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(q_dim, cfg.n_embd, bias=False)
        if cfg.qk_norm:  # per-head RMSNorm of q and k before rotary (Qwen3; stabilises logits)
            self.q_norm = RMSNorm(cfg.head_dim, eps=cfg.norm_eps)
            self.k_norm = RMSNorm(cfg.head_dim, eps=cfg.norm_eps)
        self.qk_norm = cfg.qk_norm

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None,
        is_causal: bool,
        cache: KVCache | None,
    ) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim)  # (B, T, n_head, hd)
        k = self.k_proj(x).view(B, T, self.n_kv_head, self.head_dim)  # (B, T, n_kv_head, hd)
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rotary(q, k, cos, sin)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, T, hd)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)  # (B, n_kv_head, S, hd), S = past + T
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=is_causal, enable_gqa=self.n_kv_head != self.n_head
        )  # (B, n_head, T, hd)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim))


# ---- MLP and block -------------------------------------------------------------------------------


class SwiGLUFunction(torch.autograd.Function):
    """silu(gate) * up, saving only gate and up and working in place: one (B, T, hidden) buffer in
    forward and two in backward instead of two and three (recomputing silu(gate) in backward).
    Fresh CPU buffers of this size page-fault; measured +1.5% on a CPU training step."""

    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gate, up)
        return F.silu(gate).mul_(up)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        gate, up = ctx.saved_tensors
        g_up = F.silu(gate).mul_(grad)
        g_gate = grad * up
        torch.ops.aten.silu_backward.grad_input(g_gate, gate, grad_input=g_gate)  # in place
        return g_gate, g_up


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.n_embd, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.n_embd, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.n_embd, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_proj(x), self.up_proj(x)  # (B, T, intermediate_size)
        if x.device.type == "cpu" and gate.requires_grad and not torch.is_autocast_enabled("cpu"):
            return self.down_proj(SwiGLUFunction.apply(gate, up))
        return self.down_proj(F.silu(gate) * up)


# ---- fused CPU training blocks ---------------------------------------------------------------------
# Each half of a block, x + attn(norm(x)) and x + mlp(norm(x)), as one autograd Function with a
# hand-written backward, used for training on CPU (fp32/fp64, no mask or cache, plain linears).
# Small models there are bound by per-op overhead, not FLOPs: autograd records ~25 nodes per half
# (linears with their views and transposes, the norm, rotary, attention, the residual add and the
# gradient sums where x feeds q, k and v), each a Python/dispatcher round trip in backward. One node
# per half, with the branch gradients summed by addmm_ into one buffer and the residual added by
# addmm, measured a 4L/128d/T64/B12 training step ~15% faster (paired rounds against nanoGPT's
# model.py in one process: 0.89x -> 1.02x on 2 threads, 0.90x -> 1.04x on 1). Both compute what the module path
# computes, in the same order, up to float rounding (tests/test_model.py checks gradcheck in fp64
# and the whole model's loss and gradients against the module path).


def _through_norm_and_residual(
    g_h: torch.Tensor,
    grad: torch.Tensor,
    x2: torch.Tensor,
    rstd: torch.Tensor,
    norm_weight,
    weight_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A half-block's input gradient: the branch's (g_h, at the norm's output, overwritten) back
    through the norm, plus the residual's own; and the norm weight's gradient."""
    g_x, g_norm = _rms_norm_backward(g_h, x2, rstd, norm_weight, weight_grad=weight_grad, in_place=True)
    return g_x.add_(grad.reshape(g_x.shape)).view(grad.shape), g_norm


def _weight_grads(outputs_grads, inputs: torch.Tensor, needed) -> list[torch.Tensor | None]:
    """g^T @ inputs for each product's output gradient g (N, out), where its weight needs one."""
    return [g.t() @ inputs if need else None for g, need in zip(outputs_grads, needed, strict=True)]


# Causal attention for short sequences as three batched products with the probabilities kept for
# backward. Below ~128 positions the CPU flash kernel's per-block small GEMMs lose to two plain bmm
# calls and a softmax: at B12/H4/T64/hd32, forward+backward 0.72 ms against 1.48 ms; at T128 (hd 32
# or 64) 1.35-1.7x faster; at T256 slower (4x forward at B8/H4/hd32), so longer sequences keep the
# flash kernel. On one thread the two are even (0.99x for the whole attention half, whose layout
# copies eat the gain), so one thread keeps the flash kernel too. The probabilities kept per layer,
# B*H*T*T values, are H*T/C times one (B, T, C) activation (2x at 4 heads, T64, C128), beside the
# ~10 such activations a layer keeps anyway.
MATH_ATTENTION_MAX_T = 128
_CAUSAL_MASKS: dict[tuple, torch.Tensor] = {}


def _causal_mask(groups: int, T: int, like: torch.Tensor) -> torch.Tensor:
    """(groups * T, T) additive mask, -inf where key j is after query row r's position r % T."""
    key = (groups, T, like.dtype, like.device)
    mask = _CAUSAL_MASKS.get(key)
    if mask is None:
        query_pos = torch.arange(groups * T, device=like.device) % T
        after = torch.arange(T, device=like.device)[None, :] > query_pos[:, None]
        mask = _CAUSAL_MASKS[key] = torch.zeros(after.shape, dtype=like.dtype, device=like.device)
        mask.masked_fill_(after, float("-inf"))
    return mask


def _grouped(x: torch.Tensor, n_kv_head: int) -> torch.Tensor:
    """(B, heads, T, hd) as (B * n_kv_head, heads // n_kv_head * T, hd): the query heads that share a
    key/value head (SDPA's enable_gqa order) stacked along rows, so GQA needs no repeated keys."""
    B, heads, T, hd = x.shape
    return x.reshape(B * n_kv_head, heads // n_kv_head * T, hd)


def _causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    """softmax(q k^T / sqrt(hd) + causal mask) v for q (B, H, T, hd), k and v (B, n_kv_head, T, hd),
    all contiguous. Returns the output (B, H, T, hd) and the probabilities (B * n_kv_head, G * T, T)."""
    B, H, T, hd = q.shape
    n_kv_head = k.shape[1]
    q_rows, k_rows = _grouped(q, n_kv_head), _grouped(k, n_kv_head)
    mask = _causal_mask(H // n_kv_head, T, q)
    scores = _scratch("attn.scores", (q_rows.shape[0], q_rows.shape[1], T), q)
    torch.baddbmm(mask, q_rows, k_rows.transpose(1, 2), alpha=hd**-0.5, out=scores)
    probs = torch.softmax(scores, dim=-1)
    return torch.bmm(probs, _grouped(v, n_kv_head)).view(B, H, T, hd), probs


def _causal_attention_backward(g_out, q, k, v, probs):
    """Gradients for q, k, v of _causal_attention (g_out shaped as its output, any strides); each
    contiguous, shaped as its input."""
    B, H, T, hd = q.shape
    n_kv_head = k.shape[1]
    g_rows = _grouped(g_out, n_kv_head)  # a copy when g_out is not heads-first
    g_v = torch.bmm(probs.transpose(1, 2), g_rows)  # sums over the heads that share v
    g_probs = torch.bmm(
        g_rows, _grouped(v, n_kv_head).transpose(1, 2), out=_scratch("attn.g_probs", probs.shape, probs)
    )
    g_scores = torch._softmax_backward_data(g_probs, probs, -1, probs.dtype).mul_(hd**-0.5)
    g_q = torch.bmm(g_scores, _grouped(k, n_kv_head))
    g_k = torch.bmm(g_scores.transpose(1, 2), _grouped(q, n_kv_head))
    return g_q.view(q.shape), g_k.view(k.shape), g_v.view(v.shape)


def _heads_first(x: torch.Tensor) -> torch.Tensor:
    """An empty buffer laid out (B, heads, T, hd), seen with x's (B, T, heads, hd) shape."""
    B, T, heads, hd = x.shape
    return x.new_empty(B, heads, T, hd).transpose(1, 2)


class AttentionBlockFunction(torch.autograd.Function):
    """x + o_proj(causal_attention(rotary(q), rotary(k), v)), q/k/v = projections of rms_norm(x).

    x (B, T, C); cos/sin as Transformer.forward passes them; GQA when wk/wv have fewer rows. Attention
    is _causal_attention up to MATH_ATTENTION_MAX_T positions, else the CPU flash kernel (which takes
    fewer key/value heads too). Saves what autograd would: x, rstd, the norm's output, rotated q and
    k, v, attention's output, and its probabilities (or the flash kernel's log-sum-exp)."""

    @staticmethod
    def forward(ctx, x, norm_weight, wq, wk, wv, wo, cos, sin, eps: float, n_head: int):
        B, T, C = x.shape
        x2 = x.reshape(B * T, C)
        h, rstd = _rms_norm(x2, norm_weight, eps)
        hd = wq.shape[0] // n_head
        n_kv_head = wk.shape[0] // hd
        math_attention = T <= MATH_ATTENTION_MAX_T and torch.get_num_threads() > 1
        q = torch.mm(h, wq.t(), out=_scratch("attn.q", (B * T, n_head * hd), h)).view(B, T, n_head, hd)
        k = torch.mm(h, wk.t(), out=_scratch("attn.k", (B * T, n_kv_head * hd), h)).view(B, T, n_kv_head, hd)
        # The batched products want heads-first q and k: the rotation writes them so directly.
        q_into, k_into = (_heads_first(q), _heads_first(k)) if math_attention else (None, None)
        q = _rotate_halves(q, cos, sin, 1.0, out=q_into).transpose(1, 2)  # (B, n_head, T, hd)
        k = _rotate_halves(k, _first_heads(cos, k), _first_heads(sin, k), 1.0, out=k_into).transpose(1, 2)
        v = (h @ wv.t()).view(B, T, n_kv_head, hd).transpose(1, 2)
        if math_attention:
            v = v.contiguous()
            out, state = _causal_attention(q, k, v)  # state: the probabilities
        else:
            out, state = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, True)
        y = out.transpose(1, 2).reshape(B * T, n_head * hd)  # flash: a view, out is laid out (B, T, H, hd)
        ctx.save_for_backward(x2, rstd, h, norm_weight, wq, wk, wv, wo, cos, sin, q, k, v, y, state)
        ctx.math_attention = math_attention
        return torch.addmm(x2, y, wo.t()).view(B, T, C)

    @staticmethod
    def backward(ctx, grad):
        x2, rstd, h, norm_weight, wq, wk, wv, wo, cos, sin, q, k, v, y, state = ctx.saved_tensors
        needs = ctx.needs_input_grad
        B, n_head, T, hd = q.shape
        n_kv_head = k.shape[1]
        g2 = grad.reshape(B * T, -1)
        g_wo = g2.t() @ y if needs[5] else None
        g_out = (
            torch.mm(g2, wo, out=_scratch("attn.g_out", y.shape, y)).view(B, T, n_head, hd).transpose(1, 2)
        )
        if ctx.math_attention:
            g_q, g_k, g_v = _causal_attention_backward(g_out, q, k, v, state)  # heads-first
        else:
            out = y.view(B, T, n_head, hd).transpose(1, 2)
            g_q, g_k, g_v = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
                g_out, q, k, v, out, state, 0.0, True
            )  # laid out (B, T, heads, hd), as the kernel writes them on CPU
        g_q, g_k = g_q.transpose(1, 2), g_k.transpose(1, 2)
        g_q = _rotate_halves(g_q, cos, sin, -1.0, out=_scratch("attn.q", g_q.shape, g_q)).view(B * T, -1)
        cos_k, sin_k = _first_heads(cos, g_k), _first_heads(sin, g_k)
        g_k = _rotate_halves(g_k, cos_k, sin_k, -1.0, out=_scratch("attn.k", g_k.shape, g_k)).view(B * T, -1)
        g_v = g_v.transpose(1, 2).reshape(B * T, n_kv_head * hd)
        g_h = (g_q @ wq).addmm_(g_k, wk).addmm_(g_v, wv)
        g_x, g_norm = _through_norm_and_residual(g_h, grad, x2, rstd, norm_weight, needs[1])
        g_weights = _weight_grads((g_q, g_k, g_v), h, needs[2:5])
        return (g_x, g_norm, *g_weights, g_wo, None, None, None, None)


class MLPBlockFunction(torch.autograd.Function):
    """x + down(silu(gate(h)) * up(h)), h = rms_norm(x). Saves x, rstd, h, gate and up; backward
    recomputes silu(gate) and down's input instead of keeping them (as SwiGLUFunction)."""

    @staticmethod
    def forward(ctx, x, norm_weight, w_gate, w_up, w_down, eps: float):
        C = x.shape[-1]
        x2 = x.reshape(-1, C)
        h, rstd = _rms_norm(x2, norm_weight, eps)
        gate, up = h @ w_gate.t(), h @ w_up.t()
        ctx.save_for_backward(x2, rstd, h, norm_weight, w_gate, w_up, w_down, gate, up)
        mid = torch.ops.aten.silu.out(gate, out=_scratch("mlp.mid", gate.shape, gate)).mul_(up)
        return torch.addmm(x2, mid, w_down.t()).view(x.shape)

    @staticmethod
    def backward(ctx, grad):
        x2, rstd, h, norm_weight, w_gate, w_up, w_down, gate, up = ctx.saved_tensors
        needs = ctx.needs_input_grad
        g2 = grad.reshape(x2.shape)
        silu = torch.ops.aten.silu.out(gate, out=_scratch("mlp.silu", gate.shape, gate))
        g_mid = _scratch("mlp.mid", gate.shape, gate)
        g_down = g2.t() @ torch.mul(silu, up, out=g_mid) if needs[4] else None
        g_mid = torch.mm(g2, w_down, out=g_mid)  # (N, hidden)
        g_up = silu.mul_(g_mid)
        g_gate = g_mid.mul_(up)
        torch.ops.aten.silu_backward.grad_input(g_gate, gate, grad_input=g_gate)  # in place
        g_h = (g_gate @ w_gate).addmm_(g_up, w_up)
        g_x, g_norm = _through_norm_and_residual(g_h, grad, x2, rstd, norm_weight, needs[1])
        return (g_x, g_norm, *_weight_grads((g_gate, g_up), h, needs[2:4]), g_down, None)


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.n_embd, eps=cfg.norm_eps)
        self.self_attn = Attention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.n_embd, eps=cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask, is_causal, cache):
        weights = self._fused_weights(x, mask, is_causal, cache)
        if weights is not None:
            norm1, wq, wk, wv, wo, norm2, w_gate, w_up, w_down = weights
            eps1, eps2 = (
                norm.eps_for(x.dtype) for norm in (self.input_layernorm, self.post_attention_layernorm)
            )
            x = AttentionBlockFunction.apply(x, norm1, wq, wk, wv, wo, cos, sin, eps1, self.self_attn.n_head)
            return MLPBlockFunction.apply(x, norm2, w_gate, w_up, w_down, eps2)
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, is_causal, cache)
        return x + self.mlp(self.post_attention_layernorm(x))

    def _fused_weights(self, x, mask, is_causal, cache) -> tuple[torch.Tensor, ...] | None:
        """The block's weights when the fused CPU Functions above apply, else None: training (grad
        on) in fp32/fp64 on CPU without autocast or torch.compile (inductor fuses on its own), causal
        attention without a mask or cache, no QK-norm, and the block's own norms and linears (not
        replaced, e.g. by quantize; no hooks, as LoRA adds; no biases). Reads the module dicts
        directly: nn.Module attribute lookups cost ~0.7 us each, and this runs every block call."""
        if not (
            x.device.type == "cpu"
            and x.dtype in (torch.float32, torch.float64)
            and is_causal
            and mask is None
            and cache is None
            and torch.is_grad_enabled()
            and not torch.is_autocast_enabled("cpu")
            and not torch.compiler.is_compiling()
            and not nn.modules.module._global_forward_hooks
            and not nn.modules.module._global_forward_pre_hooks
        ):
            return None
        own = self._modules
        attn, mlp = own["self_attn"], own["mlp"]
        if attn.qk_norm:
            return None
        a, m = attn._modules, mlp._modules
        parts = (
            own["input_layernorm"], a["q_proj"], a["k_proj"], a["v_proj"], a["o_proj"],
            own["post_attention_layernorm"], m["gate_proj"], m["up_proj"], m["down_proj"],
        )  # fmt: skip
        for part in parts:
            if (
                type(part) not in (nn.Linear, RMSNorm)
                or part._forward_hooks
                or part._forward_pre_hooks
                or part._parameters.get("bias") is not None
            ):
                return None
        return tuple(part._parameters["weight"] for part in parts)


# ---- model ---------------------------------------------------------------------------------------


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = nn.ModuleDict(
            dict(
                embed_tokens=nn.Embedding(config.vocab_size, config.n_embd),
                layers=nn.ModuleList(Block(config, i) for i in range(config.n_layer)),
                norm=RMSNorm(config.n_embd, eps=config.norm_eps),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.register_buffer("rope_cos", torch.empty(0), persistent=False)
        self.register_buffer("rope_sin", torch.empty(0), persistent=False)
        if not self.lm_head.weight.is_meta:  # on meta to be loaded: the loader computes the tables
            self.reset_rope_buffers()
            self.init_weights()

    def reset_rope_buffers(self, device: torch.device | str | None = None) -> None:
        """(Re)compute the rotary tables; needed after building on the meta device."""
        cfg = self.config
        device = device if device is not None else self.lm_head.weight.device
        dtype = self.lm_head.weight.dtype
        cos, sin = rope_tables(
            cfg.head_dim, cfg.max_seq_len, cfg.rope_theta, device=device, scaling=cfg.rope_scaling
        )
        self.rope_cos, self.rope_sin = cos.to(dtype), sin.to(dtype)

    @torch.no_grad()
    def init_weights(self) -> None:
        """GPT-2 / nanoGPT init: N(0, init_std) for matmuls and embeddings, zero biases, unit norms;
        the two projections that write into the residual stream (o_proj, down_proj) get
        init_std / sqrt(2 * n_layer), so the residual's variance does not grow with depth
        (GPT-2 paper, section 2.3)."""
        std = self.config.init_std
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=std)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.RMSNorm):
                nn.init.ones_(module.weight)
        resid_std = std / math.sqrt(2 * self.config.n_layer)
        for block in self.model.layers:
            nn.init.normal_(block.self_attn.o_proj.weight, mean=0.0, std=resid_std)
            nn.init.normal_(block.mlp.down_proj.weight, mean=0.0, std=resid_std)

    def num_params(self, non_embedding: bool = False) -> int:
        """Actual parameter count (shared tensors once); non_embedding drops embedding and head."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.model.embed_tokens.weight.numel()
            if not self.config.tie_embeddings:
                n -= self.lm_head.weight.numel()
        return n

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (6N + attention), see config.flops_per_token."""
        return flops_per_token(self.config, seq_len)

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        *,
        cache: KVCache | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        logits_to_keep: int = 0,
        reduction: str = "mean",
        return_hidden: bool = False,
        entropy: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Logits (B, T, vocab) for idx (B, T); or the cross-entropy loss when targets (B, T) are given.

        - targets: next-token ids; positions equal to IGNORE_INDEX (-100) add no loss. `reduction`
          "mean" (over counted tokens), "sum", or "none" (per-token (B, T) losses, 0 where ignored).
        - cache: a KVCache; keys/values of idx are written at cache.pos, attention covers the cache.
        - attention_mask: (B, S) with 1 for real tokens and 0 for padding, S = cache.pos + T
          (longer is fine: it is cut to S). Ragged batches are left-padded; positions then count
          real tokens only, unless position_ids (B, T) are given. A 4-D bool mask (B, 1, T, S) is
          used as given (True = may attend; every query must see at least itself) and needs
          position_ids: eval packs continuations that share a context into one row this way.
        - logits_to_keep: compute logits for the last N positions only (0 = all); generation uses 1.
        - return_hidden: return the final-norm hidden states (B, T, n_embd) instead of logits, for
          callers that apply lm_head only at the positions they score.
        - entropy: with reduction "none", also return the entropy of each target position's
          next-token distribution (B, T), detached, 0 where there is no target (RL's metric).
        """
        B, T = idx.shape
        past = cache.pos if cache is not None else 0
        S = past + T
        assert self.config.max_seq_len >= S, f"sequence length {S} > max_seq_len {self.config.max_seq_len}"
        explicit_mask = attention_mask is not None and attention_mask.dim() == 4
        assert not explicit_mask or position_ids is not None, "a 4-D attention mask needs position_ids"
        if position_ids is None and attention_mask is not None:
            position_ids = (attention_mask[:, :S].long().cumsum(-1) - 1).clamp_min(0)[:, past:]
        if position_ids is None:
            # Repeated per head (a copy of T * n_head * hd): the rotary's elementwise ops then run
            # along whole rows rather than in hd-long pieces, measured 25% faster on CPU.
            cos, sin = (
                table[None, past:S, None, :].expand(-1, -1, self.config.n_head, -1).contiguous()
                for table in (self.rope_cos, self.rope_sin)
            )  # (1, T, n_head, hd)
        else:
            cos, sin = (
                self.rope_cos[position_ids].unsqueeze(2),
                self.rope_sin[position_ids].unsqueeze(2),
            )  # (B, T, 1, hd)

        mask, is_causal = None, False
        if attention_mask is None:
            if past == 0:
                is_causal = T > 1  # the fused causal kernel
            elif T > 1:  # chunked prefill: causal with an offset, built explicitly
                mask = self._causal(T, S, past, idx.device)[None, None]
        elif explicit_mask:
            mask = attention_mask[..., :S].bool()  # (B, 1, T, S)
        else:
            mask = attention_mask[:, None, None, :S].bool()  # (B, 1, 1, S)
            if T > 1:
                # A padding query has no real key before it; letting it see itself keeps its row of
                # the softmax finite (an all-masked row is NaN, and NaN * 0 weight poisons the cache).
                rows = torch.arange(T, device=idx.device)[:, None] + past
                self_key = torch.arange(S, device=idx.device)[None, :] == rows
                mask = (mask & self._causal(T, S, past, idx.device)) | self_key  # (B, 1, T, S)

        x = self.model.embed_tokens(idx)  # (B, T, n_embd)
        for block in self.model.layers:
            x = block(x, cos, sin, mask, is_causal, cache)
        if cache is not None:
            cache.pos = S
        x = self.model.norm(x)
        if return_hidden:
            return x

        if targets is None:
            if logits_to_keep:
                x = x[:, -logits_to_keep:]
            return self.lm_head(x)  # (B, T or logits_to_keep, vocab)
        targets = targets.reshape(-1)  # (B*T,)
        x = x.reshape(-1, x.size(-1))  # (B*T, n_embd)
        keep = None
        if not torch.compiler.is_compiling():
            # Positions without a target (prompts and padding under assistant-only loss: ~70% of an
            # SFT batch) need no output layer: computing it only where there is a target saved 13% of
            # an SFT step on SmolLM2-135M. Pretraining, where every position has one, skips the gather.
            keep = targets != IGNORE_INDEX
            if bool(keep.all()):
                keep = None
            else:
                x, targets = x[keep], targets[keep]
        logits = self.lm_head(x).float()  # (N, vocab); no-op in fp32, one upcast under bf16 autocast
        # CrossEntropyFunction pays off where (B*T, vocab) buffers are big enough to be fresh mmaps
        # (glibc: always from 32 MB); at small sizes its ~15 small ops cost more than they save.
        big = logits.numel() * logits.element_size() >= 32 << 20
        if (
            big
            and logits.requires_grad
            and logits.device.type == "cpu"
            and not torch.is_autocast_enabled("cpu")
            and not torch.compiler.is_compiling()  # inductor fuses F.cross_entropy itself
        ):
            loss = CrossEntropyFunction.apply(logits, targets, reduction)
        else:
            loss = F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction=reduction)
        if reduction != "none":
            return loss
        if keep is not None:  # per-token losses back in place, 0 where there is no target
            loss = loss.new_zeros(B * T).masked_scatter(keep, loss)
        if not entropy:
            return loss.view(B, T)
        with torch.no_grad():
            logp = torch.log_softmax(logits.detach(), dim=-1)
            ent = -(logp.exp() * logp).sum(-1)
            if keep is not None:
                ent = ent.new_zeros(B * T).masked_scatter(keep, ent)
        return loss.view(B, T), ent.view(B, T)

    @staticmethod
    def _causal(T: int, S: int, past: int, device) -> torch.Tensor:
        """(T, S) bool: query i (at absolute position past + i) may see keys j <= past + i."""
        return torch.arange(S, device=device)[None, :] <= (torch.arange(T, device=device)[:, None] + past)
