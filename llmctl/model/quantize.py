"""Weight-only quantization of a Transformer's linear layers, and the layer that runs quantized weights.

Schemes (`QuantScheme`): int8 with one scale per output channel (symmetric), and int4 with one scale
(and, asymmetric, one zero point) per group of 32/64/128 input columns. Codes come from round-to-
nearest (`quantize_rtn`) or GPTQ (`gptq`: Frantar et al. 2022, https://arxiv.org/abs/2210.17323,
columns quantized in order, each one's rounding error spread over the columns not yet quantized
through the inverse Hessian of the layer's calibration inputs).

The codes follow compressed-tensors' conventions, so a saved folder is what llm-compressor writes
(format `pack-quantized`; transformers and vLLM read it): signed codes q in [-2^(b-1), 2^(b-1) - 1],
weight = (q - zero) * scale, zero 0 when symmetric.

`QuantizedLinear` replaces `nn.Linear`. On CPU a few-row product (decode) runs torch's packed-weight
kernels (`torch._weight_int8pack_mm`, `torch._weight_int4pack_mm_for_cpu`) on bf16 activations:
their fp32-activation paths were measured 20-50x slower, the bf16 ones 2.5-3.5x faster than our
fp32 packed GEMMs (one thread, SmolLM2-135M shapes). Many rows (prefill, scoring) multiply the
dequantized fp32 weight, so scores are exactly those of the dequantized model.

    scheme = QuantScheme(bits=4, group_size=128)
    qw = quantize_rtn(linear.weight, scheme)          # or gptq(linear.weight, hessian, scheme)
    layer = QuantizedLinear(qw, linear.bias)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

# Products of up to this many rows (decode batches) run the packed kernels; more rows (prefill,
# scoring) multiply the dequantized fp32 weight, so scores are those of the dequantized model exactly.
KERNEL_MAX_ROWS = 16
INT4_KERNEL_GROUPS = (32, 64, 128, 256)  # group sizes torch's CPU int4 kernel takes
INT4_KERNEL_N_MULTIPLE = 16  # its output width must be a multiple of 16 (padded with zero rows)


@dataclass(frozen=True)
class QuantScheme:
    """bits 8: per output channel, symmetric; bits 4: per group of `group_size` input columns."""

    bits: int
    group_size: int | None = None  # None: one scale per output channel
    symmetric: bool = True

    def __post_init__(self) -> None:
        assert self.bits in (4, 8), f"bits must be 4 or 8, got {self.bits}"
        assert self.group_size is None or self.group_size > 0, self.group_size

    @property
    def qmin(self) -> int:
        return -(1 << (self.bits - 1))

    @property
    def qmax(self) -> int:
        return (1 << (self.bits - 1)) - 1

    def groups(self, in_features: int) -> int:
        return 1 if self.group_size is None else in_features // self.group_size

    def width_error(self, in_features: int) -> str | None:
        """Why this scheme cannot quantize a layer `in_features` wide, or None."""
        if self.group_size is not None and in_features % self.group_size:
            return f"group size {self.group_size} does not divide the input width {in_features}"
        return None

    @property
    def name(self) -> str:
        grouping = "per-channel" if self.group_size is None else f"g{self.group_size}"
        return f"int{self.bits} {grouping} {'sym' if self.symmetric else 'asym'}"


@dataclass
class QuantizedWeight:
    """codes int8 (N, K), scale float32 (N, G), zero int8 (N, G) or None; weight = (codes - zero) * scale
    with each of the G scales covering K / G consecutive columns."""

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None
    scheme: QuantScheme

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        group = self.codes.shape[1] // self.scale.shape[1]
        codes = self.codes.float()
        if self.zero is not None:
            codes = codes - self.zero.float().repeat_interleave(group, dim=1)
        return (codes * self.scale.float().repeat_interleave(group, dim=1)).to(dtype)

    @staticmethod
    def cat(parts: list[QuantizedWeight]) -> QuantizedWeight:
        """Several weights of one scheme and width stacked along the output dim (fused q/k/v)."""
        zeros = [p.zero for p in parts]
        return QuantizedWeight(
            torch.cat([p.codes for p in parts]),
            torch.cat([p.scale for p in parts]),
            None if zeros[0] is None else torch.cat(zeros),
            parts[0].scheme,
        )


# ---- round to nearest ------------------------------------------------------------------------------


def _qparams(w: torch.Tensor, scheme: QuantScheme) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scale and zero (both (N, G)) of w grouped as (N, G, g). Symmetric: amax maps to qmax, so the
    largest weight is exact. Asymmetric: [min, max] (widened to contain 0) spans [qmin, qmax], as
    compressed-tensors' min-max observer computes it."""
    if scheme.symmetric:
        scale = w.abs().amax(-1) / scheme.qmax
        return torch.where(scale > 0, scale, 1.0), None
    lo, hi = w.amin(-1).clamp(max=0), w.amax(-1).clamp(min=0)
    scale = (hi - lo) / (scheme.qmax - scheme.qmin)
    scale = torch.where(scale > 0, scale, 1.0)
    zero = (scheme.qmin - lo / scale).round().clamp(scheme.qmin, scheme.qmax)
    return scale, zero


