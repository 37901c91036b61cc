"""Dedup on the synthetic corpus with planted duplicates, both engines, checked against truth.json."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest
from datatrove.data import Document
from pydantic import ValidationError

from llmctl.config.dedup import DedupConfig
from llmctl.data.corpus import iter_corpus
from llmctl.data.dedup import REMOVED_FILE, build_datatrove_executors, exact_key, run_dedup
from llmctl.data.minhash import MinHasher, simplify_words
from llmctl.data.synthetic import CorpusTruth, generate_corpus, word_ngram_jaccard
from llmctl.errors import InputError

N_DOCS = 3000


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[Document], CorpusTruth]:
    folder = tmp_path_factory.mktemp("synthetic")
    truth = generate_corpus(folder, N_DOCS, seed=7)
    docs = []
    with open(folder / "docs.jsonl", encoding="utf-8") as f:
        for line in f:
            rec = json.loads(line)
            docs.append(Document(text=rec["text"], id=rec["id"], metadata=rec["metadata"]))
    return docs, truth


def _read_removed(out: Path) -> dict[str, dict]:
    with gzip.open(out / REMOVED_FILE, "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    assert all(set(r) == {"id", "duplicate_of", "kind"} and r["kind"] in ("exact", "near") for r in rows)
    return {r["id"]: r for r in rows}


def _check_against_truth(docs: list[Document], truth: CorpusTruth, out: Path, metrics: dict) -> None:
    removed = _read_removed(out)
    kept = list(iter_corpus(out))
    kept_ids = [d.id for d in kept]
    input_order = [d.id for d in docs]
    # kept + removed = input, no overlap; kept documents keep their input order and content
    assert set(kept_ids).isdisjoint(removed) and len(kept_ids) + len(removed) == len(docs)
    assert kept_ids == [i for i in input_order if i not in removed]
    by_id = {d.id: d for d in docs}
    assert all(d.text == by_id[d.id].text and d.metadata == by_id[d.id].metadata for d in kept)
    # duplicate_of always names a kept document
    assert all(r["duplicate_of"] in set(kept_ids) for r in removed.values())

    def same_cluster(a: str, b: str) -> bool:
        ka = removed[a]["duplicate_of"] if a in removed else a
        kb = removed[b]["duplicate_of"] if b in removed else b
        return ka == kb and (a in removed or b in removed)

    exact_found = [d for d, o in truth.exact_duplicates.items() if same_cluster(d, o)]
    near_found = [d for d, o in truth.near_duplicates.items() if same_cluster(d, o)]
    assert len(exact_found) == len(truth.exact_duplicates)
    assert len(near_found) >= 0.95 * len(truth.near_duplicates), (len(near_found), len(truth.near_duplicates))
    planted = truth.has_planted_duplicate()
    false_removals = [i for i in removed if i not in planted]
    assert len(false_removals) < 0.01 * (len(docs) - len(planted)), false_removals

    assert metrics["documents_in"] == len(docs) and metrics["documents_out"] == len(kept)
    assert metrics["exact_duplicates"] + metrics["near_duplicates"] == len(removed)
    assert metrics["bytes_out"] == sum(len(d.text.encode()) for d in kept)
    assert metrics["clusters"] == sum(metrics["cluster_sizes"].values())
    assert sum(int(s) * c for s, c in metrics["cluster_sizes"].items()) == metrics["clusters"] + len(removed)


@pytest.mark.parametrize("workers", [1, 2])
def test_minhash_engine_finds_planted_duplicates(corpus, tmp_path: Path, workers: int) -> None:
    docs, truth = corpus
    cfg = DedupConfig(workers=workers, shard_size=1000)
    metrics = run_dedup(iter(docs), tmp_path / "out", cfg, scratch_dir=tmp_path / "scratch")
    _check_against_truth(docs, truth, tmp_path / "out", metrics)
    # the first document of each cluster is the one kept, so every planted original survives
    removed = _read_removed(tmp_path / "out")
    for dup, orig in {**truth.exact_duplicates, **truth.near_duplicates}.items():
        if dup in removed:
            assert orig not in removed
    shards = sorted((tmp_path / "out" / "documents").glob("*.jsonl.gz"))
    assert [p.name for p in shards] == [f"{i:05d}.jsonl.gz" for i in range(metrics["shards"])]
    assert metrics["shards"] == -(-metrics["documents_out"] // 1000)
    assert not any((tmp_path / "scratch").iterdir())  # scratch cleaned up


@pytest.mark.slow
def test_datatrove_engine_finds_planted_duplicates(corpus, tmp_path: Path) -> None:
    docs, truth = corpus
    cfg = DedupConfig(engine="datatrove", workers=2, shard_size=1500)
    metrics = run_dedup(iter(docs), tmp_path / "out", cfg, scratch_dir=tmp_path / "scratch")
    _check_against_truth(docs, truth, tmp_path / "out", metrics)
    # kept documents carry no datatrove bookkeeping
    assert not any("minhash_cluster_id" in d.metadata for d in iter_corpus(tmp_path / "out"))


def test_engines_agree_on_exact_only(corpus, tmp_path: Path) -> None:
    docs, truth = corpus
    docs = docs[:600]
    results = {}
    for engine in ("minhash", "datatrove"):
        cfg = DedupConfig(engine=engine, near=False, workers=1)
        out = tmp_path / engine
        metrics = run_dedup(iter(docs), out, cfg)
        results[engine] = (_read_removed(out), [d.id for d in iter_corpus(out)])
        assert metrics["near_duplicates"] == 0
    assert results["minhash"] == results["datatrove"]
    planted = {d: o for d, o in truth.exact_duplicates.items() if d in {x.id for x in docs}}
    assert {i: r["duplicate_of"] for i, r in results["minhash"][0].items()} == planted


def test_exact_key_normalisation() -> None:
    assert exact_key("a  b\n\nc ") == exact_key("a b c")
    assert exact_key("caf\u00e9") == exact_key("cafe\u0301")  # NFC
    assert exact_key("A b c") != exact_key("a b c")  # case counts
    assert exact_key("a, b") != exact_key("a b")  # punctuation counts


def test_simplify_words_matches_datatrove() -> None:
    from datatrove.utils.text import simplify_text

    texts = [
        "Hello, World! It's 12.5 degrees; version 3,000 (approx).",
        "Ünïcödé straße — café_au_lait 42",
        "tabs\tand\nnewlines   and snake_case",
    ]
    for t in texts:
        assert [w.decode() for w in simplify_words(t)] == simplify_text(t).split()


def test_minhash_estimates_jaccard(corpus) -> None:
    docs, truth = corpus
    by_id = {d.id: d.text for d in docs}
    pairs = list(truth.near_duplicates.items())[:100]
    hasher = MinHasher()
    sig, has = hasher.signatures([by_id[a] for a, _ in pairs] + [by_id[b] for _, b in pairs])
    assert has.all()
    est = (sig[: len(pairs)] == sig[len(pairs) :]).mean(axis=1)
    true = np.array([word_ngram_jaccard(by_id[a], by_id[b]) for a, b in pairs])
    # unbiased, with the spread of a 112-permutation estimate (sd ~0.03 at J ~0.9)
    assert abs((est - true).mean()) < 0.01
    assert np.abs(est - true).max() < 0.15
    # batching does not change a document's signature; too-short texts have none
    single, _ = hasher.signatures([by_id[pairs[3][0]]])
    assert (single[0] == sig[3]).all()
    _, has = hasher.signatures(["four words only here", "now five words are here"])
    assert has.tolist() == [False, True]


def test_empty_input_and_reused_output(tmp_path: Path) -> None:
    metrics = run_dedup(iter([]), tmp_path / "out", DedupConfig(workers=1))
    assert metrics["documents_in"] == 0 and metrics["documents_out"] == 0 and metrics["shards"] == 0
    assert _read_removed(tmp_path / "out") == {}
    docs = [Document(text=f"document number {i} with enough words", id=str(i)) for i in range(3)]
    run_dedup(iter(docs), tmp_path / "full", DedupConfig(workers=1))
    with pytest.raises(InputError):
        run_dedup(iter(docs), tmp_path / "full", DedupConfig(workers=1))


def test_config_rules_and_executor_construction(tmp_path: Path) -> None:
    assert abs(DedupConfig().threshold - (1 / 14) ** (1 / 8)) < 1e-9
    with pytest.raises(ValidationError):
        DedupConfig(executor="slurm")  # needs engine: datatrove
    with pytest.raises(ValidationError):
        DedupConfig(engine="datatrove", executor="slurm")  # needs a partition
    with pytest.raises(ValidationError):
        DedupConfig(bogus=1)
    # no cluster here: check that the Slurm executors are built from the config and chained
    cfg = DedupConfig(
        engine="datatrove",
        executor="slurm",
        slurm={"partition": "cpu", "time": "01:00:00", "cpus_per_task": 2, "sbatch_args": {"account": "p1"}},
    )
    executors = build_datatrove_executors(cfg, tmp_path / "in", tmp_path / "work", tmp_path / "docs", tasks=7)
    assert [e.world_size for e in executors] == [7, 14, 1, 7]
    assert (
        executors[0].partition == "cpu"
        and executors[0].cpus_per_task == 2
        and executors[0].time == "01:00:00"
    )
    assert executors[0]._sbatch_args.get("account") == "p1"
    assert all(b.depends is a for a, b in zip(executors, executors[1:], strict=False))
    ray_cfg = DedupConfig(engine="datatrove", executor="ray")
    try:
        executors = build_datatrove_executors(
            ray_cfg, tmp_path / "in", tmp_path / "work", tmp_path / "d", tasks=3
        )
    except ImportError:
        pytest.skip("ray is not installed")
    assert [e.world_size for e in executors] == [3, 14, 1, 3]


def test_datasketch_engine_is_datasketch_and_finds_planted_duplicates(corpus, tmp_path: Path) -> None:
    """The default engine is llmctl's own MinHash (`minhash`); `datasketch` runs the datasketch
    library's MinHash and MinHashLSH index, with the same outputs and the same quality."""
    assert DedupConfig().engine == "minhash"
    docs, truth = corpus
    cfg = DedupConfig(engine="datasketch", shard_size=1000)
    metrics = run_dedup(iter(docs), tmp_path / "out", cfg, scratch_dir=tmp_path / "scratch")
    assert metrics["engine"] == "datasketch"
    _check_against_truth(docs, truth, tmp_path / "out", metrics)
    assert metrics["shards"] == -(-metrics["documents_out"] // 1000)
    assert not any((tmp_path / "scratch").iterdir())  # scratch cleaned up

    exact_only = {}
    for engine in ("minhash", "datasketch"):
        out = tmp_path / f"exact-{engine}"
        run_dedup(iter(docs[:600]), out, DedupConfig(engine=engine, near=False, workers=1))
        exact_only[engine] = (_read_removed(out), [d.id for d in iter_corpus(out)])
    assert exact_only["datasketch"] == exact_only["minhash"]
