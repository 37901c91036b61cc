"""Why decode steps use packed weights: weight-streaming speed of few-row products on this CPU.

For each weight shape of the 124M preset (and its lm_head), the effective GB/s of y = x @ W.T with
x (B, in), four ways: `F.linear` on the row-major (out, in) `nn.Linear` weight; the weight stored
(in, out); llmctl's PackedLinear column blocks (blocks, in, out/blocks) as one bmm; and PackedLinear's
other layout, oneDNN's reordered weight (which decode steps of 4 rows or more take, see
llmctl/model/decode.py). Each case cycles over enough copies of the weight (>= 64 MB) that caches
do not help, as in a real decode step.

    python benchmarks/bench_matvec.py                 # batch 1 and 8, 2 threads
    python benchmarks/bench_matvec.py --threads 1 --batch-sizes 1
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from llmctl.model.decode import PackedLinear

SHAPES = [(768, 768), (2304, 768), (4096, 768), (768, 2048), (50304, 768)]  # (out, in)


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
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"effective weight streaming, GB/s, fp32, {args.threads} threads")
    print(
        f"{'batch':>5} | {'weight (out x in)':>17} | {'F.linear':>8} | {'(in, out)':>9} | {'packed':>6} | {'oneDNN':>6}"
    )
    print("-" * 69)
    for B in (int(b) for b in args.batch_sizes.split(",")):
        for out, inp in SHAPES:
            copies = max(1, int(64e6 // (out * inp * 4)))
            weights = [torch.randn(out, inp) for _ in range(copies)]
            x = torch.randn(B, inp)
            row_major = cycling(weights)
            col_major = cycling([w.t().contiguous() for w in weights])
            packed = cycling(
                built([PackedLinear([w], None, args.threads, onednn_rows=1 << 30) for w in weights], B)
            )
            onednn = cycling(
                built([PackedLinear([w], None, args.threads, onednn_rows=1) for w in weights], B)
            )
            nbytes = out * inp * 4
            speeds = [
                gbps(F.linear, x, row_major, nbytes),
                gbps(torch.matmul, x, col_major, nbytes),
                gbps(lambda x, linear: linear(x), x, packed, nbytes),
                gbps(lambda x, linear: linear(x), x, onednn, nbytes),
            ]
            print(
                f"{B:>5} | {f'{out} x {inp}':>17} | {speeds[0]:>8.1f} | {speeds[1]:>9.1f} | {speeds[2]:>6.1f} | "
                f"{speeds[3]:>6.1f}"
            )


if __name__ == "__main__":
    main()
