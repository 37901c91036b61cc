"""Dedup throughput: llmctl's engines vs raw datasketch and datatrove's MinHash pipeline, in one run.

    python benchmarks/bench_dedup.py                 # 100k synthetic ~2 KB documents
    python benchmarks/bench_dedup.py --docs 20000 --baseline-docs 5000

Every method starts from the same gzip JSONL corpus shards and is timed end to end (read -> shingles
-> signatures -> LSH -> clusters; the llmctl engines also write the kept documents and removed ids).
All use word 5-grams and 14 bands x 8 rows. The raw datasketch baselines are single-process (that is
how its API is used) and run on the first --baseline-docs documents, as they are much slower.
datatrove's default pipeline tokenises words with spaCy; when spaCy is not installed that row says so.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from llmctl.config.dedup import DedupConfig
from llmctl.data.corpus import CorpusWriter, iter_corpus
from llmctl.data.dedup import run_dedup
from llmctl.data.minhash import simplify_words
from llmctl.data.synthetic import iter_documents


def make_corpus(folder: Path, n_docs: int, seed: int) -> None:
    from datatrove.data import Document

    with CorpusWriter(folder / "documents") as w:
        for d in iter_documents(n_docs, seed):
            w.write(Document(text=d["text"], id=d["id"], metadata=d["metadata"]))


def llmctl_run(corpus: Path, scratch: Path, cfg: DedupConfig) -> tuple[int, int]:
    out = Path(tempfile.mkdtemp(dir=scratch))
    m = run_dedup(iter_corpus(corpus), out, cfg, scratch_dir=scratch / "s")
    return m["documents_in"], m["documents_out"]


def datasketch_run(corpus: Path, limit: int, hashfunc: Callable | None) -> tuple[int, int]:
    from datasketch import MinHash, MinHashLSH

    lsh = MinHashLSH(num_perm=112, params=(14, 8))
    kwargs = {"hashfunc": hashfunc} if hashfunc else {}
    removed = n = 0
    batch: list[tuple[str, list[bytes]]] = []

    def flush() -> None:
        nonlocal removed
        sets = [s for _, s in batch]
        for (doc_id, _), mh in zip(batch, MinHash.bulk(sets, num_perm=112, seed=1, **kwargs), strict=True):
            if lsh.query(mh):
                removed += 1  # a candidate among earlier documents: a near duplicate (no union-find)
            else:
                lsh.insert(doc_id, mh)
        batch.clear()

    for doc in iter_corpus(corpus):
        if n == limit:
            break
        n += 1
        words = simplify_words(doc.text)
        shingles = [b" ".join(words[i : i + 5]) for i in range(len(words) - 4)]
        if shingles:
            batch.append((doc.id, shingles))
        if len(batch) == 1000:
            flush()
    flush()
    return n, n - removed


def datatrove_default_available() -> str | None:
    try:
        import spacy  # noqa: F401
    except ImportError:
        return "spaCy is not installed (no internet here); datatrove's default English tokenizer needs it"
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--docs", type=int, default=100_000)
    ap.add_argument("--baseline-docs", type=int, default=10_000, help="documents for the raw datasketch rows")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--skip-datatrove", action="store_true")
    args = ap.parse_args()

    import xxhash

    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        corpus = tmp_path / "corpus"
        t0 = time.perf_counter()
        make_corpus(corpus, args.docs, args.seed)
        size = sum(p.stat().st_size for p in (corpus / "documents").glob("*.gz"))
        print(
            f"corpus: {args.docs:,} synthetic docs, {size / 1e6:.1f} MB gzip, made in {time.perf_counter() - t0:.1f}s"
        )

        rows: list[tuple[str, int, float, int, int, str]] = []

        def timed(name: str, cores: int, fn: Callable[[], tuple[int, int]], note: str = "") -> None:
            t = time.perf_counter()
            n, kept = fn()
            rows.append((name, n, time.perf_counter() - t, cores, kept, note))
            print(f"  done: {name}", flush=True)

        w = args.workers
        timed(
            "llmctl minhash engine",
            w,
            lambda: llmctl_run(corpus, tmp_path, DedupConfig(workers=w)),
            f"{w} workers",
        )
        timed(
            "llmctl minhash engine",
            1,
            lambda: llmctl_run(corpus, tmp_path, DedupConfig(workers=1)),
            "in-process",
        )
        if not args.skip_datatrove:
            timed(
                "llmctl datatrove engine",
                w,
                lambda: llmctl_run(corpus, tmp_path, DedupConfig(engine="datatrove", workers=w)),
                f"LocalPipelineExecutor, {w} workers, regex tokenizer",
            )
        b = min(args.baseline_docs, args.docs)
        timed("datasketch MinHash.bulk SHA-1 + LSH", 1, lambda: datasketch_run(corpus, b, None), "no output")
        timed(
            "datasketch MinHash.bulk xxh32 + LSH",
            1,
            lambda: datasketch_run(corpus, b, xxhash.xxh32_intdigest),
            "no output",
        )
        why = datatrove_default_available()
        if why is None and not args.skip_datatrove:
            import llmctl.data.dedup as dedup_mod

            # the same pipeline with datatrove's own English word tokenizer (spaCy) instead of ours
            regex_tokenizer = dedup_mod.RegexWordTokenizer
            dedup_mod.RegexWordTokenizer = lambda: "en"  # type: ignore[assignment]
            try:
                timed(
                    "datatrove MinHash, default tokenizer",
                    w,
                    lambda: llmctl_run(corpus, tmp_path, DedupConfig(engine="datatrove", workers=w)),
                    f"spaCy, {w} workers",
                )
            finally:
                dedup_mod.RegexWordTokenizer = regex_tokenizer
        else:
            rows.append(
                (
                    "datatrove MinHash, default tokenizer",
                    0,
                    0.0,
                    w,
                    0,
                    f"skipped: {why or '--skip-datatrove'}",
                )
            )

    print()
    header = f"{'method':<38} {'docs':>8} {'seconds':>8} {'docs/s':>9} {'cores':>5} {'docs/s/core':>11} {'kept':>8}  notes"
    print(header)
    print("-" * len(header))
    for name, n, secs, cores, kept, note in rows:
        if n == 0:
            print(f"{name:<38} {'-':>8} {'-':>8} {'-':>9} {cores:>5} {'-':>11} {'-':>8}  {note}")
            continue
        rate = n / secs
        print(
            f"{name:<38} {n:>8,} {secs:>8.1f} {rate:>9,.0f} {cores:>5} {rate / cores:>11,.0f} {kept:>8,}  {note}"
        )
    print("\ntarget: llmctl minhash engine >= 5,000 docs/s per core end to end")


if __name__ == "__main__":
    main()
