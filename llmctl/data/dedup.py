"""Exact and MinHash near-duplicate removal over a stream of datatrove `Document`s.

    metrics = run_dedup(documents, out_dir, DedupConfig(), reporter, scratch_dir)

writes, whatever the engine:

* `out_dir/documents/00000.jsonl.gz ...`: the kept documents in input order, in the corpus artifact
  format (`llmctl.data.corpus`), `cfg.shard_size` per shard;
* `out_dir/removed.jsonl.gz`: one `{"id", "duplicate_of", "kind": "exact"|"near"}` per removed
  document, in input order; `duplicate_of` is the id of the document kept for its cluster;

and returns a metrics dict (docs/bytes in and out, exact and near duplicates, clusters and their
size distribution, docs/s, seconds).

Exact duplicates: same text after Unicode NFC and whitespace normalisation (runs of whitespace become
one space, ends stripped), compared by 128-bit xxh3; the first occurrence is kept. Case and
punctuation count, so a copy with a changed comma is left to the near-duplicate pass.

Near duplicates: MinHash over word n-grams (`llmctl.data.minhash`), LSH with `bands` x `rows`
(candidate probability 1 - (1 - s**rows)**bands for Jaccard s; midpoint (1/bands)**(1/rows) ~ 0.72
for 14 x 8), every candidate pair joined by union-find (no Jaccard verification, as in FineWeb).
Documents with fewer than `n_grams` words have no shingles and are never near duplicates.

Engines:

* `minhash` (default): signatures in worker processes over chunks of documents, which also
  serialise each chunk to a scratch file; candidates and clusters in the parent, in input order;
  kept documents are then compressed into shards by the workers. The kept document of a cluster is
  its first in input order. It uses no MinHash library: datasketch's `MinHash.bulk` is ~20x
  slower, see benchmarks/bench_dedup.py.
* `datasketch`: the datasketch library's own `MinHash` (SHA-1 per shingle, `update_batch`) and
  `MinHashLSH` index with the same bands x rows, in one process: the library's reference
  implementation of the same scheme, for small corpora and to check `minhash` against. The same
  exact pass, clusters, kept documents and outputs as `minhash`.
* `datatrove`: datatrove's MinhashDedupSignature -> Buckets -> Cluster -> Filter steps, run by its
  Local, Slurm or Ray executor. Exact dedup happens while the input is spilled into task shards, with
  the same semantics as above. datatrove keeps the root of its union-by-size tree, which is not
  always the first document of a cluster; `duplicate_of` still names the document it kept.
"""

from __future__ import annotations

import gzip
import itertools
import os
import re
import shutil
import time
import unicodedata
from collections import Counter, deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import orjson
import xxhash
from datatrove.data import Document
from datatrove.executor import LocalPipelineExecutor
from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.dedup.minhash import (
    MinhashConfig,
    MinhashDedupBuckets,
    MinhashDedupCluster,
    MinhashDedupFilter,
    MinhashDedupSignature,
)
from datatrove.pipeline.readers import JsonlReader
from datatrove.pipeline.writers import JsonlWriter
from datatrove.pipeline.writers.disk_base import DiskWriter
from datatrove.utils.hashing import HashConfig
from datatrove.utils.word_tokenizers import WordTokenizer

from llmctl.config.dedup import DedupConfig
from llmctl.data.corpus import DOCUMENTS_DIR, SHARD_SUFFIX, record_to_json, shard_name
from llmctl.data.minhash import MinHasher, simplify_words
from llmctl.data.workers import worker_pool
from llmctl.errors import InputError
from llmctl.reporting import Reporter

REMOVED_FILE = "removed.jsonl.gz"
CHUNK_DOCS = 500  # documents per worker task: big enough to amortise IPC, small enough to balance
_GZIP_LEVEL = 3  # as llmctl.data.corpus: ~4x faster than level 6 for ~18% more disk


