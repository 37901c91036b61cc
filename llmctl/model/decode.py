"""Fast decode steps on CPU: the model's weights repacked for few-row matrix products.

A decode step multiplies a handful of rows (one new token per sequence) by every weight matrix, so
on a CPU it is bound by how fast the weights stream from memory, not by arithmetic. MKL's GEMM
with a few rows against a row-major (out, in) `nn.Linear` weight streams ~17 GB/s on one core and
does not spread over more threads (2-core EPYC: 2 threads = 1 thread). Laid out as (in, out) it
streams 20-30 GB/s; cut into S column blocks, stored (S, in, out/S), and run as one batched GEMM,
the blocks go to different cores: 30-48 GB/s on 2 cores (benchmarks/bench_matvec.py), since two
cores each stream their own share of the memory bandwidth. Fusing q/k/v and gate/up into one
matrix each halves the calls. Together: the 124M model decoded 2.4-2.5x faster at batch 1 and
1.6-1.7x at batch 8 than through `Transformer.forward` when measured on a 2-core EPYC; 1.18x and
1.25x on the 2-core Xeon the same benchmark ran on later (benchmarks/bench_decode.py).
Where torch is built with MKL, one layout beats both at every row count on that Xeon (the EPYC
was not measured again): MKL's packed GEMM (cblas_sgemm_pack once, cblas_sgemm_compute per step),
27 vs 30 ms a SmolLM2-135M step of products at 1 row, 59 vs 71 ms (oneDNN's reordered weight, the
previous choice) at 32 rows; a 32-row rollout sampled 1.16x faster (paired median of 7 rounds).
Elsewhere the column blocks serve up to 3 rows and oneDNN's layout from 4 on. Each layout is built
when first needed.

The rest of a step is op count, which the step keeps low: the rotary as one small matmul per layer
(rotation matrices built once per step), F.rms_norm instead of the model's autograd norm, two
bmms for one-query attention from 128 keys x rows on, and the blocked products read in place.

A quantized model (QuantizedLinear layers, llmctl/model/quantize.py) decodes through torch's packed
int8/int4 kernels instead (`QuantizedPackedLinear`: q/k/v and gate/up fused the same way), which read
1/4 or ~1/8 of the fp32 bytes per token.

The packed copy costs one extra copy of the weights in memory; `PackedDecoder.is_current()`
tells when the model's weights changed since packing (an optimizer step, a load), so a
long-lived engine (RL rollouts between policy updates) repacks instead of decoding stale weights.

    decoder = PackedDecoder(model)
    logits = decoder.step(next_ids, cache)                      # (B,) -> (B, vocab)
    logits = decoder.step(next_ids, cache, attention_mask=mask, position_ids=pos)  # ragged batch
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from llmctl.model.quantize import KernelWeight, QuantizedLinear, QuantizedWeight, has_kernel
from llmctl.model.transformer import KVCache, RMSNorm, Transformer


def packing_pays_off(model: Transformer) -> bool:
    """Packed decode is measured faster for fp32 weights on CPU (the only case measured), and for
    quantized weights on CPU whose scheme has a kernel; GPUs have fast few-row GEMMs, and MKL has no
    batched bf16 GEMM to spread over cores."""
    weight = model.model.embed_tokens.weight  # the residual stream's dtype
    if any(hasattr(m, "lora_A") for m in model.modules()):
        return False  # adapters live in hooks on the linear layers; packed weights would skip them
    quantized = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    if any(not has_kernel(m.scheme) for m in quantized):
        return False
    return weight.device.type == "cpu" and weight.dtype == torch.float32


# MKL's packed GEMM: the weight packed once by cblas_sgemm_pack, each step's product by
# cblas_sgemm_compute, through the two ops torch's CPU inductor uses for frozen linears. The packing
# takes a row count: a weight packed for 64 rows served every count up to 64 within 10% of the best
# packing for that count, one packed for 1 row ran 32-row steps 1.3x slower. Packed for 64 rows, it
# beat both layouts below at every row count on the 2-core Xeon (SmolLM2-135M's 121 matrices run in
# turn, min of 4 rounds, 2 threads, ms a step): 27.1 vs 30.3 (column blocks) at 1 row, 40 vs 55
# (oneDNN) at 8, 59 vs 71 at 32, 74 vs 101 at 64; packing took 0.21 s against oneDNN's 0.28 s. Results
# do not depend on the packing's row count (tests/test_decode.py checks 1 to 70 rows).
MKL_PACK_ROWS = 64
MKL_PACKED = torch.backends.mkl.is_available() and hasattr(torch.ops.mkl, "_mkl_linear")

# Where torch is built without MKL: oneDNN's linear over a weight reordered once into its own blocked
# layout; from 4 rows on it beat the column blocks by 1.1-1.4x a step on the Xeon, at 1 row it lost
# (27.5 vs 42.8 ms a step on 2 threads), at 2-3 rows it was within noise.
ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
ONEDNN_MIN_ROWS = 4


class PackedLinear:
    """y = x @ cat(weights).T + bias for x (B, in), in whichever layout is fastest for B:

    - MKL's packed weight (every B, where torch is built with MKL; `mkl=False` turns it off);
    - column blocks: the weights (out_i, in) concatenated along out, zero-padded to a multiple of
      `blocks` and stored as (blocks, in, out/blocks), one bmm (few rows);
    - oneDNN's reordered weight, one linear (from `onednn_rows` rows on, where oneDNN is built in).

    Each layout is built the first time a step needs it, so a decoder holds only the layouts its
    steps took."""

    def __init__(
        self,
        weights: list[torch.Tensor],
        bias: list[torch.Tensor] | None,
        blocks: int,
        onednn_rows: int = ONEDNN_MIN_ROWS,
        mkl: bool = True,
    ):
        self.sources = [w.detach() for w in weights]  # the model's own tensors: no copy until needed
        self.out_features = sum(w.shape[0] for w in weights)
        self.in_features = weights[0].shape[1]
        self.blocks = blocks
        self.padded = self.out_features % blocks != 0
        self.mkl = mkl and MKL_PACKED
        self.onednn_rows = onednn_rows if ONEDNN else None
        self.bias = torch.cat([b.detach() for b in bias]) if bias is not None else None
        self._blocked: torch.Tensor | None = None
        self._onednn: torch.Tensor | None = None
        self._mkl: torch.Tensor | None = None
        self._mkl_rows = 0  # the row count the MKL layout was packed for
        # _mkl_linear's plain-weight argument, which it reads only when x's rows differ from the
        # count it is given; they never do here, so a zero-stride stand-in (no memory) takes its place
        self._mkl_stand_in = weights[0].new_zeros(()).expand(self.out_features, self.in_features)

    def _source(self) -> torch.Tensor:
        """The (out, in) weight: the model's tensor itself where there is one (an RL rollout repacks
        after every optimizer step, and a cat's copy was half of oneDNN's repacking)."""
        return self.sources[0] if len(self.sources) == 1 else torch.cat(self.sources)

    def blocked_weight(self) -> torch.Tensor:
        """The column blocks (blocks, in, out/blocks), built on first use."""
        if self._blocked is None:
            weight = torch.cat(self.sources)  # (out, in)
            if self.padded:
                pad = -self.out_features % self.blocks
                weight = torch.cat([weight, weight.new_zeros(pad, weight.shape[1])])
            self._blocked = weight.view(self.blocks, -1, weight.shape[1]).transpose(1, 2).contiguous()
        return self._blocked

    def nbytes(self) -> int:
        """Bytes of the layouts built so far. MKL's buffer is allocated 2-9x larger than the weight
        but only the weight's bytes are written (resident memory grew by 540 MB for SmolLM2-135M's
        538 MB of matrices): those are counted."""
        built = sum(t.numel() * t.element_size() for t in (self._blocked, self._onednn) if t is not None)
        if self._mkl is not None:
            built += self.out_features * self.in_features * self.sources[0].element_size()
        return built

    def _layout(self, rows: int) -> str:
        if self.mkl:
            return "mkl"
        return "onednn" if self.onednn_rows is not None and rows >= self.onednn_rows else "blocks"

    def prepare(self, max_rows: int) -> None:
        """Build now every layout that steps of up to `max_rows` rows take."""
        layouts = {self._layout(rows) for rows in (1, max_rows)}
        if "mkl" in layouts:
            self._mkl_weight(max_rows)
        if "onednn" in layouts:
            self._onednn_weight()
        if "blocks" in layouts:
            self.blocked_weight()

    def _mkl_weight(self, rows: int) -> torch.Tensor:
        """MKL's packed weight, packed again for a step of more rows than it was packed for."""
        if self._mkl is None or rows > self._mkl_rows:
            self._mkl = None  # free the old packing first
            self._mkl_rows = max(rows, MKL_PACK_ROWS)
            self._mkl = torch.ops.mkl._mkl_reorder_linear_weight(self._source(), self._mkl_rows)
        return self._mkl

    def _onednn_weight(self) -> torch.Tensor:
        if self._onednn is None:
            self._onednn = torch.ops.mkldnn._reorder_linear_weight(self._source())
        return self._onednn

    def _linear(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """oneDNN's linear (plus `residual`, fused into the product's epilogue)."""
        weight = self._onednn_weight()
        if residual is None:
            return torch.ops.mkldnn._linear_pointwise(x, weight, self.bias, "none", [], "")
        return torch.ops.mkldnn._linear_pointwise.binary(x, residual, weight, self.bias, "add")

    def _mkl_linear(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.shape[0]
        return torch.ops.mkl._mkl_linear(x, self._mkl_weight(rows), self._mkl_stand_in, self.bias, rows)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        layout = self._layout(x.shape[0])
        if layout == "mkl":
            return self._mkl_linear(x)
        if layout == "onednn":
            return self._linear(x)
        B = x.shape[0]
        y = self._blocks(x)  # (blocks, B, out/blocks)
        y = y.view(1, -1) if B == 1 else y.transpose(0, 1).reshape(B, -1)
        if self.padded:
            y = y[:, : self.out_features]
        return y if self.bias is None else y + self.bias

    def _blocks(self, x: torch.Tensor) -> torch.Tensor:
        return torch.bmm(x.expand(self.blocks, *x.shape), self.blocked_weight())

    # With several rows, (blocks, B, out/blocks) -> (B, out) is a copy of the output: these two
    # read the blocks where they are (the copies took ~4% of a 32-row SmolLM2 rollout, profiled).

    def halves(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The output's two halves (gate and up): with two unpadded blocks, each block as it is."""
        layout = self._layout(x.shape[0])
        if layout == "blocks" and self.blocks == 2 and self.bias is None and not self.padded:
            y = self._blocks(x)
            return y[0], y[1]
        return self(x).chunk(2, dim=-1)

    def add_to(self, residual: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """residual + self(x), without a separate copy of the product."""
        layout = self._layout(x.shape[0])
        if layout == "mkl":
            return self._mkl_linear(x).add_(residual)
        if layout == "onednn":
            return self._linear(x, residual)
        blocks, B = self.blocks, x.shape[0]
        if B == 1 or blocks == 1 or self.bias is not None or self.padded:
            return residual + self(x)
        return (residual.view(B, blocks, -1) + self._blocks(x).transpose(0, 1)).view(B, -1)


class QuantizedPackedLinear:
    """PackedLinear's counterpart for QuantizedLinear layers: their codes concatenated along out, in
    the layout of torch's packed int8/int4 kernels (quantize.KernelWeight)."""

    def __init__(self, layers: list[QuantizedLinear]):
        self.kernel = KernelWeight(QuantizedWeight.cat([m.quantized_weight() for m in layers]))
        bias = [m.bias for m in layers]
        self.bias = None if bias[0] is None else torch.cat([b.detach() for b in bias])

    def nbytes(self) -> int:
        return self.kernel.nbytes()

    def prepare(self, max_rows: int) -> None:
        """Nothing to build: the kernel's layout is made with the object."""

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        y = self.kernel(x)
        return y if self.bias is None else y + self.bias

    def halves(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self(x).chunk(2, dim=-1)

    def add_to(self, residual: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return residual + self(x)


Packed = PackedLinear | QuantizedPackedLinear


def pack_linears(
    layers: list[nn.Module], blocks: int, onednn_rows: int = ONEDNN_MIN_ROWS, mkl: bool = True
) -> Packed:
    """One fused packed product for nn.Linear layers, or for QuantizedLinear layers of one scheme."""
    if isinstance(layers[0], QuantizedLinear):
        assert all(isinstance(m, QuantizedLinear) and m.scheme == layers[0].scheme for m in layers), layers
        return QuantizedPackedLinear(layers)
    bias = [m.bias for m in layers] if layers[0].bias is not None else None
    return PackedLinear([m.weight for m in layers], bias, blocks, onednn_rows, mkl)


def rms_norm(norm: RMSNorm, x: torch.Tensor) -> torch.Tensor:
    """F.rms_norm: forward only, a few rows, where RMSNorm's autograd Function costs 2x as much."""
    return nn.functional.rms_norm(x, norm.weight.shape, norm.weight, norm.eps_for(x.dtype))


def rotation_matrices(cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The rotary as matrices (..., hd, hd): x @ R = x * cos + roll(x, hd/2) * sin for the tables
    of rope_tables (sign folded into sin). Built once per step and shared by every layer, it makes
    each layer's rotary one small matmul instead of five elementwise ops and slices (a decode
    step's cost is its op count); each output sums two nonzero products, as the elementwise form."""
    hd = cos.shape[-1]
    rotation = torch.diag_embed(cos)
    columns = torch.arange(hd, device=cos.device)
    rows = (columns + hd // 2) % hd  # roll(x)[i] = x[(i + hd/2) % hd]
    rotation[..., rows, columns] += sin
    return rotation


def attention(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None
) -> torch.Tensor:
    """Decode attention, (B, n_head * hd): SDPA for a handful of keys, where its flash kernel's
    setup is cheap, two batched matmuls (one_query_attention) from 128 keys x rows on, where they
    were measured up to 2.8x faster (batch 8 x 128 keys)."""
    B, _, n_head, hd = q.shape
    if B * keys.shape[2] >= 128:
        return one_query_attention(q, keys, values, mask)
    y = nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), keys, values, attn_mask=mask, enable_gqa=keys.shape[1] != n_head
    )  # (B, n_head, 1, hd)
    return y.reshape(B, n_head * hd)


def one_query_attention(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None
) -> torch.Tensor:
    """softmax(q k^T / sqrt(hd)) v for one query per row, (B, n_head * hd) from q (B, 1, n_head, hd)
    and keys/values (B, n_kv, S, hd), as SDPA with enable_gqa (query head h reads kv head
    h // (n_head / n_kv)). Two batched matmuls and a softmax."""
    B, _, n_head, hd = q.shape
    n_kv, S = keys.shape[1], keys.shape[2]
    q = q.reshape(B * n_kv, n_head // n_kv, hd)  # the query heads that share a kv head, as rows
    scores = torch.baddbmm(
        q.new_empty(()), q, keys.reshape(B * n_kv, S, hd).transpose(1, 2), beta=0.0, alpha=hd**-0.5
    )  # (B * n_kv, group, S)
    if mask is not None:
        scores = scores.view(B, -1, S).masked_fill_(~mask.view(B, 1, S), float("-inf")).view_as(scores)
    return torch.bmm(scores.softmax(-1), values.reshape(B * n_kv, S, hd)).view(B, n_head * hd)


@dataclass
class PackedLayer:
    input_norm: RMSNorm
    qkv: Packed
    q_norm: RMSNorm | None
    k_norm: RMSNorm | None
    o: Packed
    post_attention_norm: RMSNorm
    gate_up: Packed
    down: Packed


class PackedDecoder:
    """One-token-per-row forward of a Transformer through packed weights; equals
    `model(ids[:, None], cache=..., ...)[:, -1]` up to fp32 rounding (tests/test_decode.py)."""

    def __init__(
        self,
        model: Transformer,
        blocks: int | None = None,
        onednn_rows: int = ONEDNN_MIN_ROWS,
        mkl: bool = True,
    ):
        """`blocks`: column blocks of the few-row layout (default: one per thread); `onednn_rows`:
        the fewest rows that go through oneDNN's layout instead; `mkl`: MKL's packed layout for
        every row count where torch has it (PackedLinear)."""
        self.model = model
        self.blocks = blocks or max(1, torch.get_num_threads())
        self.onednn_rows = onednn_rows
        self.mkl = mkl
        self._signature = self._weights_signature()
        with torch.no_grad():
            self.layers = [self._pack_block(block) for block in model.model.layers]
            self.lm_head = self._pack([model.lm_head])

    def _pack(self, layers: list[nn.Module]) -> Packed:
        return pack_linears(layers, self.blocks, self.onednn_rows, self.mkl)

    def _pack_block(self, block: nn.Module) -> PackedLayer:
        attn, mlp = block.self_attn, block.mlp
        return PackedLayer(
            input_norm=block.input_layernorm,
            qkv=self._pack([attn.q_proj, attn.k_proj, attn.v_proj]),
            q_norm=attn.q_norm if attn.qk_norm else None,
            k_norm=attn.k_norm if attn.qk_norm else None,
            o=self._pack([attn.o_proj]),
            post_attention_norm=block.post_attention_layernorm,
            gate_up=self._pack([mlp.gate_proj, mlp.up_proj]),
            down=self._pack([mlp.down_proj]),
        )

    def _weights_signature(self) -> tuple:
        """Which tensors the parameters are, how often each was written in place, and one value of
        each: fused optimizers (AdamW(fused=True), the CPU default here) update parameters without
        bumping their version counters, and an optimizer step changes every element."""

        def version(p: torch.Tensor) -> int:
            try:
                return p._version
            except RuntimeError:  # an inference-mode tensor: it cannot be updated in place
                return 0

        params = list(self.model.parameters())
        with torch.no_grad():
            probes = (
                torch.stack([p.detach().reshape(-1)[-1].float() for p in params]).tolist() if params else []
            )
        return tuple((p.data_ptr(), version(p), probe) for p, probe in zip(params, probes, strict=True))

    def nbytes(self) -> int:
        """Bytes of the packed copies (the memory decoding adds to the model's own)."""

        return sum(p.nbytes() for p in self._products())

    def _products(self) -> list[Packed]:
        layers = [p for layer in self.layers for p in (layer.qkv, layer.o, layer.gate_up, layer.down)]
        return [*layers, self.lm_head]

    def prepare(self, max_rows: int) -> None:
        """Build the layouts that steps of up to `max_rows` rows take now (a server at start-up),
        instead of at the first step that needs each."""
        with torch.no_grad():
            for product in self._products():
                product.prepare(max_rows)

    def is_current(self) -> bool:
        """False once any parameter was replaced or updated in place since packing."""
        return self._weights_signature() == self._signature

    def step(
        self,
        ids: torch.Tensor,
        cache: KVCache,
        *,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits (B, vocab) for one new token per row, ids (B,), written into `cache` at cache.pos.
        attention_mask (B, >= cache.pos + 1) and position_ids (B,) as in Transformer.forward."""
        model, cfg = self.model, self.model.config
        B, past = ids.shape[0], cache.pos
        S = past + 1
        n_head, n_kv, hd = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        if position_ids is None and attention_mask is not None:
            position_ids = attention_mask[:, :S].long().sum(-1) - 1
        if position_ids is None:
            rotary = rotation_matrices(model.rope_cos[past], model.rope_sin[past])  # (hd, hd)
        else:  # per row: (B, 1, hd, hd)
            rotary = rotation_matrices(model.rope_cos[position_ids], model.rope_sin[position_ids])[:, None]
        mask = None if attention_mask is None else attention_mask[:, None, None, :S].bool()

        x = model.model.embed_tokens(ids)  # (B, n_embd)
        for i, layer in enumerate(self.layers):
            qkv = layer.qkv(rms_norm(layer.input_norm, x)).view(B, 1, n_head + 2 * n_kv, hd)
            if layer.q_norm is not None:
                q, k, v = qkv.split([n_head, n_kv, n_kv], dim=2)
                q, k = layer.q_norm(q) @ rotary, layer.k_norm(k) @ rotary
            else:  # q and k side by side: one rotary for both
                qk, v = qkv.split([n_head + n_kv, n_kv], dim=2)
                q, k = (qk @ rotary).split([n_head, n_kv], dim=2)  # (B, 1, heads, hd)
            keys, values = cache.update(i, k.transpose(1, 2), v.transpose(1, 2))  # (B, n_kv, S, hd)
            x = layer.o.add_to(x, attention(q, keys, values, mask))
            gate, up = layer.gate_up.halves(rms_norm(layer.post_attention_norm, x))
            x = layer.down.add_to(x, nn.functional.silu(gate).mul_(up))
        cache.pos = S
        return self.lm_head(rms_norm(model.model.norm, x))
