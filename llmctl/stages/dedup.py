"""The `dedup` stage: read the project's data sources, drop exact and near duplicates.

Output artifact (kind corpus): documents/*.jsonl.gz (kept), removed.jsonl.gz (each removed id with
the id it duplicated), metrics (docs/bytes in and out, exact/near duplicates, cluster sizes, docs/s).
"""

from __future__ import annotations

from typing import Any

from llmctl.data.dedup import run_dedup
from llmctl.data.sources import read_sources
from llmctl.errors import ConfigError
from llmctl.stages.context import StageContext


def run(ctx: StageContext) -> dict[str, Any]:
    if ctx.project.data is None:
        raise ConfigError("llmctl.yaml has no data.sources to deduplicate", hint="add a `data:` section")
    counters: dict[str, int] = {}
    documents = read_sources(ctx.project.data, ctx.project_dir, ctx.reporter, counters)
    metrics = run_dedup(documents, ctx.output_dir, ctx.config, ctx.reporter, ctx.scratch_dir)
    return {**metrics, "source_files": counters.get("files", 0), **_skipped(counters)}


def _skipped(counters: dict[str, int]) -> dict[str, int]:
    return {f"source_{k}": v for k, v in counters.items() if k.startswith("skipped") and v}