def _round(
    w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, scheme: QuantScheme
) -> torch.Tensor:
    """Codes (as float) of w with broadcastable scale/zero."""
    q = torch.round(w / scale)
    if zero is not None:
        q = q + zero
    return q.clamp(scheme.qmin, scheme.qmax)


def quantize_rtn(weight: torch.Tensor, scheme: QuantScheme) -> QuantizedWeight:
    """Round-to-nearest codes of a (N, K) weight."""
    w = weight.detach().float()
    N, K = w.shape
    assert scheme.width_error(K) is None, scheme.width_error(K)
    grouped = w.view(N, scheme.groups(K), -1)  # (N, G, g)
    scale, zero = _qparams(grouped, scheme)
    q = _round(grouped, scale[..., None], None if zero is None else zero[..., None], scheme)
    return QuantizedWeight(
        q.view(N, K).to(torch.int8),
        scale.float(),
        None if zero is None else zero.to(torch.int8),
        scheme,
    )


# ---- GPTQ ----------------------------------------------------------------------------------------


def gptq(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    scheme: QuantScheme,
    *,
    damp: float = 0.01,
    block_size: int = 128,
) -> QuantizedWeight:
    """GPTQ codes of a (N, K) weight given H = X^T X (K, K) of the layer's calibration inputs X.

    As the reference implementation (github.com/IST-DASLab/gptq): columns in order (no act-order, so
    groups stay contiguous), H damped by `damp` * mean(diag H), the upper Cholesky factor of H^-1,
    lazy batch updates over blocks of `block_size` columns. A group's scale and zero are fixed when
    its first column is reached, from the weights as updated so far (block_size is a multiple of the
    group size, so a group never straddles a block)."""
    # The column loop is thousands of small ops: one thread, since waking a second for each was
    # measured 5-7x slower (SmolLM2-135M's layers, 2 busy cores).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _gptq(weight, hessian, scheme, damp, block_size)
    finally:
        torch.set_num_threads(threads)


