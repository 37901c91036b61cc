"""`llmctl eval [TASKS...] --ckpt REF` and `llmctl eval compare REF REF...`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table
from rich.text import Text

from llmctl.cli.completion import complete_refs
from llmctl.cli.models import CkptOption
from llmctl.cli.options import ForceOption, JsonOption, SetOption, state_of
from llmctl.errors import UsageError


def _parse_minimums(items: list[str] | None) -> dict[str, float]:
    minimums = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        try:
            minimums[key.strip()] = float(value)
        except ValueError:
            sep = ""
        if not sep or not key.strip():
            raise UsageError(
                f"bad --min {item!r}: expected TASK=SCORE", hint="e.g. --min world_mc=0.5 --min mmlu/acc=0.3"
            )
    return minimums


def _render_results(results: dict[str, Any], failures: list[str]):
    def render(console) -> None:
        table = Table("task", "metric", "value", "± stderr", "n", "shots")
        for task, entry in results["tasks"].items():
            for metric, value in entry["metrics"].items():
                err = (entry.get("stderr") or {}).get(metric)
                table.add_row(
                    task,
                    metric,
                    f"{value:.4f}" if isinstance(value, float) else str(value),
                    f"{err:.4f}" if isinstance(err, float) else "",
                    str(entry.get("n", "")),
                    str(entry.get("shots", "")),
                )
        console.print(table)
        for line in failures:
            console.print(Text.assemble(("gate failed: ", "red"), line))

    return render


def _compare(ctx: typer.Context, refs: list[str], json_: bool) -> None:
    from llmctl.evals.evaluate import compare
    from llmctl.stages.runner import workspace_for

    if len(refs) < 1:
        raise UsageError(
            "eval compare needs eval artifact references", hint="llmctl eval compare eval:v1 eval:v2"
        )
    state = state_of(ctx)
    out = state.output(json_)
    config, folder = state.load_project()
    ws = workspace_for(config, folder)
    artifacts = [ws.resolve(ref, kinds=("eval",)) for ref in refs]
    rows = compare(artifacts)

    def render(console) -> None:
        labels = [a.id for a in artifacts]
        table = Table("metric", *labels)
        for row in rows:
            table.add_row(
                row["metric"], *(f"{row[x]:.4f}" if isinstance(row[x], float) else "-" for x in labels)
            )
        console.print(table)

    out.result(rows, render)


def eval_(
    ctx: typer.Context,
    tasks: Annotated[
        list[str] | None,
        typer.Argument(
            help="Tasks (mmlu, hellaswag, arc_easy, ..., perplexity, world_mc, custom names); "
            "default: eval.tasks. `compare REF REF...` compares eval artifacts."
        ),
    ] = None,
    ckpt: CkptOption = "latest",
    data: Annotated[
        str | None,
        typer.Option(
            "--data",
            help="Tokens artifact for perplexity (default: the newest tokenize).",
            autocompletion=complete_refs(("tokens",)),
        ),
    ] = None,
    limit: Annotated[int | None, typer.Option("--limit", help="At most N items per task.")] = None,
    shots: Annotated[int | None, typer.Option("--shots", help="Few-shot examples (mmlu, gsm8k).")] = None,
    batch_size: Annotated[
        int | None, typer.Option("--batch-size", help="Sequences per forward pass.")
    ] = None,
    data_dir: Annotated[
        Path | None,
        typer.Option(
            "--data-dir", help="Local task data (hub or original layout), or a text file for perplexity."
        ),
    ] = None,
    minimum: Annotated[
        list[str] | None,
        typer.Option("--min", help="Gate: exit 1 when TASK (or TASK/METRIC) scores below SCORE. Repeatable."),
    ] = None,
    seed: Annotated[int | None, typer.Option("--seed", help="Few-shot sampling seed.")] = None,
    force: ForceOption = False,
    sets: SetOption = None,
    json_: JsonOption = False,
) -> None:
    """Evaluate a model: lm-evaluation-harness-compatible benchmarks, custom tasks, perplexity.

    [bold]Examples[/]
      llmctl eval mmlu --ckpt latest --data-dir ~/data/mmlu --shots 5
      llmctl eval hellaswag arc_easy --ckpt import:latest --limit 300
      llmctl eval --min world_mc=0.4          # a CI gate: exit 1 below the score
      llmctl eval compare eval:v1 eval:v2
    """
    from llmctl.cli.models import plain_model_folder
    from llmctl.evals.evaluate import check_thresholds, load_results

    if tasks and tasks[0] == "compare":
        _compare(ctx, tasks[1:], json_)
        return
    minimums = _parse_minimums(minimum)
    options: dict[str, Any] = {
        key: value
        for key, value in {
            "tasks": list(tasks) if tasks else None,
            "limit": limit,
            "shots": shots,
            "batch_size": batch_size,
            "data_dir": str(data_dir.expanduser().resolve()) if data_dir else None,
            "seed": seed,
        }.items()
        if value is not None
    }
    state = state_of(ctx)
    out = state.output(json_)
    plain = plain_model_folder(ckpt)
    if plain is not None:
        # A plain HF model folder: evaluate it directly; there is no artifact to publish.
        from llmctl.config.eval import EvalConfig
        from llmctl.stages.eval import evaluate_folder

        results = evaluate_folder(plain, EvalConfig(), options, reporter=out.reporter())
        artifact_id = None
    else:
        from llmctl.stages.runner import run_stage

        config, folder = state.load_project(sets)
        outcome = run_stage(
            "eval",
            config,
            folder,
            refs={"model": ckpt, **({"data": data} if data else {})},
            force=force,
            reporter=out.reporter(),
            options=options,
        )
        results = load_results(outcome.artifact.path)
        artifact_id = outcome.artifact.id
    failures = check_thresholds(results, minimums) if minimums else []
    out.result(
        {"artifact": artifact_id, **results, "gate_failures": failures}, _render_results(results, failures)
    )
    if failures:
        raise typer.Exit(code=1)


def register(app: typer.Typer) -> None:
    app.command("eval")(eval_)
