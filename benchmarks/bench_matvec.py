"""Why decode steps use packed weights: weight-streaming speed of few-row products on this CPU.

For each weight shape of the 124M preset (and its lm_head), the effective GB/s of y = x @ W.T with
x (B, in), five ways: `F.linear` on the row-major (out, in) `nn.Linear` weight; the weight stored
(in, out); and llmctl's three PackedLinear layouts (llmctl/model/decode.py): column blocks (blocks,
in, out/blocks) as one bmm, oneDNN's reordered weight, and MKL's packed weight (which decode steps
take where torch is built with MKL). Each case cycles over enough copies of the weight (>= 64 MB) that caches
do not help, as in a real decode step. A second table times what a decode step does: the 124M
preset's 12 layers of o, qkv, gate_up and down products and its lm_head, in turn, per layout
(min over alternating rounds), the figure the layout choice in decode.py rests on.

    python benchmarks/bench_matvec.py                 # batch 1 and 8, 2 threads
    python benchmarks/bench_matvec.py --threads 1 --batch-sizes 1
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from llmctl.model.decode import MKL_PACKED, PackedLinear

SHAPES = [(768, 768), (2304, 768), (4096, 768), (768, 2048), (50304, 768)]  # (out, in)
LAYERS = 12  # the 124M preset: SHAPES[:4] per layer, then the lm_head


def gbps(product, x: torch.Tensor, next_weight, nbytes: int, iters: int = 40) -> float:
    """Weight bytes per second of product(x, weight), a fresh weight copy per call."""
    for _ in range(5):
        product(x, next_weight())
    t0 = time.perf_counter()
    for _ in range(iters):
        product(x, next_weight())
    return nbytes * iters / (time.perf_counter() - t0) / 1e9


def built(linears: list[PackedLinear], rows: int) -> list[PackedLinear]:
    """The layouts are built on first use: build them before timing."""
    for linear in linears:
        linear.prepare(rows)
    return linears


def cycling(items):
    """A function returning the next item each call (round robin)."""
    state = {"i": 0}

    def nxt():
        state["i"] = (state["i"] + 1) % len(items)
        return items[state["i"]]

    return nxt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch-sizes", default="1,8")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5, help="alternating rounds of the whole-step table")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"effective weight streaming, GB/s, fp32, {args.threads} threads")
    print(
        f"{'batch':>5} | {'weight (out x in)':>17} | {'F.linear':>8} | {'(in, out)':>9} | {'blocks':>6} | "
        f"{'oneDNN':>6} | {'MKL packed':>10}"
    )
    print("-" * 82)
    for B in (int(b) for b in args.batch_sizes.split(",")):
        for out, inp in SHAPES:
            copies = max(1, int(64e6 // (out * inp * 4)))
            weights = [torch.randn(out, inp) for _ in range(copies)]
            x = torch.randn(B, inp)
            row_major = cycling(weights)
            col_major = cycling([w.t().contiguous() for w in weights])
            packed = cycling(
                built(
                    [PackedLinear([w], None, args.threads, onednn_rows=1 << 30, mkl=False) for w in weights],
                    B,
                )
            )
            onednn = cycling(
                built([PackedLinear([w], None, args.threads, onednn_rows=1, mkl=False) for w in weights], B)
            )
            mkl = cycling(built([PackedLinear([w], None, args.threads) for w in weights], B))
            nbytes = out * inp * 4
            speeds = [
                gbps(F.linear, x, row_major, nbytes),
                gbps(torch.matmul, x, col_major, nbytes),
                gbps(lambda x, linear: linear(x), x, packed, nbytes),
                gbps(lambda x, linear: linear(x), x, onednn, nbytes),
                gbps(lambda x, linear: linear(x), x, mkl, nbytes) if MKL_PACKED else float("nan"),
            ]
            print(
                f"{B:>5} | {f'{out} x {inp}':>17} | {speeds[0]:>8.1f} | {speeds[1]:>9.1f} | {speeds[2]:>6.1f} | "
                f"{speeds[3]:>6.1f} | {speeds[4]:>10.1f}"
            )

    step_table(args)


def step_table(args) -> None:
    """ms per decode step's products, each layout over the same fresh weights, alternating rounds."""
    weights = [torch.randn(out, inp) for _ in range(LAYERS) for out, inp in SHAPES[:4]]
    weights.append(torch.randn(*SHAPES[4]))
    layouts = {
        "blocks": dict(onednn_rows=1 << 30, mkl=False),
        "oneDNN": dict(onednn_rows=1, mkl=False),
        **({"MKL packed": {}} if MKL_PACKED else {}),
    }
    print(
        f"\na decode step's products (124M preset), ms, fp32, {args.threads} threads, min of {args.rounds} rounds"
    )
    print(f"{'batch':>5} | " + " | ".join(f"{name:>10}" for name in layouts))
    for B in (int(b) for b in args.batch_sizes.split(",")):
        inputs = {inp: torch.randn(B, inp) for _, inp in SHAPES}
        linears = {
            name: built([PackedLinear([w], None, args.threads, **kw) for w in weights], B)
            for name, kw in layouts.items()
        }
        best = dict.fromkeys(layouts, float("inf"))
        for _ in range(args.rounds):
            for name, products in linears.items():
                t0 = time.perf_counter()
                for w, linear in zip(weights, products, strict=True):
                    linear(inputs[w.shape[1]])
                best[name] = min(best[name], (time.perf_counter() - t0) * 1e3)
        print(f"{B:>5} | " + " | ".join(f"{best[name]:>10.1f}" for name in layouts))
        del linears


if __name__ == "__main__":
    main()