def exact_key(text: str) -> bytes:
    """128-bit hash of `text` after NFC and whitespace normalisation: equal keys = exact duplicates."""
    if not text.isascii():
        text = unicodedata.normalize("NFC", text)
    return xxhash.xxh3_128_digest(" ".join(text.split()))


def _write_gzip(path: Path, chunks: Iterable[bytes]) -> int:
    """Write to a temp name and rename, so a shard only exists complete; returns compressed bytes."""
    tmp = path.with_name(f".{path.name}.tmp")
    with (
        open(tmp, "wb") as raw,
        gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=_GZIP_LEVEL, mtime=0) as f,
    ):
        for c in chunks:
            f.write(c)
    os.replace(tmp, path)
    return path.stat().st_size


def _prepare_out_dir(out_dir: Path) -> Path:
    docs_dir = Path(out_dir) / DOCUMENTS_DIR
    if docs_dir.is_dir() and any(docs_dir.glob(f"*{SHARD_SUFFIX}")):
        raise InputError(
            f"{docs_dir} already holds shards; dedup writes into an empty folder",
            hint="use a fresh output folder",
        )
    docs_dir.mkdir(parents=True, exist_ok=True)
    return docs_dir


def _chunks(documents: Iterable[Document], size: int) -> Iterator[list[tuple[str, str, dict]]]:
    chunk: list[tuple[str, str, dict]] = []
    for doc in documents:
        chunk.append((doc.text, doc.id, doc.metadata))
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


# ---------------------------------------------------------------------------------------------------
# minhash engine: worker side. Module-level functions and state so any start method can pickle them.


@dataclass(frozen=True)
class _ChunkResult:
    ids: list[str]
    text_bytes: np.ndarray  # (n,) UTF-8 bytes of each text
    line_bytes: np.ndarray  # (n,) bytes of each serialised line in the scratch file
    exact: list[bytes] | None  # (n,) exact keys
    band_keys: np.ndarray | None  # (n, bands)
    has_shingles: np.ndarray | None  # (n,) bool


_HASHER: MinHasher | None = None


def _init_worker(n_grams: int, bands: int, rows: int, seed: int) -> None:
    global _HASHER
    _HASHER = MinHasher(n_grams, bands, rows, seed)


def _signature_chunk(args: tuple[Path, list[tuple[str, str, dict]], bool, bool]) -> _ChunkResult:
    path, chunk, exact, near = args
    lines = [record_to_json(text, doc_id, meta) for text, doc_id, meta in chunk]
    with open(path, "wb") as f:
        f.writelines(lines)
    texts = [c[0] for c in chunk]
    keys = has = None
    if near:
        assert _HASHER is not None, "worker not initialised"
        keys, has = _HASHER.band_keys(texts)
    return _ChunkResult(
        ids=[c[1] for c in chunk],
        text_bytes=np.fromiter((len(t.encode()) for t in texts), dtype=np.int64, count=len(texts)),
        line_bytes=np.fromiter((len(line) for line in lines), dtype=np.int64, count=len(lines)),
        exact=[exact_key(t) for t in texts] if exact else None,
        band_keys=keys,
        has_shingles=has,
    )


def _write_shard(args: tuple[Path, list[tuple[Path, np.ndarray, np.ndarray]]]) -> int:
    """Write one output shard from slices of scratch chunk files: (file, line starts, line lengths)."""
    path, pieces = args

    def lines() -> Iterator[bytes]:
        for chunk_path, starts, lengths in pieces:
            data = chunk_path.read_bytes()
            yield b"".join(data[s : s + n] for s, n in zip(starts.tolist(), lengths.tolist(), strict=True))

    return _write_gzip(path, lines())


# ---------------------------------------------------------------------------------------------------
# Shared bookkeeping: union-find whose root is the smallest (first) index of its cluster.


