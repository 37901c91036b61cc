"""The synthetic corpus: deterministic by seed, sized as documented, truth consistent with the text."""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path

import pytest

from llmctl.data.synthetic import (
    LOW_QUALITY_KINDS,
    CorpusTruth,
    World,
    generate_corpus,
    iter_documents,
    word_ngram_jaccard,
    world_multiple_choice,
)
from llmctl.errors import InputError


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_same_seed_same_bytes_different_seed_different(tmp_path: Path) -> None:
    generate_corpus(tmp_path / "a", 400, seed=3)
    generate_corpus(tmp_path / "b", 400, seed=3)
    generate_corpus(tmp_path / "c", 400, seed=4)
    for name in ("docs.jsonl", "truth.json"):
        assert _digest(tmp_path / "a" / name) == _digest(tmp_path / "b" / name)
        assert _digest(tmp_path / "a" / name) != _digest(tmp_path / "c" / name)
    assert world_multiple_choice(3, 20) == world_multiple_choice(3, 20)
    assert world_multiple_choice(3, 20) != world_multiple_choice(4, 20)


def test_documents_and_truth(tmp_path: Path) -> None:
    truth = generate_corpus(tmp_path, 3000, seed=0)
    lines = (tmp_path / "docs.jsonl").read_text(encoding="utf-8").splitlines()
    docs = [json.loads(line) for line in lines]
    assert len(docs) == 3000
    assert all(set(d) == {"id", "text", "metadata"} for d in docs)
    assert len({d["id"] for d in docs}) == 3000
    by_id = {d["id"]: d["text"] for d in docs}
    order = {d["id"]: i for i, d in enumerate(docs)}

    assert CorpusTruth.load(tmp_path / "truth.json") == truth
    # every kind of planted document is there, at roughly the documented rates
    assert 0.015 * 3000 < len(truth.exact_duplicates) < 0.05 * 3000
    assert 0.03 * 3000 < len(truth.near_duplicates) < 0.08 * 3000
    assert set(truth.low_quality.values()) == set(LOW_QUALITY_KINDS)
    normalise = lambda t: " ".join(t.split())  # noqa: E731
    for dup, orig in truth.exact_duplicates.items():
        assert order[orig] < order[dup]
        assert normalise(by_id[dup]) == normalise(by_id[orig])
    for dup, orig in truth.near_duplicates.items():
        assert order[orig] < order[dup] and by_id[dup] != by_id[orig]
        # the MinHash S-curve at 14x8 catches >98% of pairs at this similarity
        assert word_ngram_jaccard(by_id[dup], by_id[orig]) >= 0.85
        assert truth.near_jaccard[dup] >= 0.85

    clean = [
        t for i, t in by_id.items() if i not in truth.low_quality and i not in truth.has_planted_duplicate()
    ]
    sizes = [len(t.encode()) for t in clean]
    assert min(sizes) >= 500 and max(sizes) <= 4000
    assert 1700 < sum(sizes) / len(sizes) < 2400
    # distinct clean documents are far from each other
    sample = clean[:150]
    worst = max(word_ngram_jaccard(a, b) for i, a in enumerate(sample) for b in sample[i + 1 :])
    assert worst < 0.3


def test_world_facts_repeat_and_mc_items_are_answerable() -> None:
    world = World.build(0)
    texts = [d["text"] for d in iter_documents(2000, seed=0)]
    corpus = "\n".join(texts)
    items = world_multiple_choice(0, 60)
    assert len({it["query"] for it in items}) == 60
    counts = Counter()
    for it in items:
        assert len(it["choices"]) == 4 and len(set(it["choices"])) == 4
        assert all(c.startswith(" ") for c in it["choices"])
        gold = it["query"] + it["choices"][it["gold"]]
        counts[gold] = corpus.count(gold)
        # distractors are never stated as facts in the canonical phrasing
        for j, c in enumerate(it["choices"]):
            if j != it["gold"]:
                assert it["query"] + c + "." not in corpus
    # the canonical statement of each probed fact appears in many documents
    assert min(counts.values()) >= 10, counts.most_common()[-5:]
    assert len(world.facts) >= 150
    # gold index is spread over positions (no position bias for a model to learn)
    assert len({it["gold"] for it in items}) == 4
    with pytest.raises(InputError):
        world_multiple_choice(0, 10_000)
