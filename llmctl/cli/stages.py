"""Stage commands (`llmctl dedup`, `llmctl filter`, ...): parse flags, run the stage, render the result."""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.table import Table
from rich.text import Text

from llmctl.cli.completion import complete_refs
from llmctl.cli.options import ForceOption, JsonOption, ResumeOption, SetOption, state_of
from llmctl.cli.pipeline import outcome_row

InputOption = Annotated[
    str | None,
    typer.Option(
        "--input",
        "-i",
        help="Input artifact reference (default: the newest from the previous stage).",
        autocompletion=complete_refs(),
    ),
]


GpusOption = Annotated[
    int, typer.Option("--gpus", help="Processes on this node (relaunches under torchrun).")
]
NodesOption = Annotated[int, typer.Option("--nodes", help="Nodes in a multi-node run (torchrun rendezvous).")]
NodeRankOption = Annotated[int | None, typer.Option("--node-rank", help="This node's rank (multi-node).")]
MasterAddrOption = Annotated[
    str | None, typer.Option("--master-addr", help="Rank-0 node address (multi-node).")
]
MasterPortOption = Annotated[int, typer.Option("--master-port", help="Rendezvous port (multi-node).")]


def device_option(section: str) -> Any:
    """`--device`, which sets `<section>.device` of a distributed stage like --set does."""
    return Annotated[
        str | None,
        typer.Option(
            "--device",
            help=f"auto, cpu or cuda (sets {section}.device). --gpus N without a GPU needs --device cpu.",
            show_default=False,
        ),
    ]


PretrainDeviceOption = device_option("pretrain")


def launch_request(
    gpus: int,
    nodes: int,
    node_rank: int | None,
    master_addr: str | None,
    master_port: int,
    device: str | None,
) -> dict[str, Any]:
    """A command's launch flags as `run_stage_command(launch=...)` takes them."""
    return {
        "gpus": gpus,
        "nodes": nodes,
        "node_rank": node_rank,
        "master_addr": master_addr,
        "master_port": master_port,
        "device": device,
    }


def launch_options() -> list[tuple[str, Any, Any]]:
    """(parameter, annotation, default) of the launch flags, for commands built from the registry."""
    return [
        ("gpus", GpusOption, 1),
        ("nodes", NodesOption, 1),
        ("node_rank", NodeRankOption, None),
        ("master_addr", MasterAddrOption, None),
        ("master_port", MasterPortOption, 29500),
    ]


def _render_outcome(row: dict[str, Any]):
    def render(console) -> None:
        status = "up to date" if row["reused"] else f"published in {row['seconds']:.1f}s"
        console.print(Text.assemble((row["artifact"], "bold"), f" {status}  ", (row["path"], "dim")))
        metrics = {k: v for k, v in row["metrics"].items() if not isinstance(v, dict | list)}
        if metrics:
            table = Table("metric", "value")
            for key, value in metrics.items():
                table.add_row(key, f"{value:,.4g}" if isinstance(value, float) else str(value))
            console.print(table)

    return render


def run_stage_command(
    ctx: typer.Context,
    stage: str,
    *,
    sets: list[str] | None,
    force: bool,
    json_: bool,
    refs: dict[str, str | None] | None = None,
    resume: bool = False,
    options: dict[str, Any] | None = None,
    launch: dict[str, Any] | None = None,
) -> dict[str, Any] | None:
    """The body every stage command shares: load config, run (or reuse), print the outcome.

    `launch` holds a distributed stage's --gpus/--nodes/... flags and `device` (its --device, which
    sets `<section>.device`): the stage may then run on several processes (llmctl/stages/launch.py),
    and only the one that reports prints. Returns the printed row (None where nothing was printed)."""
    from llmctl.stages.runner import run_stage

    state = state_of(ctx)
    out = state.output(json_)
    refs_given = {k: v for k, v in (refs or {}).items() if v}
    if launch is None:
        config, folder = state.load_project(sets)
        outcome = run_stage(
            stage,
            config,
            folder,
            refs=refs_given,
            force=force,
            resume=resume,
            reporter=out.reporter(),
            options=options,
        )
    else:
        import sys

        from llmctl.stages import STAGES
        from llmctl.stages.launch import Launch, launch_stage

        launch = dict(launch)
        device = launch.pop("device", None)
        if device is not None:  # validated with the config, like --set
            sets = [*(sets or []), f"{STAGES[stage].sections[0]}.device={device}"]
        config, folder = state.load_project(sets)
        result = launch_stage(
            stage,
            config,
            folder,
            launch=Launch(**launch),
            argv=sys.argv,
            refs=refs_given,
            force=force,
            resume=resume,
            reporter=out.reporter(),
            options=options,
        )
        if result.exit_code is not None:
            raise typer.Exit(result.exit_code)
        if result.outcome is None:
            return None  # a rank > 0 of a torchrun job: rank 0 reports for all
        outcome = result.outcome
    row = outcome_row(outcome)
    out.result(row, _render_outcome(row))
    return row