class _Clusters:
    def __init__(self) -> None:
        self.parent: list[int] = []

    def add(self) -> int:
        self.parent.append(len(self.parent))
        return len(self.parent) - 1

    def find(self, x: int) -> int:
        parent = self.parent
        root = x
        while parent[root] != root:
            root = parent[root]
        while parent[x] != root:  # path compression
            parent[x], x = root, parent[x]
        return root

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            # the later document joins the earlier one's cluster, so a root is always its cluster's minimum
            lo, hi = (ra, rb) if ra < rb else (rb, ra)
            self.parent[hi] = lo

    def roots(self) -> np.ndarray:
        # parent[i] <= i for every i, so one pass in index order resolves every root
        roots = np.array(self.parent, dtype=np.int64)
        for i in range(len(roots)):
            roots[i] = roots[roots[i]]
        return roots


def _cluster_metrics(cluster_of: np.ndarray) -> dict:
    """`cluster_of[i]` = index of the kept document of i's cluster; clusters of size >= 2 are counted."""
    sizes = np.bincount(cluster_of, minlength=len(cluster_of)) if len(cluster_of) else np.zeros(0, np.int64)
    dup_sizes = sizes[sizes >= 2]
    dist = Counter(dup_sizes.tolist())
    return {
        "clusters": len(dup_sizes),
        "cluster_sizes": {str(k): dist[k] for k in sorted(dist)},
        "largest_cluster": int(dup_sizes.max()) if len(dup_sizes) else 1,
    }


# ---------------------------------------------------------------------------------------------------
# minhash engine: parent side.


def _run_minhash(
    documents: Iterable[Document], out_dir: Path, cfg: DedupConfig, reporter: Reporter, scratch: Path
) -> dict:
    docs_dir = _prepare_out_dir(out_dir)
    chunk_dir = scratch / "dedup-chunks"
    chunk_dir.mkdir(parents=True, exist_ok=True)
    workers = cfg.local_workers

    ids: list[str] = []
    text_bytes: list[np.ndarray] = []
    chunk_files: list[Path] = []
    chunk_line_bytes: list[np.ndarray] = []
    exact_dup_of: dict[int, int] = {}  # removed index -> index of its first occurrence
    first_by_key: dict[bytes, int] = {}
    tables: list[dict[int, int]] = [{} for _ in range(cfg.bands)]
    clusters = _Clusters()
    no_shingles = 0

    def consume(res: _ChunkResult) -> None:
        nonlocal no_shingles
        base = len(ids)
        ids.extend(res.ids)
        text_bytes.append(res.text_bytes)
        chunk_line_bytes.append(res.line_bytes)
        band_rows = res.band_keys.tolist() if res.band_keys is not None else None
        has = res.has_shingles.tolist() if res.has_shingles is not None else None
        for j in range(len(res.ids)):
            i = clusters.add()
            assert i == base + j, (i, base, j)
            if res.exact is not None:
                first = first_by_key.setdefault(res.exact[j], i)
                if first != i:
                    exact_dup_of[i] = first
                    continue
            if band_rows is not None:
                if not has[j]:
                    no_shingles += 1
                    continue
                for table, key in zip(tables, band_rows[j], strict=True):
                    other = table.setdefault(key, i)
                    if other != i:
                        clusters.union(i, other)

    # fork: workers only compute on what they are sent (no console, no torch threads in this process)
    pool = worker_pool(
        workers, "fork", _init_worker, (cfg.n_grams, cfg.bands, cfg.rows, cfg.seed), stage="dedup"
    )
    try:
        in_flight: deque = deque()
        with reporter.progress("dedup: signatures", unit="docs") as bar:
            for k, chunk in enumerate(_chunks(documents, CHUNK_DOCS)):
                path = chunk_dir / f"{k:06d}.jsonl"
                chunk_files.append(path)
                in_flight.append(pool.submit(_signature_chunk, (path, chunk, cfg.exact, cfg.near)))
                # bounded read-ahead: the input may be far larger than memory
                while len(in_flight) > 2 * workers:
                    res = pool.result(in_flight.popleft())
                    consume(res)
                    bar.advance(len(res.ids))
            while in_flight:
                res = pool.result(in_flight.popleft())
                consume(res)
                bar.advance(len(res.ids))

        n = len(ids)
        roots = clusters.roots()
        cluster_of = roots.copy()  # kept document of each document's cluster
        exact_removed = np.zeros(n, dtype=bool)
        for i, first in exact_dup_of.items():
            exact_removed[i] = True
            cluster_of[i] = roots[first]
        keep = ~exact_removed & (roots == np.arange(n))

        # kept lines, grouped into output shards of shard_size, each built from slices of chunk files
        line_bytes = np.concatenate(chunk_line_bytes) if chunk_line_bytes else np.zeros(0, np.int64)
        chunk_sizes = [len(b) for b in chunk_line_bytes]
        chunk_index = np.repeat(np.arange(len(chunk_sizes)), chunk_sizes)
        line_start = (
            np.concatenate([np.cumsum(b) - b for b in chunk_line_bytes]) if n else np.zeros(0, np.int64)
        )
        kept_idx = np.flatnonzero(keep)
        tasks = []
        for s, start in enumerate(range(0, len(kept_idx), cfg.shard_size)):
            sel = kept_idx[start : start + cfg.shard_size]
            pieces = []
            for c in np.unique(chunk_index[sel]):
                in_c = sel[chunk_index[sel] == c]
                pieces.append((chunk_files[c], line_start[in_c], line_bytes[in_c]))
            tasks.append((docs_dir / shard_name(s), pieces))
        compressed = 0
        with reporter.progress("dedup: write", total=len(tasks), unit="shards") as bar:
            for size in pool.ordered(_write_shard, ((t,) for t in tasks), window=len(tasks) + 1):
                compressed += size
                bar.advance(1)
        pool.close(kill=False)
    except BaseException:
        pool.close(kill=True)
        raise
    finally:
        shutil.rmtree(chunk_dir, ignore_errors=True)

    tb = np.concatenate(text_bytes) if text_bytes else np.zeros(0, np.int64)
    near_removed = ~keep & ~exact_removed
    _write_removed(out_dir, ids, exact_removed, near_removed, cluster_of)
    return {
        **_outcome_metrics(tb, keep, exact_removed, near_removed, cluster_of, len(tasks), compressed),
        "no_shingle_docs": no_shingles,
    }


