"""Source readers and the corpus format: every format, globs, limits, and every bad-input error."""

from __future__ import annotations

import gzip
import json
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard
from datatrove.data import Document
from datatrove.pipeline.readers import JsonlReader
from pydantic import ValidationError

from llmctl.config.data import DataConfig
from llmctl.data.corpus import CorpusWriter, corpus_files, iter_corpus
from llmctl.data.sources import read_sources, source_fingerprint
from llmctl.errors import InputError


def _records(n: int, prefix: str = "d") -> list[dict]:
    return [
        {"id": f"{prefix}{i}", "text": f"text of {prefix}{i}", "url": f"https://x.org/{i}"} for i in range(n)
    ]


def _jsonl(records: list[dict]) -> bytes:
    return b"".join(json.dumps(r).encode() + b"\n" for r in records)


def _read(tmp_path: Path, counters: dict | None = None, **data) -> list[Document]:
    return list(read_sources(DataConfig(**data), tmp_path, counters=counters))


def _error(tmp_path: Path, **data) -> InputError:
    with pytest.raises(InputError) as e:
        _read(tmp_path, **data)
    return e.value


# --- formats -----------------------------------------------------------------------------------


def test_reads_jsonl_gz_zst_parquet_text_in_order(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "a.jsonl").write_bytes(_jsonl(_records(3, "a")))
    (raw / "b.jsonl.gz").write_bytes(gzip.compress(_jsonl(_records(2, "b"))))
    (raw / "c.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(_jsonl(_records(2, "c"))))
    pq.write_table(pa.table({"text": ["p one", "p two"], "score": [0.5, 0.9]}), raw / "d.parquet")
    (raw / "e.txt").write_text("a whole file\n\nis one document\n")
    (raw / "notes.md").write_text("ignored: unknown extension in a folder")
    counters: dict = {}
    docs = _read(tmp_path, counters, sources=[{"path": "raw"}])
    assert [d.id for d in docs] == [
        "a0", "a1", "a2", "b0", "b1", "c0", "c1", "raw/d.parquet/1", "raw/d.parquet/2", "raw/e.txt"
    ]  # fmt: skip
    assert docs[0].text == "text of a0" and docs[0].metadata == {"url": "https://x.org/0"}
    assert docs[7].metadata == {"score": 0.5}
    assert docs[9].text == "a whole file\n\nis one document\n"
    assert counters == {"files": 5, "documents": 10, "skipped_malformed": 0, "skipped_empty": 0}


def test_ids_derived_from_file_and_line_when_missing(tmp_path: Path) -> None:
    (tmp_path / "x.jsonl").write_text('{"text": "one"}\n\n{"text": "two", "metadata": {"k": 1}}\n')
    docs = _read(tmp_path, sources=[{"path": "x.jsonl"}])
    assert [d.id for d in docs] == ["x.jsonl/1", "x.jsonl/3"]  # blank line 2 keeps numbering honest
    assert docs[1].metadata == {"k": 1}
    assert [d.id for d in _read(tmp_path, sources=[{"path": "x.jsonl"}])] == ["x.jsonl/1", "x.jsonl/3"]


def test_text_key_id_key_glob_and_limit(tmp_path: Path) -> None:
    for i in range(3):
        recs = [{"body": f"f{i} r{j}", "uid": f"{i}-{j}"} for j in range(4)]
        (tmp_path / f"part-{i}.jsonl").write_bytes(_jsonl(recs))
    src = {"path": "part-*.jsonl", "text_key": "body", "id_key": "uid"}
    docs = _read(tmp_path, sources=[src])
    assert len(docs) == 12 and docs[0].id == "0-0" and docs[0].text == "f0 r0"
    limited = _read(tmp_path, sources=[{**src, "limit": 6}, {**src, "path": "part-2.jsonl", "limit": 1}])
    assert [d.id for d in limited] == ["0-0", "0-1", "0-2", "0-3", "1-0", "1-1", "2-0"]


def test_explicit_format_overrides_extension(tmp_path: Path) -> None:
    (tmp_path / "dump.data").write_bytes(_jsonl(_records(2)))
    assert len(_read(tmp_path, sources=[{"path": "dump.data", "format": "jsonl"}])) == 2
    err = _error(tmp_path, sources=[{"path": "dump.data"}])
    assert "dump.data" in err.message and "format" in err.hint


def test_fingerprint_changes_when_a_file_changes(tmp_path: Path) -> None:
    f = tmp_path / "a.jsonl"
    f.write_bytes(_jsonl(_records(2)))
    cfg = DataConfig(sources=[{"path": "*.jsonl"}])
    fp1 = source_fingerprint(cfg, tmp_path)
    assert fp1[0]["files"][0]["path"] == "a.jsonl" and fp1[0]["files"][0]["size"] == f.stat().st_size
    f.write_bytes(_jsonl(_records(3)))
    assert source_fingerprint(cfg, tmp_path) != fp1


# --- bad input -----------------------------------------------------------------------------------


def test_malformed_line_names_file_and_line(tmp_path: Path) -> None:
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"text": "ok"}\n{"text": oops}\n{"text": "ok"}\n')
    err = _error(tmp_path, sources=[{"path": "bad.jsonl"}])
    assert err.message.startswith("bad.jsonl:3: malformed JSON")
    assert "on_error=skip" in err.hint


