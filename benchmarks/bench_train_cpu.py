"""Training-step throughput on CPU: llmctl's model + optimizer setup vs a nanoGPT-style reference.

    python benchmarks/bench_train_cpu.py                 # both configs (small, medium)
    python benchmarks/bench_train_cpu.py --config small --rounds 5
    python benchmarks/bench_train_cpu.py --compile        # both models torch.compile'd
    python benchmarks/bench_train_cpu.py --fused off      # llmctl with optimizer.fused=off (the loop)

Claim measured: a full fp32 training step (forward, backward, AdamW) of llmctl's Llama-style
model runs at >= 1.0x the tokens/s of nanoGPT's GPT-2-style `model.py` with the same n_layer,
n_head, n_embd, sequence length, batch and vocabulary, on 2 threads.

"Same shapes": ours uses SwiGLU with hidden 8/3 * n_embd (swiglu_hidden: rounded up to 32), RMSNorm
and rotary positions; the reference nanoGPT's module tree (its Dropout(0.0) calls included) with a 4x
GELU MLP, LayerNorm and learned positions, no biases (`bias = False`, nanoGPT train.py's default). The
MLP FLOPs are the same to rounding; parameter counts of both are printed. Both use tied embeddings;
nanoGPT attends through causal SDPA, llmctl through what its model runs for CPU training (batched
products up to 128 positions on more than one thread, the same flash kernel beyond). Each side's
AdamW is what its trainer makes on CPU: nanoGPT's configure_optimizers gives the per-parameter loop
(fused only on CUDA), `llmctl pretrain` the fused kernel (optimizer.fused auto). The two models are
timed in alternating rounds in one process, and each round's tokens/s is reported with the median, so machine noise hits both alike; the paired
ratio (median of each round's own ratio) is the steadier figure on a noisy machine.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from llmctl.model.config import ModelConfig, swiglu_hidden
from llmctl.model.transformer import Transformer
from llmctl.train.optim import make_adamw, param_groups
from llmctl.train.setup import use_fused_adamw

CONFIGS = {
    # name: (n_layer, n_head, n_embd, T, B, vocab)
    "small": (4, 4, 128, 64, 12, 65),
    "medium": (6, 6, 384, 256, 16, 8192),
}


# ---- the reference: nanoGPT model.py, condensed (dropout 0, tied head, bias False as train.py) -
# The module tree and the calls per step are nanoGPT's: a LayerNorm module over F.layer_norm
# (weight only), fused c_attn, nn.GELU MLP module, the Dropout(0.0) modules it calls in training,
# learned positions, GPT-2 init with the scaled c_proj init.


class RefLayerNorm(nn.Module):
    def __init__(self, n_embd: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n_embd))

    def forward(self, x):
        return F.layer_norm(x, self.weight.shape, self.weight, None, 1e-5)


class RefAttention(nn.Module):
    def __init__(self, n_embd: int, n_head: int):
        super().__init__()
        self.c_attn = nn.Linear(n_embd, 3 * n_embd, bias=False)
        self.c_proj = nn.Linear(n_embd, n_embd, bias=False)
        self.resid_dropout = nn.Dropout(0.0)
        self.n_head = n_head

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=0.0, is_causal=True)
        return self.resid_dropout(self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C)))


class RefMLP(nn.Module):
    def __init__(self, n_embd: int):
        super().__init__()
        self.c_fc = nn.Linear(n_embd, 4 * n_embd, bias=False)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * n_embd, n_embd, bias=False)
        self.dropout = nn.Dropout(0.0)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class RefBlock(nn.Module):
    def __init__(self, n_embd: int, n_head: int):
        super().__init__()
        self.ln_1 = RefLayerNorm(n_embd)
        self.attn = RefAttention(n_embd, n_head)
        self.ln_2 = RefLayerNorm(n_embd)
        self.mlp = RefMLP(n_embd)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class RefGPT(nn.Module):
    def __init__(self, n_layer: int, n_head: int, n_embd: int, block_size: int, vocab: int):
        super().__init__()
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(vocab, n_embd),
                wpe=nn.Embedding(block_size, n_embd),
                drop=nn.Dropout(0.0),
                h=nn.ModuleList(RefBlock(n_embd, n_head) for _ in range(n_layer)),
                ln_f=RefLayerNorm(n_embd),
            )
        )
        self.lm_head = nn.Linear(n_embd, vocab, bias=False)
        self.transformer.wte.weight = self.lm_head.weight
        for name, p in self.named_parameters():
            if p.dim() >= 2:
                nn.init.normal_(
                    p, 0.0, 0.02 / math.sqrt(2 * n_layer) if name.endswith("c_proj.weight") else 0.02
                )

    def forward(self, idx, targets):
        """The loss (nanoGPT returns (logits, loss); train.py backpropagates the loss)."""
        tr = self.transformer
        pos = torch.arange(0, idx.shape[1], dtype=torch.long, device=idx.device)
        x = tr.drop(tr.wte(idx) + tr.wpe(pos))
        for block in tr.h:
            x = block(x)
        logits = self.lm_head(tr.ln_f(x))
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)


def ref_optimizer(model: nn.Module) -> torch.optim.AdamW:
    """nanoGPT configure_optimizers: decay 2-D params, not biases/norms; fused only on CUDA, so on
    CPU torch's default implementation (a per-parameter loop there)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=6e-4, betas=(0.9, 0.95))


