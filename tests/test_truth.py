"""Dedup and filter scored against the synthetic corpus's truth.json: the arithmetic, and the real stages."""

from __future__ import annotations

import json
import shutil

import pytest
from conftest import run_cli, write_project

from llmctl.config.data import DataConfig
from llmctl.data.synthetic import generate_corpus
from llmctl.data.truth import find_truth, score_dedup, score_filter


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    folder = tmp_path_factory.mktemp("truth")
    truth = generate_corpus(folder, n_docs=400, seed=4)
    ids = [json.loads(line)["id"] for line in (folder / "docs.jsonl").read_text().splitlines()]
    return folder, truth, ids


def test_dedup_score_counts_planted_and_innocent_removals(planted):
    _, truth, ids = planted
    dups = {**truth.exact_duplicates, **truth.near_duplicates}
    originals = set(dups.values())
    clean = [d for d in ids if d not in dups and d not in originals]
    missed = sorted(truth.near_duplicates)[0]
    removed = [d for d in dups if d != missed] + clean[:3]
    score = score_dedup(truth, ids, removed)
    assert score["planted_duplicates"] == len(dups) and score["planted_removed"] == len(dups) - 1
    assert score["recall"] == round((len(dups) - 1) / len(dups), 4)
    assert score["recall_by_kind"]["exact"] == 1.0 and score["recall_by_kind"]["near"] < 1.0
    assert score["non_duplicates"] == len(clean) and score["non_duplicates_removed"] == 3
    assert score["false_positive_rate"] == round(3 / len(clean), 4)
    # an original removed in place of its copy is neither a hit nor a false positive
    assert score_dedup(truth, ids, [next(iter(originals))])["non_duplicates_removed"] == 0


def test_filter_score_counts_junk_caught_and_clean_dropped(planted):
    _, truth, ids = planted
    junk = sorted(truth.low_quality)
    clean = [d for d in ids if d not in truth.low_quality]
    kept = [junk[0], *clean[2:]]  # one junk document slipped through, two clean ones were dropped
    score = score_filter(truth, ids, kept)
    assert (score["planted_junk"], score["junk_dropped"]) == (len(junk), len(junk) - 1)
    assert score["recall"] == round((len(junk) - 1) / len(junk), 4)
    assert (score["clean"], score["clean_dropped"]) == (len(clean), 2)
    assert score["false_positive_rate"] == round(2 / len(clean), 4)
    assert min(score["recall_by_kind"].values()) < 1.0 and set(score["recall_by_kind"]) <= set(
        truth.low_quality.values()
    )


def test_unrelated_ids_are_not_scored(planted):
    _, truth, _ = planted
    assert score_dedup(truth, ["a", "b"], ["b"]) is None
    assert score_filter(truth, ["a", "b"], ["a"]) is None


def test_truth_is_found_beside_every_local_source_or_not_at_all(planted, tmp_path):
    folder, truth, _ = planted
    found = find_truth(DataConfig(sources=[{"path": "docs.jsonl"}]), folder)
    assert found is not None and found[0].low_quality == truth.low_quality
    assert find_truth(DataConfig(sources=[{"path": "*.jsonl"}]), folder) is not None
    (tmp_path / "other.jsonl").write_text('{"text": "x"}\n')
    mixed = DataConfig(
        sources=[{"path": str(folder / "docs.jsonl")}, {"path": str(tmp_path / "other.jsonl")}]
    )
    assert find_truth(mixed, tmp_path) is None


def test_dedup_and_filter_report_recall_and_false_positives(corpus_project):
    dedup = run_cli("dedup", "--json", cwd=corpus_project)
    assert dedup.code == 0, dedup.stderr
    score = dedup.json()["metrics"]["truth"]
    assert score["planted_duplicates"] > 0 and score["recall"] >= 0.95
    assert score["false_positive_rate"] <= 0.01
    assert "dedup vs truth.json: recall" in dedup.stderr
    filtered = run_cli("filter", "--json", cwd=corpus_project)
    assert filtered.code == 0, filtered.stderr
    score = filtered.json()["metrics"]["truth"]
    assert score["planted_junk"] > 0 and score["recall"] >= 0.95
    assert score["clean"] == filtered.json()["metrics"]["documents_in"] - score["planted_junk"]
    assert score["false_positive_rate"] <= 0.01


def test_no_truth_no_score(tmp_path, small_corpus):
    shutil.copy(small_corpus / "docs.jsonl", tmp_path / "docs.jsonl")
    project = write_project(tmp_path / "p", f"data:\n  sources:\n    - path: {tmp_path / 'docs.jsonl'}\n")
    result = run_cli("dedup", "--json", cwd=project)
    assert result.code == 0, result.stderr
    assert "truth" not in result.json()["metrics"]