def _gptq(
    weight: torch.Tensor, hessian: torch.Tensor, scheme: QuantScheme, damp: float, block_size: int
) -> QuantizedWeight:
    W = weight.detach().float().clone()
    N, K = W.shape
    assert scheme.width_error(K) is None, scheme.width_error(K)
    H = hessian.detach().double().clone()
    assert H.shape == (K, K), (H.shape, K)
    g = scheme.group_size or K
    if scheme.group_size is not None:
        block_size = max(g, block_size // g * g)
    dead = torch.diag(H) == 0  # inputs that were always 0: any weight there is free
    H[dead, dead] = 1
    W[:, dead] = 0
    H += damp * torch.mean(torch.diag(H)) * torch.eye(K, dtype=H.dtype)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True).float()

    codes = torch.zeros(N, K)
    scales = torch.zeros(N, scheme.groups(K))
    zeros = None if scheme.symmetric else torch.zeros(N, scheme.groups(K))
    if scheme.group_size is None:
        s, z = _qparams(W[:, None, :], scheme)
        scales[:, 0] = s[:, 0]
        if zeros is not None:
            zeros[:, 0] = z[:, 0]
    for i1 in range(0, K, block_size):
        i2 = min(i1 + block_size, K)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            grp = col // g
            if scheme.group_size is not None and col % g == 0:
                s, z = _qparams(W1[:, None, i : i + g], scheme)
                scales[:, grp] = s[:, 0]
                if zeros is not None:
                    zeros[:, grp] = z[:, 0]
            s = scales[:, grp]
            z = None if zeros is None else zeros[:, grp]
            w = W1[:, i]
            q = _round(w, s, z, scheme)
            codes[:, col] = q
            deq = (q - z if z is not None else q) * s
            err = (w - deq) / Hinv1[i, i]
            W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return QuantizedWeight(
        codes.to(torch.int8), scales, None if zeros is None else zeros.to(torch.int8), scheme
    )


# ---- kernels -------------------------------------------------------------------------------------


def has_kernel(scheme: QuantScheme) -> bool:
    """Whether torch's CPU packed kernels run this scheme (otherwise: dequantized matmul)."""
    if scheme.bits == 8:
        return scheme.group_size is None and scheme.symmetric
    return scheme.group_size in INT4_KERNEL_GROUPS


class KernelWeight:
    """A QuantizedWeight in the layout of torch's CPU packed-weight kernels: y = x @ W.T for x (M, K),
    computed on bf16 activations and returned in x's dtype."""

    def __init__(self, qw: QuantizedWeight):
        assert has_kernel(qw.scheme), qw.scheme
        self.out_features, self.in_features = qw.shape
        self.bits = qw.scheme.bits
        if self.bits == 8:
            self.codes = qw.codes.contiguous()
            self.scale = qw.scale[:, 0].to(torch.bfloat16).contiguous()
            return
        self.group_size = qw.scheme.group_size
        pad = -self.out_features % INT4_KERNEL_N_MULTIPLE
        unsigned = (qw.codes.to(torch.int32) + 8).contiguous()  # the kernel's codes are 0..15
        scale = qw.scale.float()
        # The kernel dequantizes (u - 8) * scale + zero_f; ours is (q - z) * scale with u = q + 8.
        zero_f = torch.zeros_like(scale) if qw.zero is None else -qw.zero.float() * scale
        if pad:
            unsigned = torch.cat([unsigned, unsigned.new_full((pad, self.in_features), 8)])
            scale = torch.cat([scale, scale.new_ones(pad, scale.shape[1])])
            zero_f = torch.cat([zero_f, zero_f.new_zeros(pad, zero_f.shape[1])])
        self.packed = torch._convert_weight_to_int4pack_for_cpu(unsigned, 1)
        self.scales_and_zeros = torch.stack([scale.t(), zero_f.t()], dim=-1).to(torch.bfloat16).contiguous()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        xb = (x if x.dim() == 2 else x.reshape(-1, self.in_features)).to(torch.bfloat16)
        if self.bits == 8:
            y = torch._weight_int8pack_mm(xb, self.codes, self.scale)
        else:
            y = torch._weight_int4pack_mm_for_cpu(xb, self.packed, self.group_size, self.scales_and_zeros)
            if y.shape[1] != self.out_features:  # the kernel's padding rows
                y = y[:, : self.out_features]
        y = y.to(x.dtype)
        return y if x.dim() == 2 else y.view(*shape[:-1], self.out_features)

    def nbytes(self) -> int:
        tensors = [self.codes, self.scale] if self.bits == 8 else [self.packed, self.scales_and_zeros]
        return sum(t.numel() * t.element_size() for t in tensors)


