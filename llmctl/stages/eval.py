"""The eval stage: score a model artifact on benchmark, custom and synthetic tasks.

Inputs: `model` (any model artifact; its folder is an HF-Llama model with its tokenizer) and,
optionally, `data` (a tokens artifact whose val split perplexity is measured on). Options from the
command line (`ctx.options`: tasks, limit, shots, batch_size, data_dir, seed) override the `eval:`
section. Output: results.json and samples/<task>.jsonl (see llmctl.evals.evaluate); returns the
flattened scores ("task/metric") for the manifest.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from llmctl.evals.evaluate import RESULTS_FILE, evaluate, flat_metrics
from llmctl.stages.context import StageContext


def run(ctx: StageContext) -> dict[str, Any]:
    cfg, opts = ctx.config, ctx.options
    model = ctx.inputs["model"]
    assert model is not None, "the runner resolves the model input"
    tokens = ctx.inputs.get("data")
    data_dir = opts.get("data_dir") or cfg.data_dir
    data_dir = Path(data_dir) if data_dir else None
    if data_dir is not None and not data_dir.is_absolute():
        data_dir = ctx.project_dir / data_dir
    perplexity_data = tokens.path if tokens is not None else None
    if perplexity_data is None and data_dir is not None and data_dir.is_file():
        perplexity_data = data_dir  # `--data-dir notes.txt`: perplexity on a text file
    shots = dict(cfg.shots)
    if opts.get("shots") is not None:  # --shots K applies to every task run now
        tasks_now = opts.get("tasks") or cfg.tasks
        shots.update({t: int(opts["shots"]) for t in tasks_now})
    results = evaluate(
        model.path,
        list(opts.get("tasks") or cfg.tasks),
        limit=opts.get("limit") or cfg.limit,
        shots=shots,
        batch_size=opts.get("batch_size") or cfg.batch_size,
        data_dir=data_dir if data_dir is None or data_dir.is_dir() else None,
        custom=[c.model_dump() for c in cfg.custom],
        samples_to_keep=cfg.samples_to_keep,
        seed=opts.get("seed") if opts.get("seed") is not None else cfg.seed,
        max_gen_tokens=cfg.max_gen_tokens,
        perplexity_data=perplexity_data,
        project_dir=ctx.project_dir,
        world_seed=cfg.world_seed,
        world_items=cfg.world_items,
        out_dir=ctx.output_dir,
        reporter=ctx.reporter,
    )
    results["model"] = model.id
    if tokens is not None:
        results["tasks"].get("perplexity", {})["source"] = tokens.id
    (ctx.output_dir / RESULTS_FILE).write_text(json.dumps(results, indent=2) + "\n")
    return flat_metrics(results)