def _outcome_metrics(
    text_bytes: np.ndarray,
    keep: np.ndarray,
    exact_removed: np.ndarray,
    near_removed: np.ndarray,
    cluster_of: np.ndarray,
    shards: int,
    compressed_bytes: int,
) -> dict:
    """The metrics both engines report, from per-document arrays in input order."""
    return {
        "documents_in": len(keep),
        "documents_out": int(keep.sum()),
        "bytes_in": int(text_bytes.sum()),
        "bytes_out": int(text_bytes[keep].sum()),
        "exact_duplicates": int(exact_removed.sum()),
        "near_duplicates": int(near_removed.sum()),
        "shards": shards,
        "compressed_bytes_out": compressed_bytes,
        **_cluster_metrics(cluster_of),
    }


def _write_removed(
    out_dir: Path, ids: list[str], exact_removed: np.ndarray, near_removed: np.ndarray, cluster_of: np.ndarray
) -> None:
    rows = []
    for i in np.flatnonzero(exact_removed | near_removed).tolist():
        kind = "exact" if exact_removed[i] else "near"
        rows.append(orjson.dumps({"id": ids[i], "duplicate_of": ids[cluster_of[i]], "kind": kind}) + b"\n")
    _write_gzip(Path(out_dir) / REMOVED_FILE, rows)


# ---------------------------------------------------------------------------------------------------
# datasketch engine: datasketch's MinHash and MinHashLSH index, in one process.