class QuantizedLinear(nn.Module):
    """nn.Linear with a QuantizedWeight (buffers `codes`, `scale`, `zero`): packed kernels for a few
    rows on CPU, the dequantized weight otherwise (other devices, prefill, scoring)."""

    def __init__(self, qw: QuantizedWeight, bias: torch.Tensor | None = None):
        super().__init__()
        self.out_features, self.in_features = qw.shape
        self.scheme = qw.scheme
        self.register_buffer("codes", qw.codes)
        self.register_buffer("scale", qw.scale.float())
        self.register_buffer("zero", qw.zero)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self._kernel: KernelWeight | None = None

    def quantized_weight(self) -> QuantizedWeight:
        return QuantizedWeight(self.codes, self.scale, self.zero, self.scheme)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.quantized_weight().dequantize(dtype)

    def kernel(self) -> KernelWeight | None:
        """The packed-kernel copy of the weight (built once), or None where no kernel applies."""
        if self.codes.device.type != "cpu" or not has_kernel(self.scheme):
            return None
        if self._kernel is None:
            self._kernel = KernelWeight(self.quantized_weight())
        return self._kernel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        kernel = self.kernel() if rows <= KERNEL_MAX_ROWS and not torch.is_grad_enabled() else None
        if kernel is not None:
            y = kernel(x)
            return y if self.bias is None else y + self.bias
        return F.linear(x, self.dequantize(x.dtype), self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.scheme.name}"


# ---- compressed-tensors storage --------------------------------------------------------------------


def pack_int32(codes: torch.Tensor, bits: int, dim: int = 1) -> torch.Tensor:
    """Signed codes (int8, 2-D) packed 32 // bits to an int32 along `dim`, element j of a word in bits
    j*bits.. as offset-binary (q + 2^(bits-1)): compressed-tensors' pack_to_int32 for 4 and 8 bits."""
    per = 32 // bits
    u = codes.to(torch.int64) + (1 << (bits - 1))
    if dim == 0:
        u = u.t()
    rows, cols = u.shape
    u = F.pad(u, (0, -cols % per)).view(rows, -1, per)
    words = (u << (torch.arange(per, dtype=torch.int64) * bits)).sum(-1)
    words = torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)
    return (words.t() if dim == 0 else words).contiguous()


def unpack_int32(words: torch.Tensor, bits: int, size: int, dim: int = 1) -> torch.Tensor:
    """Inverse of pack_int32: `size` signed int8 codes along `dim`."""
    per = 32 // bits
    w = words.to(torch.int64) & 0xFFFFFFFF
    if dim == 0:
        w = w.t()
    u = (w[..., None] >> (torch.arange(per, dtype=torch.int64) * bits)) & ((1 << bits) - 1)
    q = (u.reshape(w.shape[0], -1)[:, :size] - (1 << (bits - 1))).to(torch.int8)
    return (q.t() if dim == 0 else q).contiguous()


def scheme_config(scheme: QuantScheme) -> dict:
    """compressed-tensors QuantizationArgs of the weights."""
    return {
        "num_bits": scheme.bits,
        "type": "int",
        "symmetric": scheme.symmetric,
        "strategy": "channel" if scheme.group_size is None else "group",
        "group_size": scheme.group_size,
        "dynamic": False,
        "actorder": None,
        "observer": "minmax",
        "block_structure": None,
    }


def scheme_from_config(args: dict, source: str) -> QuantScheme:
    """The QuantScheme of compressed-tensors weight args; ValueError naming what is unsupported."""
    bits, strategy = args.get("num_bits"), args.get("strategy")
    if args.get("type", "int") != "int" or bits not in (4, 8) or strategy not in ("channel", "group"):
        raise ValueError(f"{source}: only int4/int8 channel or group weights are supported (got {args})")
    return QuantScheme(
        bits=int(bits),
        group_size=int(args["group_size"]) if strategy == "group" else None,
        symmetric=bool(args.get("symmetric", True)),
    )


