"""The eval stage: score a model artifact on benchmark, custom and synthetic tasks.

Inputs: `model` (any model artifact; its folder is an HF-Llama model with its tokenizer) and,
optionally, `data` (a tokens artifact whose val split perplexity is measured on). Options from the
command line (`ctx.options`: tasks, limit, shots, batch_size, batch_tokens, data_dir, seed,
log_samples, base) override the `eval:` section. Output: results.json and samples/<task>.jsonl (see
llmctl.evals.evaluate); returns the flattened scores ("task/metric") for the manifest.

Chat tasks also score the model's base model, found in the model's manifest: its `model` input (what
sft records as its starting point). It is not an input of eval: the model artifact pins it already.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from llmctl.config.eval import EvalConfig
from llmctl.errors import LlmctlError
from llmctl.evals.data import DATA_SUFFIXES
from llmctl.evals.evaluate import RESULTS_FILE, evaluate, flat_metrics
from llmctl.reporting import Reporter
from llmctl.stages.context import StageContext
from llmctl.workspace.store import Artifact, Workspace


def run(ctx: StageContext) -> dict[str, Any]:
    model = ctx.inputs["model"]
    assert model is not None, "the runner resolves the model input"
    tokens = ctx.inputs.get("data")
    base = None
    if _wants_base(ctx.config, ctx.options):
        base = base_model_of(model, ctx.workspace, ctx.reporter)
    results = evaluate_folder(
        model.path,
        ctx.config,
        ctx.options,
        tokens_path=tokens.path if tokens is not None else None,
        project_dir=ctx.project_dir,
        out_dir=ctx.output_dir,
        reporter=ctx.reporter,
        base=base,
    )
    results["model"] = ctx.input_ids.get("model", model.id)  # copy:<hash> for a copy given by path
    if tokens is not None:
        results["tasks"].get("perplexity", {})["source"] = ctx.input_ids.get("data", tokens.id)
    (ctx.output_dir / RESULTS_FILE).write_text(json.dumps(results, indent=2) + "\n")
    return flat_metrics(results)


def _wants_base(cfg: EvalConfig, opts: dict[str, Any]) -> bool:
    from llmctl.evals.tasks import TASKS

    tasks = list(opts.get("tasks") or cfg.tasks)
    chat = any(t in TASKS and TASKS[t].kind == "chat" for t in tasks) or any(
        c.type == "chat" and c.name in tasks for c in cfg.custom
    )
    return chat and bool(opts.get("base", cfg.base))


def base_model_of(model: Artifact, workspace: Workspace, reporter: Reporter) -> tuple[Path, str] | None:
    """(folder, id) of the model `model` was trained from (its manifest's `model` input), or None
    when it has none; a base that is gone or changed is reported and skipped, not an error."""
    record = next((i for i in model.manifest.inputs if i.slot == "model"), None)
    if record is None:
        return None
    if not workspace.is_member(model):
        # A copy from another workspace: its input ids name that workspace's artifacts, not ours.
        reporter.log(f"base model {record.id}: {model.path} is not in this workspace; scoring without it")
        return None
    if record.path is not None:  # the base was given by path
        folder = Path(record.path)
        if (folder / "config.json").is_file():
            return folder, record.id
        reporter.log(f"base model {record.id}: {folder} is gone; scoring without it")
        return None
    try:
        base = workspace.resolve(record.id, kinds=("model",))
    except LlmctlError as e:
        reporter.log(f"base model {record.id}: {e}; scoring without it")
        return None
    if base.manifest_sha256() != record.manifest_sha256:
        reporter.log(
            f"base model {record.id}: not the artifact {model.id} was trained from; scoring without it"
        )
        return None
    return base.path, base.id


def evaluate_folder(
    model_path: Path,
    cfg: EvalConfig,
    opts: dict[str, Any],
    *,
    tokens_path: Path | None = None,
    project_dir: Path | None = None,
    out_dir: Path | None = None,
    reporter: Reporter | None = None,
    base: tuple[Path, str] | None = None,
) -> dict[str, Any]:
    """Evaluate a model folder with the `eval:` section overridden by command-line options; used by
    the stage and, for a plain HF folder that is no artifact, directly by the CLI. `base` (folder, id)
    is scored beside it on chat tasks."""
    data_dir = opts.get("data_dir") or cfg.data_dir
    data_dir = Path(data_dir) if data_dir else None
    if data_dir is not None and not data_dir.is_absolute() and project_dir is not None:
        data_dir = project_dir / data_dir
    perplexity_data = tokens_path
    # `--data-dir notes.txt`: perplexity on a text file; a .jsonl/.parquet/... file is task data.
    text_file = data_dir is not None and data_dir.is_file() and data_dir.suffix.lower() not in DATA_SUFFIXES
    if perplexity_data is None and text_file:
        perplexity_data = data_dir
    tasks = list(opts.get("tasks") or cfg.tasks)
    shots = dict(cfg.shots)
    if opts.get("shots") is not None:  # --shots K applies to every task run now
        shots.update({t: int(opts["shots"]) for t in tasks})
    return evaluate(
        model_path,
        tasks,
        limit=opts.get("limit") or cfg.limit,
        shots=shots,
        batch_size=opts.get("batch_size") or cfg.batch_size,
        batch_tokens=opts.get("batch_tokens") or cfg.batch_tokens,
        data_dir=None if text_file else data_dir,
        custom=[c.model_dump() for c in cfg.custom],
        samples_to_keep=None if opts.get("log_samples") or cfg.log_samples else cfg.samples_to_keep,
        seed=opts.get("seed") if opts.get("seed") is not None else cfg.seed,
        max_gen_tokens=cfg.max_gen_tokens,
        chat_max_gen_tokens=cfg.chat_max_gen_tokens,
        base=base[0] if base is not None else None,
        base_name=base[1] if base is not None else None,
        perplexity_data=perplexity_data,
        project_dir=project_dir,
        world_seed=cfg.world_seed,
        world_items=cfg.world_items,
        out_dir=out_dir,
        reporter=reporter,
    )