def _run_datasketch(
    documents: Iterable[Document], out_dir: Path, cfg: DedupConfig, reporter: Reporter, scratch: Path
) -> dict:
    from datasketch import MinHash, MinHashLSH

    docs_dir = _prepare_out_dir(out_dir)
    num_perm = cfg.bands * cfg.rows
    lsh = MinHashLSH(num_perm=num_perm, params=(cfg.bands, cfg.rows)) if cfg.near else None
    spill = scratch / "datasketch-documents.jsonl"  # kept documents are known only after the last one
    ids: list[str] = []
    text_bytes: list[int] = []
    exact_dup_of: dict[int, int] = {}
    first_by_key: dict[bytes, int] = {}
    clusters = _Clusters()
    no_shingles = 0
    with open(spill, "wb") as f, reporter.progress("dedup: signatures", unit="docs") as bar:
        for doc in documents:
            i = clusters.add()
            f.write(record_to_json(doc.text, doc.id, doc.metadata))
            ids.append(doc.id)
            text_bytes.append(len(doc.text.encode()))
            bar.advance(1)
            if cfg.exact:
                first = first_by_key.setdefault(exact_key(doc.text), i)
                if first != i:
                    exact_dup_of[i] = first
                    continue
            if lsh is None:
                continue
            words = simplify_words(doc.text)
            shingles = [b" ".join(words[k : k + cfg.n_grams]) for k in range(len(words) - cfg.n_grams + 1)]
            if not shingles:
                no_shingles += 1
                continue
            signature = MinHash(num_perm=num_perm, seed=cfg.seed)
            signature.update_batch(shingles)
            for other in lsh.query(signature):  # earlier documents sharing a band
                clusters.union(i, other)
            lsh.insert(i, signature, check_duplication=False)

    n = len(ids)
    roots = clusters.roots()
    cluster_of = roots.copy()
    exact_removed = np.zeros(n, dtype=bool)
    for i, first in exact_dup_of.items():
        exact_removed[i] = True
        cluster_of[i] = roots[first]
    keep = ~exact_removed & (roots == np.arange(n))
    shards = compressed = 0
    with open(spill, "rb") as f:
        kept_lines = (line for line, kept in zip(f, keep.tolist(), strict=True) if kept)
        while batch := list(itertools.islice(kept_lines, cfg.shard_size)):
            compressed += _write_gzip(docs_dir / shard_name(shards), batch)
            shards += 1
    spill.unlink()
    near_removed = ~keep & ~exact_removed
    _write_removed(out_dir, ids, exact_removed, near_removed, cluster_of)
    return {
        **_outcome_metrics(
            np.array(text_bytes, dtype=np.int64),
            keep,
            exact_removed,
            near_removed,
            cluster_of,
            shards,
            compressed,
        ),
        "no_shingle_docs": no_shingles,
    }


# ---------------------------------------------------------------------------------------------------
# datatrove engine: datatrove's four MinHash steps, run by its Local, Slurm or Ray executor.


class RegexWordTokenizer(WordTokenizer):
    """A datatrove word tokenizer without spaCy: runs of letters/digits.

    MinhashDedupSignature applies `simplify_text` (lowercase, no punctuation, numbers -> 0) first, so
    on its input this splits exactly where spaCy's English tokenizer would, ~50x faster.
    """

    _word = re.compile(r"[^\W_]+")
    _sentence = re.compile(r"[^.!?]+[.!?]*")

    def __init__(self) -> None:
        super().__init__("en")

    def word_tokenize(self, text: str) -> list[str]:
        return self._word.findall(text)

    def sent_tokenize(self, text: str) -> list[str]:
        return [m.group().strip() for m in self._sentence.finditer(text) if m.group().strip()]

    def span_tokenize(self, text: str) -> list[tuple[int, int]]:
        return [m.span() for m in self._sentence.finditer(text) if m.group().strip()]


