"""The `dedup` stage: read the project's data sources, drop exact and near duplicates.

Output artifact (kind corpus): documents/*.jsonl.gz (kept), removed.jsonl.gz (each removed id with
the id it duplicated), metrics (docs/bytes in and out, exact/near duplicates, cluster sizes, docs/s;
recall and false-positive rate when the sources have a truth.json, see llmctl.data.truth).
"""

from __future__ import annotations

from typing import Any

from llmctl.data.corpus import iter_corpus
from llmctl.data.dedup import removed_ids, run_dedup
from llmctl.data.sources import read_sources
from llmctl.data.truth import find_truth, score_dedup
from llmctl.errors import ConfigError
from llmctl.stages.context import StageContext


def run(ctx: StageContext) -> dict[str, Any]:
    if ctx.project.data is None:
        raise ConfigError("llmctl.yaml has no data.sources to deduplicate", hint="add a `data:` section")
    counters: dict[str, int] = {}
    documents = read_sources(ctx.project.data, ctx.project_dir, ctx.reporter, counters)
    metrics = run_dedup(documents, ctx.output_dir, ctx.config, ctx.reporter, ctx.scratch_dir)
    found = find_truth(ctx.project.data, ctx.project_dir)
    if found is not None:
        removed = list(removed_ids(ctx.output_dir))
        kept = (doc.id for doc in iter_corpus(ctx.output_dir))
        score = score_dedup(found[0], [*kept, *removed], removed)
        if score is not None:
            metrics["truth"] = score
            ctx.reporter.log(
                f"dedup vs {found[1][0].name}: recall {score['recall']} of {score['planted_duplicates']:,} "
                f"planted duplicates, false-positive rate {score['false_positive_rate']}"
            )
    return {**metrics, "source_files": counters.get("files", 0), **_skipped(counters)}


def _skipped(counters: dict[str, int]) -> dict[str, int]:
    return {f"source_{k}": v for k, v in counters.items() if k.startswith("skipped") and v}
