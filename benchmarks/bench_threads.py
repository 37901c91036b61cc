"""`llmctl generate` decode speed by thread count, alone and beside a busy process (a CPU-bound loop).

Each cell is a fresh process (OpenMP reads its settings at start) that loads the model once, warms up,
then decodes --new-tokens tokens greedily --repeats times through the engine `generate` uses; the
median decode tokens/s (after the first token) is reported. Settings compared:
- "torch default": OMP_NUM_THREADS=<every core> and --threads <every core>, what torch does on its
  own (one thread per core, whatever else runs);
- "1 thread", and each other count up to the cores;
- "llmctl choice": no --threads, no OMP_NUM_THREADS: what llmctl.threads picks for this model;
- with OMP_WAIT_POLICY=passive, where OpenMP threads sleep at barriers instead of spinning.

    python benchmarks/bench_threads.py --model demo/workspace/artifacts/import/v0001
    python benchmarks/bench_threads.py --model FOLDER --busy 1 --repeats 3 --new-tokens 48
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def tiny_model_folder(folder: Path, preset_name: str) -> Path:
    """A random-weights model of `preset_name` with a real BPE tokenizer, as generate needs."""
    import torch

    from llmctl.data.synthetic import iter_documents
    from llmctl.data.tokenizer import train_tokenizer
    from llmctl.model.checkpoint import save_model_folder
    from llmctl.model.config import preset
    from llmctl.model.transformer import Transformer

    tok = train_tokenizer((d["text"] for d in iter_documents(200, seed=1)), vocab_size=512)
    torch.manual_seed(0)
    model = Transformer(preset(preset_name, vocab_size=tok.vocab_size))
    model.init_weights()
    save_model_folder(model, folder, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id)
    tok.save(folder, model_max_length=model.config.max_seq_len)
    return folder


def child(model: str, new_tokens: int, threads: int | None, repeats: int) -> None:
    """In a fresh process (its OpenMP settings come from the environment): load once, decode `repeats` times."""
    from llmctl.inference import load_model
    from llmctl.model.config import num_params
    from llmctl.model.engine import SamplingParams
    from llmctl.threads import apply_threads, choose_threads

    loaded = load_model(Path(model))
    used = apply_threads(choose_threads(threads, work=num_params(loaded.config)))
    params = SamplingParams(max_new_tokens=new_tokens, temperature=0.0, stop_token_ids=())
    prompt = loaded.encode("The capital of")
    speeds = []
    stamps: list[float] = []
    for _ in range(repeats + 1):  # the first run warms up (allocations, packing)
        stamps.clear()
        loaded.engine.generate([prompt], params, on_token=lambda e: stamps.append(time.perf_counter()))
        speeds.append((len(stamps) - 1) / (stamps[-1] - stamps[0]))
    print(json.dumps({"threads": used, "tok_s": statistics.median(speeds[1:])}))


def decode_speed(model: str, new_tokens: int, threads: int | None, env_extra: dict[str, str], repeats: int):
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY")}
    env.update(env_extra)
    cmd = [sys.executable, __file__, "--child", "--model", model, "--new-tokens", str(new_tokens)]
    cmd += ["--repeats", str(repeats), *(["--threads", str(threads)] if threads else [])]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
    doc = json.loads(out.stdout.splitlines()[-1])
    return doc["tok_s"], doc["threads"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="a model folder (default: random `tiny` and `test-1m` presets)")
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument(
        "--busy", type=int, default=1, help="busy processes to run beside (0 = measure idle only)"
    )
    ap.add_argument("--threads", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.model, args.new_tokens, args.threads, args.repeats)
        return
    from llmctl.threads import available_cores

    cores = available_cores()
    with tempfile.TemporaryDirectory() as tmp:
        if args.model and (Path(args.model) / "manifest.json").is_file():  # an artifact: copy its files
            plain = Path(tmp) / "model"
            shutil.copytree(args.model, plain, ignore=shutil.ignore_patterns("manifest.json"))
            args.model = str(plain)
        models = (
            [args.model]
            if args.model
            else [str(tiny_model_folder(Path(tmp) / name, name)) for name in ("test-1m", "tiny")]
        )
        settings = [("torch default", cores, {"OMP_NUM_THREADS": str(cores)})]
        settings += [(f"{n} thread(s)", n, {}) for n in range(1, cores + 1)]
        settings += [("llmctl choice", None, {})]
        settings += [(f"{cores} threads, passive wait", cores, {"OMP_WAIT_POLICY": "passive"})]
        print(f"machine: {cores} cores available; {args.new_tokens} new tokens, median of {args.repeats}")
        for model in models:
            print(f"\nmodel: {model}")
            print(f"{'setting':32} {'threads':>7} {'idle tok/s':>11} {'busy tok/s':>11}")
            for label, threads, extra in settings:
                row = []
                used = None
                for busy in [0, args.busy] if args.busy else [0]:
                    loops = [
                        subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(busy)
                    ]
                    try:
                        speed, used = decode_speed(model, args.new_tokens, threads, extra, args.repeats)
                    finally:
                        for p in loops:
                            p.kill()
                            p.wait()
                    row.append(speed)
                cells = " ".join(f"{v:>11.1f}" for v in row)
                print(f"{label:32} {used:>7} {cells}", flush=True)


if __name__ == "__main__":
    main()