class _RecordKept(PipelineStep):
    """After MinhashDedupFilter: note (cluster id, doc id) of kept cluster members, drop the metadata."""

    name = "llmctl: record kept cluster members"

    def __init__(self, folder: str) -> None:
        super().__init__()
        self.folder = folder

    def run(self, data: Iterable[Document], rank: int = 0, world_size: int = 1) -> Iterator[Document]:
        rows = []
        for doc in data:
            cluster = doc.metadata.pop("minhash_cluster_id", -1)
            doc.metadata.pop("minhash_cluster_size", None)
            if cluster != -1:
                rows.append(orjson.dumps({"cluster": cluster, "id": doc.id}) + b"\n")
            yield doc
        Path(self.folder).mkdir(parents=True, exist_ok=True)
        Path(self.folder, f"{rank:05d}.jsonl").write_bytes(b"".join(rows))


def _strip_cluster_metadata(self: DiskWriter, doc: Document) -> dict:  # noqa: ARG001 - adapter signature
    # removed documents keep their cluster id (we need it); everything else as JsonlWriter writes it
    return {k: v for k, v in (("text", doc.text), ("id", doc.id), ("metadata", doc.metadata)) if v}


def build_datatrove_executors(
    cfg: DedupConfig, input_dir: Path, work: Path, out_docs: Path, tasks: int
) -> list:
    """The four datatrove executors (signatures, buckets, clusters, filter), each depending on the last.

    `tasks` is the number of input files in `input_dir` (one task each). For slurm and ray, `work`
    and `out_docs` must be on a filesystem every node sees.
    """
    mh = MinhashConfig(
        n_grams=cfg.n_grams,
        num_buckets=cfg.bands,
        hashes_per_bucket=cfg.rows,
        seed=cfg.seed,
        hash_config=HashConfig(precision=64),
    )
    # datatrove would load spaCy for English; the regex tokenizer splits simplified text identically
    signature = MinhashDedupSignature(
        output_folder=str(work / "signatures"), config=mh, language=RegexWordTokenizer()
    )
    steps = [
        (
            "signatures",
            [
                JsonlReader(str(input_dir), compression=None, glob_pattern="*.jsonl", add_file_path=False),
                signature,
            ],
            tasks,
        ),
        (
            "buckets",
            [MinhashDedupBuckets(str(work / "signatures"), str(work / "buckets"), config=mh)],
            cfg.bands,
        ),
        (
            "clusters",
            [
                MinhashDedupCluster(
                    str(work / "buckets"),
                    str(work / "remove_ids"),
                    config=mh,
                    save_cluster_id=True,
                    save_cluster_size=True,
                )
            ],
            1,
        ),
        (
            "filter",
            [
                JsonlReader(str(input_dir), compression=None, glob_pattern="*.jsonl", add_file_path=False),
                MinhashDedupFilter(
                    str(work / "remove_ids"),
                    exclusion_writer=JsonlWriter(str(work / "removed"), adapter=_strip_cluster_metadata),
                    load_cluster_ids=True,
                    load_cluster_sizes=True,
                ),
                _RecordKept(str(work / "kept")),
                JsonlWriter(str(out_docs), output_filename="${rank}.jsonl.gz"),
            ],
            tasks,
        ),
    ]
    executors: list = []
    for name, pipeline, n_tasks in steps:
        logs = str(work / "logs" / name)
        depends = executors[-1] if executors else None
        if cfg.executor == "local":
            ex = LocalPipelineExecutor(
                pipeline,
                tasks=n_tasks,
                workers=min(cfg.local_workers, n_tasks),
                logging_dir=logs,
                depends=depends,
            )
        elif cfg.executor == "slurm":
            from datatrove.executor import SlurmPipelineExecutor

            o = cfg.slurm
            ex = SlurmPipelineExecutor(
                pipeline,
                tasks=n_tasks,
                time=o.time,
                partition=o.partition,
                cpus_per_task=o.cpus_per_task,
                mem_per_cpu_gb=o.mem_per_cpu_gb,
                workers=o.workers,
                job_name=f"{o.job_name}-{name}",
                qos=o.qos,
                env_command=o.env_command or None,
                sbatch_args=dict(o.sbatch_args),
                logging_dir=logs,
                depends=depends,
            )
        else:
            from datatrove.executor import RayPipelineExecutor

            o = cfg.ray
            ex = RayPipelineExecutor(
                pipeline,
                tasks=n_tasks,
                workers=o.workers,
                cpus_per_task=o.cpus_per_task,
                mem_per_cpu_gb=o.mem_per_cpu_gb,
                logging_dir=logs,
                depends=depends,
            )
        executors.append(ex)
    return executors


