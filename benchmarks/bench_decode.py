"""Decode speed of llmctl's Engine vs transformers `generate`, same weights, CPU, fp32, greedy.

The model is the `gpt2-small` preset (124M, random init) saved as an HF folder and loaded by
transformers as LlamaForCausalLM, so both sides run identical weights and shapes. Both use a KV
cache and generate exactly --new-tokens tokens for the same prompts. Decode tokens/s excludes
prefill: (time for N new tokens - time for 1 new token) / (N - 1) steps. "llmctl" decodes through
packed weights (llmctl/model/decode.py, the engine's default on CPU); "llmctl unpacked" through
the model's forward, to show what the packing buys.

    python benchmarks/bench_decode.py                  # batch 1 and 8, 64 new tokens, 2 threads
    python benchmarks/bench_decode.py --new-tokens 128 --repeats 3
    python benchmarks/bench_decode.py --model demo/workspace/artifacts/import/v0001   # a real model folder
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from llmctl.model.checkpoint import load_model_folder, save_model_folder  # noqa: E402
from llmctl.model.config import preset  # noqa: E402
from llmctl.model.engine import Engine, SamplingParams  # noqa: E402
from llmctl.model.transformer import Transformer  # noqa: E402


def timed(fn, prompts, n: int) -> float:
    t0 = time.perf_counter()
    fn(prompts, n)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch-sizes", default="1,8")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--model", help="an HF Llama-family model folder (default: gpt2-small preset, random)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    if args.model:
        ours, cfg = load_model_folder(args.model, dtype=torch.float32)
        hf = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
        name = f"{args.model} ({ours.num_params() / 1e6:.0f}M)"
    else:
        cfg = preset("gpt2-small")
        ours = Transformer(cfg).eval()
        with tempfile.TemporaryDirectory() as d:
            save_model_folder(ours, d)
            hf = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
        name = "gpt2-small (124M, random init)"
    engine, unpacked = Engine(ours), Engine(ours, packed=False)

    def run_ours(prompts, n):
        return engine.generate(prompts, SamplingParams(max_new_tokens=n, temperature=0))

    def run_unpacked(prompts, n):
        return unpacked.generate(prompts, SamplingParams(max_new_tokens=n, temperature=0))

    def run_hf(prompts, n):
        with torch.inference_mode():
            return hf.generate(
                torch.tensor(prompts),
                attention_mask=torch.ones(len(prompts), len(prompts[0]), dtype=torch.long),
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=False,
                use_cache=True,
                eos_token_id=None,
                pad_token_id=0,
            )

    rows = []
    N = args.new_tokens
    for B in (int(b) for b in args.batch_sizes.split(",")):
        prompts = torch.randint(0, cfg.vocab_size, (B, args.prompt_len)).tolist()
        # Same weights, same greedy tokens: check before timing.
        a = [r.tokens for r in run_ours(prompts, 8)]
        b = run_hf(prompts, 8)[:, args.prompt_len :].tolist()
        same = a == b == [r.tokens for r in run_unpacked(prompts, 8)]
        impls = {"llmctl": run_ours, "llmctl unpacked": run_unpacked, "transformers": run_hf}
        for fn in impls.values():
            fn(prompts, 2)  # warm-up
        # Alternate the two implementations round by round and keep each one's best time, so load
        # from other processes on a shared machine hits both alike.
        t1 = {name: float("inf") for name in impls}
        tn = dict(t1)
        for _ in range(args.repeats):
            for name, fn in impls.items():
                t1[name] = min(t1[name], timed(fn, prompts, 1))
                tn[name] = min(tn[name], timed(fn, prompts, N))
        result = {name: (B * (N - 1) / (tn[name] - t1[name]), B * N / tn[name]) for name in impls}
        rows.append((B, result, same))

    print(f"{name} fp32, CPU, {args.threads} threads, prompt {args.prompt_len}, {N} new tokens, greedy")
    print(
        f"{'batch':>5} | {'impl':<15} | {'decode tok/s':>12} | {'end-to-end tok/s':>16} | {'speedup':>7} | same tokens"
    )
    print("-" * 83)
    for B, result, same in rows:
        base = result["transformers"][0]
        for name, (dec, e2e) in result.items():
            print(f"{B:>5} | {name:<15} | {dec:>12.1f} | {e2e:>16.1f} | {dec / base:>6.2f}x | {same}")


if __name__ == "__main__":
    main()
