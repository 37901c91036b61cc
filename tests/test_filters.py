"""Quality filters: per-step and per-reason counts, excluded documents, formatters, config rules,
worker equivalence, and the default steps against the synthetic corpus's ground truth."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
from datatrove.data import Document
from pydantic import ValidationError

from llmctl.config.filter import FilterConfig
from llmctl.data import filters as filters_mod
from llmctl.data.corpus import iter_corpus
from llmctl.data.filters import WORD_TOKENIZER, run_filters, sample_documents
from llmctl.errors import ConfigError, InputError

PROSE = (
    "The river runs past the old mill and the farmers bring their grain to be ground there every week. "
    "In the spring the water rises with the melting snow, and the miller has to watch the wheel with care. "
    "Children from the village come to see the stones turn, and the miller tells them stories of the "
    "floods that he has known. It is a quiet place, but it is never empty, because the mill is the heart "
    "of the valley and everyone depends on it."
)


def _prose(i: int) -> Document:
    return Document(text=f"Story {i}. {PROSE}", id=f"good{i}")


def _excluded(out: Path, step: str) -> list[dict]:
    rows = []
    for shard in sorted((out / "excluded" / step).glob("*.jsonl.gz")):
        rows += [json.loads(line) for line in gzip.decompress(shard.read_bytes()).splitlines()]
    return rows


def test_counts_per_step_and_reason_and_writes_excluded(tmp_path: Path) -> None:
    docs = [_prose(i) for i in range(5)]
    docs.append(Document(text="too short to keep", id="short"))
    docs.append(Document(text="\n".join(["the same line of text again and again"] * 30), id="repeated"))
    words = [a + b + c for a in "bcdfg" for b in "aeiou" for c in "klmnp"]  # 125 distinct, no stop words
    docs.append(Document(text=" ".join(words), id="soup"))
    cfg = FilterConfig(
        steps=[
            {"type": "length", "min_words": 10},
            {"type": "gopher_repetition"},
            {"type": "gopher_quality"},
        ]
    )
    out = tmp_path / "run"
    m = run_filters(iter(docs), out, cfg, base_dir=tmp_path)
    assert (m["documents_in"], m["documents_out"], m["documents_excluded"]) == (8, 5, 3)
    steps = {s["name"]: s for s in m["steps"]}
    assert steps["length"] | {"seconds": 0} == {
        "name": "length",
        "type": "length",
        "documents_in": 8,
        "documents_out": 7,
        "dropped": {"too_few_words": 1},
        "modified": 0,
        "seconds": 0,
    }
    assert steps["gopher_repetition"]["documents_in"] == 7
    assert steps["gopher_repetition"]["dropped"] == {"dup_line_frac": 1}
    assert steps["gopher_quality"]["documents_in"] == 6 and steps["gopher_quality"]["documents_out"] == 5
    assert steps["gopher_quality"]["dropped"] == {"gopher_enough_stop_words": 1}

    assert [d.id for d in iter_corpus(out)] == [f"good{i}" for i in range(5)]
    short = _excluded(out, "length")
    assert [(r["id"], r["metadata"]["filter_reason"], r["metadata"]["filter_step"]) for r in short] == [
        ("short", "too_few_words", "length")
    ]
    assert _excluded(out, "gopher_repetition")[0]["id"] == "repeated"
    soup = _excluded(out, "gopher_quality")[0]
    assert soup["id"] == "soup" and soup["metadata"]["filter_reason"].startswith("gopher_")

    samples = sample_documents(out, n=2)
    assert [s["id"] for s in samples["kept"]] == ["good0", "good1"]
    assert {(s["step"], s["id"], s["reason"]) for s in samples["excluded"]} == {
        ("length", "short", "too_few_words"),
        (
            "gopher_repetition",
            "repeated",
            _excluded(out, "gopher_repetition")[0]["metadata"]["filter_reason"],
        ),
        ("gopher_quality", "soup", soup["metadata"]["filter_reason"]),
    }


def test_keep_excluded_false_writes_counts_only(tmp_path: Path) -> None:
    docs = [_prose(0), Document(text="tiny", id="t")]
    cfg = FilterConfig(steps=[{"type": "length", "min_chars": 10}], keep_excluded=False)
    m = run_filters(iter(docs), tmp_path / "run", cfg, base_dir=tmp_path)
    assert m["steps"][0]["dropped"] == {"too_few_chars": 1}
    assert not (tmp_path / "run" / "excluded").exists()


def test_pii_formatter_masks_emails_and_public_ips(tmp_path: Path) -> None:
    text = f"{PROSE} Write to jane.doe@corp-mail.com or ask the server at 8.8.4.4; the router is 192.168.1.1."
    docs = [Document(text=text, id="pii"), _prose(1)]
    m = run_filters(iter(docs), tmp_path / "run", FilterConfig(steps=[{"type": "pii"}]), base_dir=tmp_path)
    assert m["steps"][0]["modified"] == 1 and m["documents_out"] == 2
    masked = next(iter_corpus(tmp_path / "run")).text
    assert "jane.doe@corp-mail.com" not in masked and "email@example.com" in masked
    assert "8.8.4.4" not in masked and "192.168.1.1" in masked  # private IPs are not PII


def test_regex_bad_words_and_url_steps(tmp_path: Path) -> None:
    (tmp_path / "bad.txt").write_text("# my list\nmiller\nforbidden phrase\n")
    docs = [
        Document(text=PROSE, id="miller", metadata={"url": "https://ok.org/a"}),
        Document(text="Nothing wrong here at all. " * 3, id="clean", metadata={"url": "https://ok.org/b"}),
        Document(text="Visit the casino now. " * 3, id="casino", metadata={"url": "https://ok.org/c"}),
        Document(text="A forbidden   phrase? No: a Forbidden phrase.", id="phrase"),
        Document(text="Fine text without a link.", id="nourl"),
        Document(
            text="Fine text on a blocked site.", id="blocked", metadata={"url": "https://spam.example.com/x"}
        ),
    ]
    cfg = FilterConfig(
        steps=[
            {"type": "regex", "patterns": [r"\bcasino\b", r"\d{4}-\d{4}"], "ignore_case": True},
            {"type": "bad_words", "words_path": "bad.txt"},
            {"type": "url", "use_integrated_lists": False, "extra_domains": ["example.com"]},
        ]
    )
    m = run_filters(iter(docs), tmp_path / "run", cfg, base_dir=tmp_path)
    assert [s["dropped"] for s in m["steps"]] == [{"pattern_0": 1}, {"bad_words": 2}, {"domain": 1}]
    assert [d.id for d in iter_corpus(tmp_path / "run")] == ["clean", "nourl"]


def test_language_filter_with_a_local_fasttext_model(tmp_path: Path) -> None:
    fasttext = pytest.importorskip("fasttext")
    en = [
        "the cat sat on the mat and looked at the garden",
        "we walked to the market to buy bread and milk",
        "this is the house where my family has lived for years",
        "the weather today is cold and the wind is strong",
    ]
    fr = [
        "le chat est sur le tapis et regarde le jardin",
        "nous avons marché au marché pour acheter du pain",
        "c'est la maison où ma famille habite depuis des années",
        "le temps est froid aujourd'hui et le vent est fort",
    ]
    train = tmp_path / "train.txt"
    train.write_text(
        "".join(f"__label__en {s}\n" for s in en * 20) + "".join(f"__label__fr {s}\n" for s in fr * 20)
    )
    model = fasttext.train_supervised(str(train), epoch=30, lr=1.0, dim=16, minn=2, maxn=4, verbose=0, seed=0)
    model.save_model(str(tmp_path / "lid.bin"))

    docs = [
        Document(text="the cat and the garden are in the house", id="en"),
        Document(text="le chat et le jardin sont dans la maison", id="fr"),
    ]
    cfg = FilterConfig(steps=[{"type": "language", "model_path": "lid.bin", "language_threshold": 0.5}])
    m = run_filters(iter(docs), tmp_path / "run", cfg, base_dir=tmp_path)
    assert m["steps"][0]["dropped"] == {"language_fr": 1}
    kept = list(iter_corpus(tmp_path / "run"))
    assert [d.id for d in kept] == ["en"] and kept[0].metadata["language"] == "en"


def test_steps_needing_files_fail_at_validation() -> None:
    with pytest.raises(ValidationError, match="needs `model_path`: a local fastText"):
        FilterConfig(steps=[{"type": "language"}])
    with pytest.raises(ValidationError, match="needs `words_path`"):
        FilterConfig(steps=[{"type": "bad_words"}])
    with pytest.raises(ValidationError, match="model_path 'nope.bin' does not exist"):
        FilterConfig.model_validate(
            {"steps": [{"type": "language", "model_path": "nope.bin"}]}, context={"base_dir": "/"}
        )


def test_missing_file_fails_before_any_document_is_read(tmp_path: Path) -> None:
    def never() -> object:
        raise AssertionError("documents were read")
        yield

    cfg = FilterConfig(steps=[{"type": "bad_words", "words_path": "gone.txt"}])
    with pytest.raises(ConfigError, match="gone.txt"):
        run_filters(never(), tmp_path / "run", cfg, base_dir=tmp_path)


def test_config_rules() -> None:
    with pytest.raises(ValidationError, match="used twice"):
        FilterConfig(steps=[{"type": "gopher_quality"}, {"type": "gopher_quality"}])
    FilterConfig(
        steps=[{"type": "gopher_quality"}, {"type": "gopher_quality", "name": "strict", "min_doc_words": 100}]
    )
    with pytest.raises(ValidationError, match="not a valid regular expression"):
        FilterConfig(steps=[{"type": "regex", "patterns": ["(unclosed"]}])
    with pytest.raises(ValidationError, match="greater than max_words"):
        FilterConfig(steps=[{"type": "length", "min_words": 10, "max_words": 5}])
    with pytest.raises(ValidationError, match="extra"):
        FilterConfig(steps=[{"type": "gopher_quality", "min_words": 5}])
    with pytest.raises(ValidationError):
        FilterConfig(steps=[{"type": "perplexity"}])


def test_empty_input_and_everything_dropped(tmp_path: Path) -> None:
    cfg = FilterConfig(steps=[{"type": "length", "min_chars": 10_000}])
    with pytest.raises(InputError, match="no documents"):
        run_filters(iter([]), tmp_path / "a", cfg, base_dir=tmp_path)
    with pytest.raises(InputError, match="all 2 documents were dropped") as e:
        run_filters(iter([_prose(0), _prose(1)]), tmp_path / "b", cfg, base_dir=tmp_path)
    assert "length dropped 2" in e.value.message


def test_regex_tokenizer_splits_words_and_sentences() -> None:
    assert WORD_TOKENIZER.word_tokenize("It's a well-known fact... Isn't it?") == [
        "It's", "a", "well-known", "fact", "...", "Isn't", "it", "?"
    ]  # fmt: skip
    assert WORD_TOKENIZER.sent_tokenize("One. Two! Three?\nFour\n\nFive") == [
        "One.",
        "Two!",
        "Three?",
        "Four",
        "Five",
    ]


def test_workers_give_the_same_result(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from llmctl.data.synthetic import iter_documents

    monkeypatch.setattr(filters_mod, "PARALLEL_MIN_DOCS", 200)
    monkeypatch.setattr(filters_mod, "BATCH_SIZE", 50)

    def docs() -> list[Document]:
        return [Document(text=d["text"], id=d["id"]) for d in iter_documents(400, seed=3)]

    m1 = run_filters(iter(docs()), tmp_path / "w1", FilterConfig(workers=1), base_dir=tmp_path)
    m2 = run_filters(iter(docs()), tmp_path / "w2", FilterConfig(workers=2), base_dir=tmp_path)
    assert (m1["workers"], m2["workers"]) == (1, 2)
    strip = [{k: v for k, v in s.items() if k != "seconds"} for s in m1["steps"]]
    assert strip == [{k: v for k, v in s.items() if k != "seconds"} for s in m2["steps"]]
    assert [d.id for d in iter_corpus(tmp_path / "w1")] == [d.id for d in iter_corpus(tmp_path / "w2")]


def test_default_steps_on_synthetic_corpus(tmp_path: Path) -> None:
    from llmctl.config.data import DataConfig
    from llmctl.data.sources import read_sources
    from llmctl.data.synthetic import generate_corpus

    truth = generate_corpus(tmp_path / "raw", 2000, seed=0)
    data = DataConfig(sources=[{"path": "raw/docs.jsonl"}])
    m = run_filters(
        read_sources(data, tmp_path), tmp_path / "run", FilterConfig(workers=1), base_dir=tmp_path
    )
    kept = {d.id for d in iter_corpus(tmp_path / "run")}
    all_ids = [json.loads(line)["id"] for line in (tmp_path / "raw" / "docs.jsonl").open()]
    junk = set(truth.low_quality)
    clean = [i for i in all_ids if i not in junk]
    recall = sum(i not in kept for i in junk) / len(junk)
    survival = sum(i in kept for i in clean) / len(clean)
    assert len(junk) > 100
    assert recall >= 0.90, (recall, m["steps"])
    assert survival >= 0.97, (survival, m["steps"])


@pytest.mark.slow
def test_url_filter_with_bundled_block_lists(tmp_path: Path) -> None:
    # datatrove ships the lists in its package and extracts them into the HF assets cache: no network
    docs = [
        Document(text="fine", id="ok", metadata={"url": "https://en.wikipedia.org/wiki/Mill"}),
        Document(text="fine", id="adult", metadata={"url": "http://pornhub.com/x"}),
    ]
    m = run_filters(iter(docs), tmp_path / "run", FilterConfig(steps=[{"type": "url"}]), base_dir=tmp_path)
    assert m["steps"][0]["dropped"] == {"domain": 1}
