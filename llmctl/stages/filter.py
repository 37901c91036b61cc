"""The `filter` stage: datatrove quality filters over the deduplicated corpus (or the raw sources).

Output artifact (kind corpus): documents/*.jsonl.gz (kept), excluded/<step>/*.jsonl.gz (dropped, with
metadata.filter_reason), metrics with per-step, per-reason drop counts (and recall and false-positive
rate when the sources have a truth.json, see llmctl.data.truth).
"""

from __future__ import annotations

from typing import Any

from llmctl.data.corpus import iter_corpus
from llmctl.data.filters import run_filters
from llmctl.data.sources import read_sources
from llmctl.data.truth import find_truth, score_filter
from llmctl.errors import ConfigError
from llmctl.stages.context import StageContext


def run(ctx: StageContext) -> dict[str, Any]:
    corpus = ctx.inputs.get("corpus")
    if corpus is not None:
        documents = iter_corpus(corpus.path)
    elif ctx.project.data is not None:
        ctx.note("filter: no dedup artifact; reading data.sources directly")
        documents = read_sources(ctx.project.data, ctx.project_dir, ctx.reporter)
    else:
        raise ConfigError(
            "nothing to filter: no dedup artifact and no data.sources", hint="run `llmctl dedup`"
        )
    metrics = run_filters(documents, ctx.output_dir, ctx.config, ctx.reporter, ctx.project_dir)
    found = find_truth(ctx.project.data, ctx.project_dir)
    if found is not None:
        seen = (
            iter_corpus(corpus.path)
            if corpus is not None
            else read_sources(ctx.project.data, ctx.project_dir)
        )
        score = score_filter(found[0], (d.id for d in seen), (d.id for d in iter_corpus(ctx.output_dir)))
        if score is not None:
            metrics["truth"] = score
            ctx.reporter.log(
                f"filter vs {found[1][0].name}: recall {score['recall']} of {score['planted_junk']:,} "
                f"planted junk documents, false-positive rate {score['false_positive_rate']}"
            )
    return metrics