def _wait_for_slurm(executor, poll_seconds: float, reporter: Reporter) -> None:  # noqa: ANN001
    # SlurmPipelineExecutor.run() only submits; the filter step is last in the dependency chain
    with reporter.progress("dedup: waiting for slurm", total=executor.world_size, unit="tasks") as bar:
        while incomplete := len(executor.get_incomplete_ranks(skip_completed=True)):
            bar.update(completed=executor.world_size - incomplete)
            time.sleep(poll_seconds)


def _run_datatrove(
    documents: Iterable[Document], out_dir: Path, cfg: DedupConfig, reporter: Reporter, scratch: Path
) -> dict:
    docs_dir = _prepare_out_dir(out_dir)
    work = scratch / "datatrove-dedup"
    if work.exists():
        shutil.rmtree(work)  # datatrove skips tasks it finds completed: never reuse old state
    input_dir = work / "input"
    input_dir.mkdir(parents=True)

    # Spill the input into blocks of shard_size documents (one task each), removing exact duplicates
    # on the way with the same semantics as the minhash engine.
    ids: list[str] = []
    text_bytes: list[int] = []
    exact_dup_of: dict[int, int] = {}
    first_by_key: dict[bytes, int] = {}
    blocks = 0
    block: list[bytes] = []

    def flush() -> None:
        nonlocal blocks, block
        (input_dir / f"{blocks:05d}.jsonl").write_bytes(b"".join(block))
        blocks += 1
        block = []

    with reporter.progress("dedup: exact + spill", unit="docs") as bar:
        for doc in documents:
            i = len(ids)
            ids.append(doc.id)
            text_bytes.append(len(doc.text.encode()))
            if cfg.exact:
                first = first_by_key.setdefault(exact_key(doc.text), i)
                if first != i:
                    exact_dup_of[i] = first
                    continue
            block.append(record_to_json(doc.text, doc.id, doc.metadata))
            if len(block) == cfg.shard_size:
                flush()
            bar.advance(1)
    if block or blocks == 0:
        flush()
    n = len(ids)
    index = {doc_id: i for i, doc_id in enumerate(ids)}
    if len(index) != n:
        raise InputError(
            "the datatrove dedup engine needs unique document ids", hint="set dedup.engine=minhash"
        )

    near_cluster: dict[int, int] = {}  # near-removed index -> datatrove cluster id
    kept_of_cluster: dict[int, int] = {}
    if cfg.near:
        executors = build_datatrove_executors(cfg, input_dir, work, docs_dir, blocks)
        reporter.log(f"dedup: datatrove MinHash, {blocks} tasks on executor {cfg.executor}")
        executors[-1].run()  # runs its dependencies first
        if cfg.executor == "slurm":
            _wait_for_slurm(executors[-1], cfg.slurm.poll_seconds, reporter)
        for path in sorted((work / "removed").glob("*.jsonl.gz")):
            with gzip.open(path, "rb") as f:
                for line in f:
                    rec = orjson.loads(line)
                    near_cluster[index[rec["id"]]] = rec["metadata"]["minhash_cluster_id"]
        for path in sorted((work / "kept").glob("*.jsonl")):
            for line in path.read_bytes().splitlines():
                rec = orjson.loads(line)
                kept_of_cluster[rec["cluster"]] = index[rec["id"]]
    else:
        for b in range(blocks):
            src = input_dir / f"{b:05d}.jsonl"
            _write_gzip(docs_dir / shard_name(b), [src.read_bytes()])

    cluster_of = np.arange(n)
    near_removed = np.zeros(n, dtype=bool)
    for i, c in near_cluster.items():
        near_removed[i] = True
        cluster_of[i] = kept_of_cluster[c]
    exact_removed = np.zeros(n, dtype=bool)
    for i, first in exact_dup_of.items():
        exact_removed[i] = True
        cluster_of[i] = cluster_of[first]
    keep = ~exact_removed & ~near_removed
    tb = np.array(text_bytes, dtype=np.int64)
    shards = sorted(docs_dir.glob(f"*{SHARD_SUFFIX}"))
    _write_removed(out_dir, ids, exact_removed, near_removed, cluster_of)
    shutil.rmtree(work, ignore_errors=True)
    compressed = sum(p.stat().st_size for p in shards)
    return _outcome_metrics(tb, keep, exact_removed, near_removed, cluster_of, len(shards), compressed)


