"""`llmctl eval [TASKS...] --ckpt REF` and `llmctl eval compare REF REF...`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table
from rich.text import Text

from llmctl.cli.completion import complete_refs
from llmctl.cli.models import CkptOption, Threads
from llmctl.cli.options import ForceOption, JsonOption, SetOption, state_of
from llmctl.errors import UsageError


def parse_minimums(items: list[str] | None) -> dict[str, float]:
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


def _number(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else ("" if value is None else str(value))


def _render_results(results: dict[str, Any], failures: list[str]):
    """One row per task and metric; chat tasks scored beside their base model get its value and the
    paired difference in extra columns (their base_* metrics are not repeated as rows)."""

    def render(console) -> None:
        with_base = any("vs_base" in entry for entry in results["tasks"].values())
        columns: list[str | Text] = ["task", "metric", "value", "± stderr"]
        if with_base:  # the model name is data, not markup
            columns += [Text(f"base\n{results.get('base_model') or ''}"), "± stderr", "Δ vs base ± stderr"]
        table = Table()
        for header in (*columns, "n", "shots"):
            table.add_column(header)
        for task, entry in results["tasks"].items():
            metrics, stderr = entry["metrics"], entry.get("stderr") or {}
            vs_base = entry.get("vs_base") or {}
            for metric, value in metrics.items():
                if metric.startswith("base_") and metric.removeprefix("base_") in vs_base:
                    continue
                cells: list[str | Text] = [Text(task), metric, _number(value), _number(stderr.get(metric))]
                if with_base:
                    diff = vs_base.get(metric)
                    cells += [
                        _number(metrics.get(f"base_{metric}")),
                        _number(stderr.get(f"base_{metric}")),
                        f"{diff['delta']:+.4f} ± {_number(diff['stderr'])}" if diff else "",
                    ]
                table.add_row(*cells, str(entry.get("n", "")), str(entry.get("shots", "")))
                clean = entry.get("decontamination")
                if clean is not None and metric in clean["metrics"]:
                    cells = [Text(task), f"{metric} (clean)", _number(clean["metrics"][metric])]
                    cells.append(_number(clean["stderr"].get(metric)))
                    cells += [""] * (len(columns) - len(cells))
                    table.add_row(*cells, str(clean["clean_n"]), str(entry.get("shots", "")))
        console.print(table)
        for task, entry in results["tasks"].items():
            if (d := entry.get("decontamination")) is not None:
                console.print(
                    f"{task}: {d['contaminated']} of {entry['n']} items found in the training documents "
                    f"({d['unchecked']} too short to check); clean subset: {d['clean_n']} items"
                )
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
    compared = compare(artifacts)

    def render(console) -> None:
        def number(value, signed: bool = False) -> str:
            return (f"{value:+.4f}" if signed else f"{value:.4f}") if isinstance(value, float) else "-"

        first = compared["evals"][0]["eval"]
        table = Table("metric")
        for i, e in enumerate(compared["evals"]):
            # Each eval's column is headed by the model it scored; later ones get a delta vs the first.
            table.add_column(f"{e['eval']}\n{e['model'] or '?'}", justify="right")
            if i:
                table.add_column(f"Δ vs {first}", justify="right")
        for row in compared["rows"]:
            cells = [row["metric"]]
            for i, e in enumerate(compared["evals"]):
                cells.append(number(row["values"][e["eval"]]))
                if i:
                    cells.append(number(row["delta"][e["eval"]], signed=True))
            table.add_row(*cells)
        console.print(table)

    out.result(compared, render)


def eval_(
    ctx: typer.Context,
    tasks: Annotated[
        list[str] | None,
        typer.Argument(
            help="Tasks (mmlu, hellaswag, arc_easy, ..., perplexity, world_mc, world_chat, custom names); "
            "default: eval.tasks. `compare REF REF...` compares eval artifacts."
        ),
    ] = None,
    ckpt: CkptOption = None,  # eval.model, else latest
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
        int | None,
        typer.Option("--batch-size", help="Prompts per generation batch (gsm8k, generative tasks)."),
    ] = None,
    batch_tokens: Annotated[
        int | None,
        typer.Option(
            "--batch-tokens", help="Tokens per scoring forward pass, padding included (default 4096)."
        ),
    ] = None,
    log_samples: Annotated[
        bool,
        typer.Option(
            "--log-samples",
            help="Keep every item in samples/TASK.jsonl (default: the first eval.samples_to_keep).",
        ),
    ] = False,
    data_dir: Annotated[
        Path | None,
        typer.Option(
            "--data-dir",
            help="Local task data: a folder (hub or original-release layout, or one hub-schema file per "
            "split), one .jsonl/.parquet/.csv file, or a text file for perplexity.",
        ),
    ] = None,
    minimum: Annotated[
        list[str] | None,
        typer.Option("--min", help="Gate: exit 1 when TASK (or TASK/METRIC) scores below SCORE. Repeatable."),
    ] = None,
    seed: Annotated[int | None, typer.Option("--seed", help="Few-shot sampling seed.")] = None,
    base: Annotated[
        bool | None,
        typer.Option(
            "--base/--no-base",
            help="Chat tasks also score the model it was fine-tuned from, asked the same way "
            "(default: eval.base, on).",
        ),
    ] = None,
    decontaminate: Annotated[
        bool | None,
        typer.Option(
            "--decontaminate/--no-decontaminate",
            help="Check items against the model's training documents (13-gram overlap, through lineage); "
            "report items found and scores on the clean rest (default: eval.decontaminate, off).",
        ),
    ] = None,
    threads: Threads = None,
    force: ForceOption = False,
    sets: SetOption = None,
    json_: JsonOption = False,
) -> None:
    """Evaluate a model: lm-evaluation-harness-compatible benchmarks, custom tasks, perplexity.

    The model: --ckpt, else eval.model, else the newest model in pipeline order (the last training
    stage that has one; an imported model only while no stage trained one).

    [bold]Examples[/]
      llmctl eval mmlu --ckpt latest --data-dir ~/data/mmlu --shots 5
      llmctl eval hellaswag arc_easy --ckpt import:latest --limit 300
      llmctl eval --min world_mc=0.4          # a CI gate: exit 1 below the score
      llmctl eval world_chat --ckpt sft:latest # chat answers, beside the base model's
      llmctl eval arc_easy --decontaminate     # + items found in the training data, clean-subset scores
      llmctl eval compare eval:v1 eval:v2
    """
    from llmctl.cli.models import plain_model_folder
    from llmctl.evals.evaluate import check_thresholds, load_results

    if tasks and tasks[0] == "compare":
        _compare(ctx, tasks[1:], json_)
        return
    minimums = parse_minimums(minimum)
    if threads is not None:
        from llmctl.threads import set_thread_budget

        set_thread_budget(threads)  # this process's ceiling; evaluation uses it (capped at the cores)
    options: dict[str, Any] = {
        key: value
        for key, value in {
            "tasks": list(tasks) if tasks else None,
            "limit": limit,
            "shots": shots,
            "batch_size": batch_size,
            "batch_tokens": batch_tokens,
            "log_samples": log_samples or None,
            "data_dir": str(data_dir.expanduser().resolve()) if data_dir else None,
            "seed": seed,
            "base": base,
            "decontaminate": decontaminate,
        }.items()
        if value is not None
    }
    state = state_of(ctx)
    out = state.output(json_)
    plain = plain_model_folder(ckpt) if ckpt else None
    if plain is not None:
        # A plain HF model folder: evaluate it directly; there is no artifact to publish.
        from llmctl.config.eval import EvalConfig
        from llmctl.stages.eval import evaluate_folder

        if decontaminate:
            out.reporter().log(
                f"decontamination: {plain} is not an artifact, so it has no lineage; not checked"
            )
        results = evaluate_folder(plain, EvalConfig(), options, reporter=out.reporter())
        artifact_id = None
    else:
        from llmctl.stages.runner import run_stage, workspace_for

        config, folder = state.load_project(sets)
        # Say which model `latest` (or any reference) is, and evaluate exactly that one.
        if ckpt:
            ref, source = ckpt, f"--ckpt {ckpt}"
        elif config.eval.model:
            ref, source = config.eval.model, f"eval.model: {config.eval.model}"
        else:
            ref, source = "latest", "newest model"
        model = workspace_for(config, folder).resolve(ref, kinds=("model",))
        out.reporter().log(f"model: {model.id} ({source})")
        outcome = run_stage(
            "eval",
            config,
            folder,
            refs={"model": model.id, **({"data": data} if data else {})},
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