def test_on_error_skip_counts_malformed_records(tmp_path: Path) -> None:
    (tmp_path / "bad.jsonl").write_text(
        '{"text": "ok"}\n{"text": oops}\n[1, 2]\n{"text": 5}\n{"body": "x"}\n{"text": ""}\n'
    )
    counters: dict = {}
    docs = _read(tmp_path, counters, sources=[{"path": "bad.jsonl"}], on_error="skip")
    assert [d.text for d in docs] == ["ok"]
    assert counters["skipped_malformed"] == 4 and counters["skipped_empty"] == 1


def test_missing_text_key_lists_existing_keys(tmp_path: Path) -> None:
    (tmp_path / "x.jsonl").write_text('{"content": "hi", "id": "1"}\n')
    err = _error(tmp_path, sources=[{"path": "x.jsonl"}])
    assert err.message == "x.jsonl:1: no text key 'text' (keys present: 'content', 'id')"
    pq.write_table(pa.table({"content": ["a"]}), tmp_path / "x.parquet")
    err = _error(tmp_path, sources=[{"path": "x.parquet"}])
    assert "x.parquet" in err.message and "columns: content" in err.message


def test_empty_inputs(tmp_path: Path) -> None:
    err = _error(tmp_path, sources=[{"path": "nothing/*.jsonl"}])
    assert "no files match nothing/*.jsonl" in err.message
    assert "does not exist" in _error(tmp_path, sources=[{"path": "missing.jsonl"}]).message
    (tmp_path / "empty").mkdir()
    assert "no .jsonl" in _error(tmp_path, sources=[{"path": "empty"}]).message
    (tmp_path / "zero.jsonl").write_text("\n\n")
    assert "holds no documents" in _error(tmp_path, sources=[{"path": "zero.jsonl"}]).message
    with pytest.raises(ValidationError):
        DataConfig(sources=[])