def dedup(
    ctx: typer.Context, force: ForceOption = False, sets: SetOption = None, json_: JsonOption = False
) -> None:
    """Remove exact and near-duplicate documents from the project's data sources.

    [bold]Examples[/]
      llmctl dedup
      llmctl dedup --set dedup.engine=datatrove --set dedup.workers=2
      llmctl dedup --force --json
    """
    run_stage_command(ctx, "dedup", sets=sets, force=force, json_=json_)


def filter_(
    ctx: typer.Context,
    input_: InputOption = None,
    force: ForceOption = False,
    sets: SetOption = None,
    json_: JsonOption = False,
) -> None:
    """Drop low-quality documents (Gopher, C4, FineWeb filters, length, URL and regex block-lists).

    [bold]Examples[/]
      llmctl filter
      llmctl filter --input dedup:v2
      llmctl artifacts show filter:latest --samples 3
    """
    run_stage_command(ctx, "filter", sets=sets, force=force, json_=json_, refs={"corpus": input_})


def tokenize(
    ctx: typer.Context,
    input_: InputOption = None,
    inspect: Annotated[
        str | None,
        typer.Option(
            "--inspect", help="Show the tokens of this text with the newest tokenizer (runs nothing)."
        ),
    ] = None,
    force: ForceOption = False,
    sets: SetOption = None,
    json_: JsonOption = False,
) -> None:
    """Train a byte-level BPE tokenizer on the corpus and encode it into train/val token shards.

    [bold]Examples[/]
      llmctl tokenize
      llmctl tokenize --set tokenize.vocab_size=8192
      llmctl tokenize --inspect "Hello, world!"
    """
    if inspect is not None:
        from llmctl.cli.inspect import render_tokens, tokens_of

        state = state_of(ctx)
        out = state.output(json_)
        config, folder = state.load_project(sets)
        from llmctl.stages.runner import workspace_for

        artifact = workspace_for(config, folder).resolve(
            input_ or "tokenize:latest", kinds=("tokens", "model")
        )
        tokens = tokens_of(artifact, inspect)
        out.result(
            {"artifact": artifact.id, "text": inspect, "tokens": tokens},
            lambda console: render_tokens(console, f"{len(tokens)} tokens ({artifact.id})", tokens),
        )
        return
    run_stage_command(ctx, "tokenize", sets=sets, force=force, json_=json_, refs={"corpus": input_})


def pretrain(
    ctx: typer.Context,
    input_: InputOption = None,
    init: Annotated[
        str | None,
        typer.Option(
            "--init",
            help="Model artifact to continue from (default: pretrain.init).",
            autocompletion=complete_refs(("model",)),
        ),
    ] = None,
    gpus: GpusOption = 1,
    nodes: NodesOption = 1,
    node_rank: NodeRankOption = None,
    master_addr: MasterAddrOption = None,
    master_port: MasterPortOption = 29500,
    device: PretrainDeviceOption = None,
    resume: ResumeOption = False,
    force: ForceOption = False,
    sets: SetOption = None,
    json_: JsonOption = False,
) -> None:
    """Pretrain a model on the newest token shards; checkpoints, resume, DDP/FSDP through torchrun.

    [bold]Examples[/]
      llmctl pretrain
      llmctl pretrain --gpus 8 --set pretrain.model.preset=gpt2-small
      llmctl pretrain --gpus 2 --device cpu          # two CPU processes (gloo), e.g. to test DDP
      llmctl pretrain --resume
      llmctl pretrain --nodes 2 --node-rank 0 --master-addr node001 --gpus 8
    """
    launch = launch_request(gpus, nodes, node_rank, master_addr, master_port, device)
    refs = {"data": input_, "init": init}
    run_stage_command(
        ctx, "pretrain", sets=sets, force=force, json_=json_, refs=refs, resume=resume, launch=launch
    )


def register(app: typer.Typer) -> None:
    app.command("dedup")(dedup)
    app.command("filter")(filter_)
    app.command("tokenize")(tokenize)
    app.command("pretrain")(pretrain)