def quantization_config(scheme: QuantScheme, ignore: list[str], *, version: str = "0.20.1") -> dict:
    """config.json's `quantization_config`: compressed-tensors, pack-quantized, weights only
    (W8A16 / W4A16 in llm-compressor's terms). Targets every Linear except those in `ignore` (["lm_head"]
    keeps the output projection; the embeddings are no Linear)."""
    return {
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
        "quantization_status": "compressed",
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "weights": scheme_config(scheme),
                "input_activations": None,
                "output_activations": None,
                "format": "pack-quantized",
            }
        },
        "ignore": ignore,
        "kv_cache_scheme": None,
        "sparsity_config": {},
        "transform_config": {},
        "global_compression_ratio": None,
        "version": version,
    }


def packed_tensors(prefix: str, layer: QuantizedLinear, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The tensors compressed-tensors stores for one quantized Linear (`prefix` = its module name)."""
    bits = layer.scheme.bits
    out = {
        f"{prefix}.weight_packed": pack_int32(layer.codes, bits),
        f"{prefix}.weight_scale": layer.scale.to(dtype),
        f"{prefix}.weight_shape": torch.tensor([layer.out_features, layer.in_features], dtype=torch.int64),
    }
    if layer.zero is not None:
        out[f"{prefix}.weight_zero_point"] = pack_int32(layer.zero, bits, dim=0)
    if layer.bias is not None:
        out[f"{prefix}.bias"] = layer.bias.detach().to(dtype)
    return out


def layer_from_tensors(tensors: dict[str, torch.Tensor], prefix: str, scheme: QuantScheme) -> QuantizedLinear:
    """A QuantizedLinear from the compressed-tensors tensors of `prefix` (removed from `tensors`)."""
    N, K = (int(v) for v in tensors.pop(f"{prefix}.weight_shape").tolist())
    codes = unpack_int32(tensors.pop(f"{prefix}.weight_packed"), scheme.bits, K)
    scale = tensors.pop(f"{prefix}.weight_scale").float()
    zp = tensors.pop(f"{prefix}.weight_zero_point", None)
    zero = None if zp is None else unpack_int32(zp, scheme.bits, N, dim=0)
    assert scale.shape == (N, scheme.groups(K)), (prefix, tuple(scale.shape), N, K)
    return QuantizedLinear(QuantizedWeight(codes, scale, zero, scheme), tensors.pop(f"{prefix}.bias", None))


def quantized_modules(model: nn.Module) -> dict[str, QuantizedLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, QuantizedLinear)}


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, new)


def tensor_bytes(model: nn.Module) -> int:
    """Bytes of a model's parameters and buffers (shared tensors once) plus its kernel copies."""
    seen, total = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    for m in quantized_modules(model).values():
        if m._kernel is not None:
            total += m._kernel.nbytes()
    return total


def is_quantized_config(raw: dict) -> bool:
    """Whether a config.json dict describes quantized weights (any method)."""
    return bool(raw.get("quantization_config"))


def check_width(model: nn.Module, names: list[str], scheme: QuantScheme) -> str | None:
    """The first of `names` (Linear modules) the scheme cannot quantize, as an error line, or None."""
    for name in names:
        error = scheme.width_error(model.get_submodule(name).in_features)
        if error is not None:
            return f"{error} of {name}"
    return None


# ---- a whole model ---------------------------------------------------------------------------------

BLOCK_LINEARS = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)


def target_names(n_layer: int, lm_head: bool) -> list[str]:
    """The Linear modules a quantize run replaces: every block's, and lm_head if asked."""
    names = [f"model.layers.{i}.{n}" for i in range(n_layer) for n in BLOCK_LINEARS]
    return names + (["lm_head"] if lm_head else [])