def test_corrupt_and_wrongly_compressed_files(tmp_path: Path) -> None:
    (tmp_path / "fake.jsonl.gz").write_bytes(_jsonl(_records(2)))  # plain text named .gz
    err = _error(tmp_path, sources=[{"path": "fake.jsonl.gz"}])
    assert err.message.startswith("fake.jsonl.gz: cannot read file") and "gzip" in err.hint

    whole = gzip.compress(_jsonl(_records(500)))
    (tmp_path / "cut.jsonl.gz").write_bytes(whole[: len(whole) // 2])
    assert _error(tmp_path, sources=[{"path": "cut.jsonl.gz"}]).message.startswith(
        "cut.jsonl.gz: cannot read"
    )

    whole = zstandard.ZstdCompressor().compress(_jsonl(_records(500)))
    (tmp_path / "cut.jsonl.zst").write_bytes(whole[:-10])
    err = _error(tmp_path, sources=[{"path": "cut.jsonl.zst"}])
    assert err.message.startswith("cut.jsonl.zst: cannot read") and "truncated" in err.message

    (tmp_path / "packed.jsonl").write_bytes(gzip.compress(_jsonl(_records(2))))  # gzip named .jsonl
    err = _error(tmp_path, sources=[{"path": "packed.jsonl"}])
    assert err.message.startswith("packed.jsonl:1:") and "rename it to .jsonl.gz" in err.hint

    (tmp_path / "bad.parquet").write_bytes(b"PAR1 not really")
    assert _error(tmp_path, sources=[{"path": "bad.parquet"}]).message.startswith("bad.parquet: cannot read")


def test_source_config_validation() -> None:
    with pytest.raises(ValidationError, match="only apply to hub sources"):
        DataConfig(sources=[{"path": "raw", "subset": "x"}])
    with pytest.raises(ValidationError, match="hf://datasets/"):
        DataConfig(sources=[{"path": "hf://models/gpt2"}])
    with pytest.raises(ValidationError, match="extra"):
        DataConfig(sources=[{"path": "raw", "txt_key": "body"}])


# --- hub sources (offline) ------------------------------------------------------------------------


@pytest.fixture
def hf_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An offline HF cache holding a fineweb-edu-like dataset: two subsets declared in its README."""
    from huggingface_hub import constants

    cache = tmp_path / "hf-cache"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    repo = cache / "datasets--HuggingFaceFW--fineweb-edu"
    rev = "0123456789abcdef0123456789abcdef01234567"
    snap = repo / "snapshots" / rev
    (snap / "sample" / "10BT").mkdir(parents=True)
    (snap / "data" / "CC-MAIN-2024-10").mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(rev)
    (snap / "README.md").write_text(
        "---\nlicense: odc-by\nconfigs:\n"
        "- config_name: default\n  data_files:\n  - split: train\n    path: data/*/*\n"
        "- config_name: sample-10BT\n  data_files:\n  - split: train\n    path: sample/10BT/*\n"
        "---\n# FineWeb-Edu\n"
    )
    for k in range(2):
        texts = [f"sample doc {k}-{i}" for i in range(5)]
        ids = [f"<urn:{k}-{i}>" for i in range(5)]
        pq.write_table(
            pa.table({"text": texts, "id": ids, "url": ["https://e.org"] * 5}),
            snap / "sample" / "10BT" / f"00{k}_00000.parquet",
        )
    pq.write_table(
        pa.table({"text": ["cc doc"], "id": ["cc"]}), snap / "data" / "CC-MAIN-2024-10" / "000.parquet"
    )
    return tmp_path


def test_hub_dataset_from_local_cache(hf_cache: Path) -> None:
    src = {"path": "hf://datasets/HuggingFaceFW/fineweb-edu", "subset": "sample-10BT", "split": "train"}
    docs = _read(hf_cache, sources=[{**src, "limit": 7}])
    assert [d.id for d in docs][:2] == ["<urn:0-0>", "<urn:0-1>"] and len(docs) == 7
    assert docs[5].text == "sample doc 1-0" and docs[0].metadata == {"url": "https://e.org"}
    assert [d.text for d in _read(hf_cache, sources=[{"path": src["path"]}])] == ["cc doc"]  # default subset
    fp = source_fingerprint(DataConfig(sources=[src]), hf_cache)
    assert fp == [
        {
            "repo": "HuggingFaceFW/fineweb-edu",
            "subset": "sample-10BT",
            "split": "train",
            "limit": None,
            "revision": "0123456789abcdef0123456789abcdef01234567",
        }
    ]
    err = _error(hf_cache, sources=[{**src, "subset": "sample-350BT"}])
    assert "default, sample-10BT" in err.message
    assert "split 'test'" in _error(hf_cache, sources=[{**src, "split": "test"}]).message


def test_hub_dataset_offline_and_not_cached(hf_cache: Path) -> None:
    err = _error(hf_cache, sources=[{"path": "hf://datasets/some-org/not-cached"}])
    assert "not in the local Hugging Face cache and HF_HUB_OFFLINE=1" in err.message
    assert "hf download some-org/not-cached --repo-type dataset" in err.hint and "HF_HUB_OFFLINE" in err.hint


# --- corpus format -------------------------------------------------------------------------------


def test_corpus_round_trip_shards_and_datatrove_compat(tmp_path: Path) -> None:
    docs = [Document(text=f"doc {i} ü", id=f"id{i}", metadata={"i": i} if i % 2 else {}) for i in range(25)]
    with CorpusWriter(tmp_path / "art" / "documents", max_docs_per_shard=10) as w:
        for d in docs:
            w.write(d)
    assert [p.name for p in corpus_files(tmp_path / "art")] == [
        "00000.jsonl.gz",
        "00001.jsonl.gz",
        "00002.jsonl.gz",
    ]
    assert w.stats()["documents"] == 25 and w.stats()["shards"] == 3
    back = list(iter_corpus(tmp_path / "art"))
    assert [(d.text, d.id, d.metadata) for d in back] == [(d.text, d.id, d.metadata) for d in docs]
    first = json.loads(
        gzip.decompress((tmp_path / "art/documents/00000.jsonl.gz").read_bytes()).splitlines()[1]
    )
    assert first == {"text": "doc 1 ü", "id": "id1", "metadata": {"i": 1}}
    dt = list(JsonlReader(str(tmp_path / "art" / "documents")).run())
    assert [d.id for d in dt] == [d.id for d in docs]


def test_corpus_writer_leaves_no_partial_shard_on_error(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError), CorpusWriter(tmp_path, max_docs_per_shard=2) as w:
        for i in range(3):
            w.write(Document(text=str(i), id=str(i)))
        raise RuntimeError("boom")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["00000.jsonl.gz"]


def test_corrupt_corpus_shard_names_file_and_line(tmp_path: Path) -> None:
    (tmp_path / "00000.jsonl.gz").write_bytes(gzip.compress(b'{"text": "a", "id": "1"}\n{"text": \n'))
    with pytest.raises(InputError, match=r"00000\.jsonl\.gz:2: malformed JSON"):
        list(iter_corpus(tmp_path))


@pytest.mark.parametrize("offline_env", [False, True])
def test_an_unreachable_hub_fails_fast_and_names_the_cause(tmp_path: Path, offline_env: bool) -> None:
    """The hub at a closed local port: one probe, no retry loop (before: ~28 s of retries)."""
    from conftest import cli_env, run_cli, write_project

    project = write_project(
        tmp_path / "p", "data:\n  sources:\n    - path: hf://datasets/HuggingFaceFW/fineweb-edu\n"
    )
    env = cli_env(HF_ENDPOINT="http://127.0.0.1:9", HF_HOME=str(tmp_path / "hf-home"))
    if not offline_env:
        env.pop("HF_HUB_OFFLINE")
    t0 = time.monotonic()
    result = run_cli("dedup", cwd=project, env=env, timeout=120)
    elapsed = time.monotonic() - t0
    assert result.code == 2, result.stderr
    cause = (
        "HF_HUB_OFFLINE=1" if offline_env else "the hub cannot be reached (127.0.0.1:9: Connection refused)"
    )
    assert (
        f"Error: data.sources[0]: hub dataset HuggingFaceFW/fineweb-edu is not in the local Hugging Face "
        f"cache and {cause}" in result.stderr
    )
    assert ("HF_HUB_OFFLINE" in result.stderr.split("Hint:")[1]) is offline_env
    assert elapsed < 20, elapsed
