"""Score dedup and filter against a corpus's ground truth, when the corpus has one.

A synthetic corpus (`llmctl.data.synthetic`, what `llmctl init` makes) writes `truth.json` beside
`docs.jsonl`: which documents are planted duplicates (and of what) and which are planted junk. When
every local source of the project has such a file beside it, the dedup and filter stages add a
`truth` block to their metrics:

    dedup:  recall = planted duplicates removed / planted duplicates (also per kind: exact, near);
            false_positive_rate = documents removed that are neither a planted duplicate nor the
            original of one / those documents
    filter: recall = planted junk dropped / planted junk in the filter's input (also per kind);
            false_positive_rate = clean documents dropped / clean documents in the input

Only documents that reached the stage count (a source `limit`, or dedup before filter, shrink the
sets), and nothing is scored when the corpus ids do not match the truth's (e.g. another `id_key`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from llmctl.config.data import DataConfig
from llmctl.data.synthetic import CorpusTruth

TRUTH_FILE = "truth.json"


def find_truth(cfg: DataConfig | None, base_dir: Path) -> tuple[CorpusTruth, list[Path]] | None:
    """The merged truth of the data sources and the files it came from, or None unless every source
    is local and has a truth.json beside it (a partial truth would score real data as clean)."""
    if cfg is None:
        return None
    files: list[Path] = []
    for source in cfg.sources:
        if source.is_hub:
            return None
        path = Path(source.path).expanduser()
        path = path if path.is_absolute() else Path(base_dir) / path
        folder = path if path.is_dir() else path.parent
        while any(ch in folder.name for ch in "*?["):  # a glob: look beside the files it matches
            folder = folder.parent
        truth_file = folder / TRUTH_FILE
        if not truth_file.is_file():
            return None
        if truth_file not in files:
            files.append(truth_file)
    truths = [CorpusTruth.load(f) for f in files]
    merged = CorpusTruth(seed=truths[0].seed, n_docs=sum(t.n_docs for t in truths))
    for t in truths:
        merged.exact_duplicates.update(t.exact_duplicates)
        merged.near_duplicates.update(t.near_duplicates)
        merged.near_jaccard.update(t.near_jaccard)
        merged.low_quality.update(t.low_quality)
    return merged, files


def _mentioned(truth: CorpusTruth) -> set[str]:
    dups = {**truth.exact_duplicates, **truth.near_duplicates}
    return set(dups) | set(dups.values()) | set(truth.low_quality)


def _rate(part: int, whole: int) -> float | None:
    return round(part / whole, 4) if whole else None


def score_dedup(
    truth: CorpusTruth, input_ids: Iterable[str], removed_ids: Iterable[str]
) -> dict[str, Any] | None:
    """Recall and false-positive rate of a dedup run (see the module docstring); None if no truth id
    is among the input."""
    seen = set(input_ids)
    removed = set(removed_ids) & seen
    kinds = {"exact": truth.exact_duplicates, "near": truth.near_duplicates}
    planted = {kind: {d for d in dups if d in seen} for kind, dups in kinds.items()}
    all_planted = planted["exact"] | planted["near"]
    if not seen & _mentioned(truth):
        return None
    originals = {o for dups in kinds.values() for d, o in dups.items() if d in seen}
    clean = seen - all_planted - originals
    wrongly = removed & clean
    return {
        "planted_duplicates": len(all_planted),
        "planted_removed": len(removed & all_planted),
        "recall": _rate(len(removed & all_planted), len(all_planted)),
        "recall_by_kind": {k: _rate(len(removed & ids), len(ids)) for k, ids in planted.items()},
        "non_duplicates": len(clean),
        "non_duplicates_removed": len(wrongly),
        "false_positive_rate": _rate(len(wrongly), len(clean)),
    }


def score_filter(
    truth: CorpusTruth, input_ids: Iterable[str], kept_ids: Iterable[str]
) -> dict[str, Any] | None:
    """Recall and false-positive rate of a filter run (see the module docstring); None if no truth id
    is among the input."""
    seen = set(input_ids)
    if not seen & _mentioned(truth):
        return None
    dropped = seen - set(kept_ids)
    junk = {d for d in truth.low_quality if d in seen}
    clean = seen - junk
    by_kind = Counter(truth.low_quality[d] for d in junk)
    caught = Counter(truth.low_quality[d] for d in junk & dropped)
    return {
        "planted_junk": len(junk),
        "junk_dropped": len(junk & dropped),
        "recall": _rate(len(junk & dropped), len(junk)),
        "recall_by_kind": {k: _rate(caught[k], n) for k, n in sorted(by_kind.items())},
        "clean": len(clean),
        "clean_dropped": len(clean & dropped),
        "false_positive_rate": _rate(len(clean & dropped), len(clean)),
    }