def untie_lm_head(model: nn.Module) -> None:
    """Give lm_head its own weight (a copy of the embeddings) so it can be quantized alone; the
    config says the embeddings are no longer tied."""
    from dataclasses import replace

    if model.config.tie_embeddings:
        model.lm_head.weight = nn.Parameter(model.model.embed_tokens.weight.detach().clone())
        model.config = replace(model.config, tie_embeddings=False)


@torch.no_grad()
def quantize_model(
    model: nn.Module,
    scheme: QuantScheme,
    *,
    lm_head: bool = False,
    method: str = "rtn",
    calibration: torch.Tensor | None = None,
    damp: float = 0.01,
    micro_batch: int = 4,
    progress=None,
) -> dict[str, float]:
    """Replace the target Linears of a Transformer by QuantizedLinears, in place.

    method "rtn" rounds each weight to nearest; "gptq" needs `calibration` token ids (n, T). With
    calibration inputs, blocks are processed in order, each seeing the outputs of the blocks already
    quantized (as GPTQ does), and the result holds each layer's relative output error on its
    calibration inputs, ||X (W - Q)^T|| / ||X W^T||, computed from H = X^T X as tr(D H D^T)."""
    assert method in ("rtn", "gptq"), method
    assert method == "rtn" or calibration is not None, "GPTQ needs calibration sequences"
    names = target_names(model.config.n_layer, lm_head)
    if lm_head:
        untie_lm_head(model)

    def quantize(name: str, hessian: torch.Tensor | None) -> float | None:
        linear = model.get_submodule(name)
        w = linear.weight
        qw = gptq(w, hessian, scheme, damp=damp) if method == "gptq" else quantize_rtn(w, scheme)
        replace_module(model, name, QuantizedLinear(qw, linear.bias))
        if hessian is None:
            return None
        d = w.detach().double() - qw.dequantize(torch.float64)
        ref = w.detach().double()
        return math.sqrt(
            float(torch.einsum("nk,kl,nl->", d, hessian, d) / torch.einsum("nk,kl,nl->", ref, hessian, ref))
        )

    errors: dict[str, float] = {}
    if calibration is None:
        for name in names:
            quantize(name, None)
            if progress is not None:
                progress.advance(1)
        return errors

    cfg = model.config
    T = calibration.shape[1]
    cos, sin = (
        table[None, :T, None, :].expand(-1, -1, cfg.n_head, -1).contiguous()
        for table in (model.rope_cos, model.rope_sin)
    )
    chunks = list(calibration.split(micro_batch))
    hidden = [model.model.embed_tokens(c) for c in chunks]  # per chunk (b, T, n_embd)

    def collect(module_names: list[str], run) -> dict[str, torch.Tensor]:
        """H = sum X^T X of each module's inputs while `run()` runs."""
        hessians: dict[str, torch.Tensor] = {}
        hooks = []
        for name in module_names:
            m = model.get_submodule(name)
            hessians[name] = torch.zeros(m.in_features, m.in_features, dtype=torch.float64)

            def hook(_m, inputs, _out, name=name):
                x = inputs[0].reshape(-1, inputs[0].shape[-1]).double()
                hessians[name] += x.T @ x

            hooks.append(m.register_forward_hook(hook))
        try:
            run()
        finally:
            for h in hooks:
                h.remove()
        return hessians

    for i, block in enumerate(model.model.layers):
        block_names = [n for n in names if n.startswith(f"model.layers.{i}.")]
        hessians = collect(
            block_names,
            lambda block=block, hidden=hidden: [block(x, cos, sin, None, True, None) for x in hidden],
        )
        for name in block_names:
            errors[name] = quantize(name, hessians.pop(name))
            if progress is not None:
                progress.advance(1)
        hidden = [block(x, cos, sin, None, True, None) for x in hidden]
    if lm_head:
        hessians = collect(["lm_head"], lambda: [model.lm_head(model.model.norm(x)) for x in hidden])
        errors["lm_head"] = quantize("lm_head", hessians["lm_head"])
        if progress is not None:
            progress.advance(1)
    return errors
