"""`llmctl quantize`: shrink a model, score it against its source, gate on what it cost."""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.table import Table
from rich.text import Text

from llmctl.cli.completion import complete_refs
from llmctl.cli.evals import parse_minimums
from llmctl.cli.options import ForceOption, JsonOption, SetOption, model_option, state_of
from llmctl.cli.pipeline import outcome_row


def quantize(
    ctx: typer.Context,
    model: model_option(
        "Model artifact to quantize (default: quantize.model, else the newest model made before it)."
    ) = None,
    data: Annotated[
        str | None,
        typer.Option(
            "--data",
            help="Tokens artifact: val split for perplexity, train split for GPTQ calibration "
            "(default: the newest tokenize).",
            autocompletion=complete_refs(("tokens",)),
        ),
    ] = None,
    format_: Annotated[
        str | None,
        typer.Option("--format", help="compressed-tensors (default: quantize.format) or gguf."),
    ] = None,
    type_: Annotated[
        str | None,
        typer.Option("--type", help="GGUF type with --format gguf: f16, q8_0, q4_0 (K-quants if available)."),
    ] = None,
    max_ppl_increase: Annotated[
        float | None,
        typer.Option(
            "--max-ppl-increase", help="Gate: exit 1 when perplexity rises by more than PCT percent."
        ),
    ] = None,
    minimum: Annotated[
        list[str] | None,
        typer.Option(
            "--min",
            help="Gate: exit 1 when the quantized model's TASK (or TASK/METRIC) scores below SCORE. Repeatable.",
        ),
    ] = None,
    force: ForceOption = False,
    sets: SetOption = None,
    json_: JsonOption = False,
) -> None:
    """Quantize a model's weights (int8 or int4, round-to-nearest or GPTQ) and score it against its source.

    The artifact is an HF model folder in compressed-tensors' pack-quantized format (transformers and vLLM load it; llmctl generate/chat/eval decode it with int8/int4 kernels), or a GGUF file.

    [bold]Examples[/]
      llmctl quantize --max-ppl-increase 1
      llmctl quantize --set quantize.bits=4 --set quantize.method=gptq --min world_mc=0.4
      llmctl quantize --model import:latest --set quantize.text=notes.txt
      llmctl quantize --format gguf --type q8_0
    """
    from llmctl.errors import UsageError
    from llmctl.stages.quantize import gate_failures
    from llmctl.stages.runner import run_stage

    if format_ is not None and format_ not in ("compressed-tensors", "gguf"):
        raise UsageError(f"--format {format_!r}: expected compressed-tensors or gguf")
    if type_ is not None:
        format_ = format_ or "gguf"
    minimums = parse_minimums(minimum)
    state = state_of(ctx)
    out = state.output(json_)
    config, folder = state.load_project(sets)
    options = {k: v for k, v in {"format": format_, "gguf_type": type_}.items() if v is not None}
    outcome = run_stage(
        "quantize",
        config,
        folder,
        refs={k: v for k, v in {"model": model, "data": data}.items() if v},
        force=force,
        reporter=out.reporter(),
        options=options,
    )
    row = outcome_row(outcome)
    limit = max_ppl_increase if max_ppl_increase is not None else config.quantize.max_ppl_increase
    failures = gate_failures(row["metrics"], limit, {**config.quantize.min, **minimums})
    out.result({**row, "gate_failures": failures}, _render(row, failures))
    if failures:
        raise typer.Exit(code=1)


def _render(row: dict[str, Any], failures: list[str]):
    """Scores source | quantized | delta, then the size and speed table, then failed gates."""

    def render(console) -> None:
        metrics = row["metrics"]
        status = "up to date" if row["reused"] else f"published in {row['seconds']:.1f}s"
        console.print(
            Text.assemble(
                (row["artifact"], "bold"), f" {metrics.get('method', '')}  {status}  ", (row["path"], "dim")
            )
        )
        scores = Table("score", "source", "quantized", "delta")
        for key in sorted(k.removeprefix("source/") for k in metrics if k.startswith("source/")):
            scores.add_row(
                key,
                f"{metrics[f'source/{key}']:.4f}",
                f"{metrics[f'quantized/{key}']:.4f}",
                f"{metrics[f'delta/{key}']:+.4f}",
            )
        if "ppl_increase_pct" in metrics:
            scores.add_row("perplexity increase", "", "", f"{metrics['ppl_increase_pct']:+.2f}%")
        console.print(scores)
        size = Table("size and speed", "source", "quantized", "ratio")
        for measure in ("bytes_on_disk", "memory_bytes", "decode_tok_s/b1", "decode_tok_s/b8"):
            if f"{measure}/source" not in metrics:
                continue
            ratio = metrics.get(f"{measure}/ratio")
            size.add_row(
                measure,
                _amount(measure, metrics[f"{measure}/source"]),
                _amount(measure, metrics[f"{measure}/quantized"]),
                "" if ratio is None else f"{ratio:.2f}x",
            )
        console.print(size)
        for failure in failures:
            console.print(f"[red]gate failed:[/] {failure}")

    return render


def _amount(measure: str, value: float) -> str:
    return f"{value / 1e6:,.1f} MB" if "bytes" in measure else f"{value:,.1f}"