# ---- timing --------------------------------------------------------------------------------------


def step_fn(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor):
    def step() -> float:
        loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    return step


def time_steps(step, n: int) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        step()
    return time.perf_counter() - t0


def bench(name: str, rounds: int, steps: int, compile_models: bool = False, fused: str = "auto") -> dict:
    n_layer, n_head, n_embd, T, B, vocab = CONFIGS[name]
    torch.manual_seed(0)
    x = torch.randint(0, vocab, (B, T))
    y = torch.randint(0, vocab, (B, T))

    ref = RefGPT(n_layer, n_head, n_embd, T, vocab)
    ref_step = step_fn(torch.compile(ref) if compile_models else ref, ref_optimizer(ref), x, y)

    cfg = ModelConfig(
        vocab_size=vocab,
        n_layer=n_layer,
        n_head=n_head,
        n_kv_head=n_head,
        n_embd=n_embd,
        intermediate_size=swiglu_hidden(n_embd),
        max_seq_len=T,
        tie_embeddings=True,
    )
    ours = Transformer(cfg)
    our_opt = make_adamw(  # the optimizer `llmctl pretrain` makes on CPU with optimizer.fused=<fused>
        param_groups(ours, weight_decay=0.1),
        lr=6e-4,
        betas=(0.9, 0.95),
        eps=1e-8,
        fused=use_fused_adamw(fused, "cpu"),
    )
    our_step = step_fn(torch.compile(ours) if compile_models else ours, our_opt, x, y)

    for _ in range(3):  # warm up allocators and kernels
        ref_step()
        our_step()
    ref_tps, our_tps = [], []
    for _ in range(rounds):
        ref_tps.append(steps * B * T / time_steps(ref_step, steps))
        our_tps.append(steps * B * T / time_steps(our_step, steps))
    r, o = statistics.median(ref_tps), statistics.median(our_tps)
    return {
        "config": f"{name}: {n_layer}L/{n_head}H/{n_embd}d T={T} B={B} vocab={vocab}",
        "ref_params": sum(p.numel() for p in ref.parameters()),
        "our_params": ours.num_params(),
        "ref_tok_s": r,
        "our_tok_s": o,
        "ratio": o / r,
        # Each round's own ratio: both models met the same machine state, so this is steadier.
        "paired_ratio": statistics.median(our / ref for ref, our in zip(ref_tps, our_tps, strict=True)),
        "rounds": list(zip((round(v) for v in ref_tps), (round(v) for v in our_tps), strict=True)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", choices=[*CONFIGS, "all"], default="all")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument(
        "--compile", action="store_true", help="torch.compile both models (as pretrain.compile=true does)"
    )
    parser.add_argument(
        "--fused",
        choices=["auto", "on", "off"],
        default="auto",
        help="llmctl's optimizer.fused (auto, what pretrain uses: the fused AdamW kernel on CPU)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)  # one process: both models run on the same threads
    mode = "torch.compile (both)" if args.compile else "eager"
    adamw = "fused" if use_fused_adamw(args.fused, "cpu") else "unfused"
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), fp32, {mode}, "
        f"fwd+bwd+clip+AdamW per step (llmctl AdamW {adamw}, nanoGPT's CPU default unfused)"
    )
    for name in CONFIGS if args.config == "all" else [args.config]:
        steps = 20 if name == "small" else 3
        res = bench(name, args.rounds, steps, compile_models=args.compile, fused=args.fused)
        print(res["config"])
        print(f"  params   nanoGPT {res['ref_params']:>10,}   llmctl {res['our_params']:>10,}")
        print(f"  tok/s    nanoGPT {res['ref_tok_s']:>10,.0f}   llmctl {res['our_tok_s']:>10,.0f}")
        per_round = [o / r for r, o in res["rounds"]]
        print(
            f"  ratio    {res['ratio']:.2f}x (median of {args.rounds} alternating rounds; per round "
            f"{min(per_round):.2f}-{max(per_round):.2f}x: {res['rounds']})"
        )
        print(f"  paired   {res['paired_ratio']:.3f}x (median of the rounds' own ratios)")


if __name__ == "__main__":
    main()
