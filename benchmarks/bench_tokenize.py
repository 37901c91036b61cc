"""Benchmark the tokenizer library against the libraries it builds on, in one run.

    python benchmarks/bench_tokenize.py                  # 50 MB corpus, 20 MB for BPE training
    python benchmarks/bench_tokenize.py --mb 10 --train-mb 5 --workers 2

(a) BPE training time at vocab 8192 on the same text: ours (`train_tokenizer`: GPT-4 split regex,
    specials, ignore_merges) vs `tokenizers` defaults (`ByteLevelBPETokenizer`, GPT-2 regex).
    rustbpe and sentencepiece are not installed here, so they are not compared.
(b) Encoding throughput (MB of UTF-8 text per second) on the whole corpus: our end-to-end
    `encode_corpus` (N worker processes, split + shard writing included) vs tiktoken in one process
    (`encode_ordinary_batch(num_threads=1)`) vs `tokenizers.Tokenizer.encode_batch` (Rayon threads,
    all cores). The claim: ours end to end >= tiktoken single-process.
The corpus is `llmctl.data.synthetic` (English-like prose), generated in memory.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=50, help="corpus size in MB of text")
    parser.add_argument("--train-mb", type=float, default=20, help="text used for BPE training, MB")
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--repeat", type=int, default=2, help="encode timings: best of this many runs")
    args = parser.parse_args()

    import tokenizers

    from llmctl.data.encode import encode_corpus
    from llmctl.data.synthetic import iter_documents
    from llmctl.data.tokenizer import train_tokenizer

    t0 = time.perf_counter()
    docs: list[tuple[str, str]] = []
    total = 0
    for d in iter_documents(10**9, seed=0):
        docs.append((d["id"], d["text"]))
        total += len(d["text"].encode("utf-8"))
        if total >= args.mb * 1e6:
            break
    texts = [t for _, t in docs]
    mb = total / 1e6
    print(f"corpus: {len(docs):,} documents, {mb:.1f} MB (generated in {time.perf_counter() - t0:.1f}s)")
    print(f"machine: {os.cpu_count()} cores; workers={args.workers}; tokenizers {tokenizers.__version__}")

    train_texts, n = [], 0
    for t in texts:
        train_texts.append(t)
        n += len(t.encode("utf-8"))
        if n >= args.train_mb * 1e6:
            break
    train_mb = n / 1e6

    rows: list[tuple[str, str, str]] = []
    t = time.perf_counter()
    tok = train_tokenizer(train_texts, vocab_size=args.vocab, max_doc_chars=None)
    ours_train = time.perf_counter() - t
    rows.append(("train", f"ours (train_tokenizer, gpt4 regex) {train_mb:.0f} MB", f"{ours_train:.1f} s"))

    t = time.perf_counter()
    ref = tokenizers.ByteLevelBPETokenizer()
    ref.train_from_iterator(train_texts, vocab_size=args.vocab, show_progress=False)
    ref_train = time.perf_counter() - t
    rows.append(
        ("train", f"tokenizers ByteLevelBPETokenizer defaults {train_mb:.0f} MB", f"{ref_train:.1f} s")
    )
    rows.append(("train", "rustbpe / sentencepiece", "not installed"))

    enc = tok.to_tiktoken()
    assert enc is not None
    # Best of --repeat, interleaved, because the machine may be shared and timings are noisy.
    tk_s = hf_s = ours_s = one_s = float("inf")
    out = Path(tempfile.mkdtemp(prefix="bench_tokenize_"))
    try:
        for r in range(args.repeat):
            t = time.perf_counter()
            tk_ids = enc.encode_ordinary_batch(texts, num_threads=1)
            tk_s = min(tk_s, time.perf_counter() - t)
            n_tokens = sum(len(x) for x in tk_ids)
            del tk_ids

            t = time.perf_counter()
            hf_encs = tok.hf.encode_batch_fast(texts, add_special_tokens=False)
            hf_s = min(hf_s, time.perf_counter() - t)
            assert sum(len(e.ids) for e in hf_encs) == n_tokens
            del hf_encs

            t = time.perf_counter()
            result = encode_corpus(
                docs, tok, out / f"ours{r}", workers=args.workers, val_fraction=0.01, shard_tokens=10_000_000
            )
            ours_s = min(ours_s, time.perf_counter() - t)
            t = time.perf_counter()
            one = encode_corpus(
                docs, tok, out / f"one{r}", workers=1, val_fraction=0.01, shard_tokens=10_000_000
            )
            one_s = min(one_s, time.perf_counter() - t)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    assert result.train.tokens + result.val.tokens - result.train.documents - result.val.documents == n_tokens

    rows.append(
        (
            "encode",
            f"ours encode_corpus, {args.workers} workers, end to end ({result.encoder})",
            f"{mb / ours_s:.1f} MB/s",
        )
    )
    rows.append(("encode", f"ours encode_corpus, in-process ({one.encoder})", f"{mb / one_s:.1f} MB/s"))
    rows.append(("encode", "tiktoken encode_ordinary_batch num_threads=1", f"{mb / tk_s:.1f} MB/s"))
    rows.append(
        ("encode", f"tokenizers encode_batch_fast ({os.cpu_count()} Rayon threads)", f"{mb / hf_s:.1f} MB/s")
    )

    width = max(len(r[1]) for r in rows)
    print(f"\n{'task':<7} {'implementation':<{width}}  result")
    for task, impl, value in rows:
        print(f"{task:<7} {impl:<{width}}  {value}")
    print(
        f"\n{n_tokens:,} text tokens, {result.train.bytes_per_token:.2f} bytes/token (train), "
        f"vocab usage {result.vocab_usage:.1%}; ours/tiktoken-1-process = {tk_s / ours_s:.2f}x"
    )


if __name__ == "__main__":
    main()