# ---------------------------------------------------------------------------------------------------
# Public entry point.


def run_dedup(
    documents: Iterable[Document],
    out_dir: Path,
    cfg: DedupConfig | None = None,
    reporter: Reporter | None = None,
    scratch_dir: Path | None = None,
) -> dict:
    """Deduplicate `documents` into `out_dir` (see the module docstring); returns the metrics dict.

    `scratch_dir` holds temporary files (about the size of the input, uncompressed); it defaults to
    `out_dir/.scratch` and what this function puts there is removed before it returns.
    """
    cfg = cfg or DedupConfig()
    reporter = reporter or Reporter()
    out_dir = Path(out_dir)
    scratch = Path(scratch_dir) if scratch_dir is not None else out_dir / ".scratch"
    scratch.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if cfg.engine == "minhash":
        metrics = _run_minhash(documents, out_dir, cfg, reporter, scratch)
    elif cfg.engine == "datasketch":
        metrics = _run_datasketch(documents, out_dir, cfg, reporter, scratch)
    elif cfg.engine == "datatrove":
        metrics = _run_datatrove(documents, out_dir, cfg, reporter, scratch)
    else:
        raise AssertionError(f"unknown engine {cfg.engine!r}")
    if scratch_dir is None:
        shutil.rmtree(scratch, ignore_errors=True)
    elapsed = time.perf_counter() - t0
    metrics = {
        "engine": cfg.engine,
        **metrics,
        "threshold": round(cfg.threshold, 4),
        "workers": 1 if cfg.engine == "datasketch" else cfg.local_workers,  # datasketch: one process
        "elapsed_seconds": round(elapsed, 3),
        "documents_per_second": round(metrics["documents_in"] / elapsed, 1) if elapsed > 0 else 0.0,
    }
    reporter.log(
        f"dedup: kept {metrics['documents_out']:,} of {metrics['documents_in']:,} documents "
        f"({metrics['exact_duplicates']:,} exact, {metrics['near_duplicates']:,} near duplicates) "
        f"in {elapsed:.1f}s"
    )
    return metrics


def removed_samples(artifact_dir: Path, n: int) -> list[dict]:
    """The first `n` rows of a dedup artifact's removed.jsonl.gz ({id, duplicate_of, kind}); [] elsewhere."""
    path = Path(artifact_dir) / REMOVED_FILE
    if not path.is_file():
        return []
    with gzip.open(path, "rb") as handle:
        return [orjson.loads(line) for line in itertools.islice(handle, n)]


def removed_ids(artifact_dir: Path) -> Iterator[str]:
    """Ids of every document a dedup run removed, in input order."""
    with gzip.open(Path(artifact_dir) / REMOVED_FILE, "rb") as handle:
        for line in handle:
            yield orjson.loads(line)["id"]
