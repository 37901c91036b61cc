"""`llmctl sft`: fine-tune a model on conversations; `--inspect` shows what the loss trains on."""

from __future__ import annotations

from typing import Annotated

import typer

from llmctl.cli.options import ForceOption, JsonOption, ResumeOption, SetOption, model_option, state_of
from llmctl.cli.stages import (
    GpusOption,
    MasterAddrOption,
    MasterPortOption,
    NodeRankOption,
    NodesOption,
    device_option,
    launch_request,
    run_stage_command,
)


def sft(
    ctx: typer.Context,
    model: model_option(
        "Model artifact to fine-tune (default: sft.model, else the newest model made before sft)."
    ) = None,
    inspect: Annotated[
        int | None,
        typer.Option(
            "--inspect",
            help="Show training conversation N rendered with the chat template, trained tokens highlighted "
            "(with --json: every token and its mask); trains nothing.",
            show_default=False,
        ),
    ] = None,
    gpus: GpusOption = 1,
    nodes: NodesOption = 1,
    node_rank: NodeRankOption = None,
    master_addr: MasterAddrOption = None,
    master_port: MasterPortOption = 29500,
    device: device_option("sft") = None,
    resume: ResumeOption = False,
    force: ForceOption = False,
    sets: SetOption = None,
    json_: JsonOption = False,
) -> None:
    """Fine-tune a model on chat data into a chat model: assistant-only loss, packing, full or LoRA.

    [bold]Examples[/]
      llmctl sft
      llmctl sft --model import:latest --set sft.lora.enabled=true
      llmctl sft --inspect 0
      llmctl sft --gpus 2 --device cpu
      llmctl sft --resume
    """
    if inspect is not None:
        _inspect(ctx, model, inspect, sets, json_)
        return
    launch = launch_request(gpus, nodes, node_rank, master_addr, master_port, device)
    run_stage_command(
        ctx, "sft", sets=sets, force=force, json_=json_, refs={"model": model}, resume=resume, launch=launch
    )


def _inspect(ctx: typer.Context, model: str | None, index: int, sets: list[str] | None, json_: bool) -> None:
    from llmctl.stages.runner import plan_stage
    from llmctl.stages.sft import inspect_example

    state = state_of(ctx)
    out = state.output(json_)
    config, folder = state.load_project(sets)
    plan = plan_stage("sft", config, folder, refs={"model": model} if model else {})
    seen, where, base_id = inspect_example(config.sft, plan.inputs["model"], folder, index)
    out.result(
        {"model": base_id, "conversation": where, **seen.to_json()},
        lambda console: _render(console, seen, where, base_id),
    )


def _render(console, seen, where: str, base_id: str) -> None:
    from rich.text import Text

    trained = sum(seen.trained)
    console.print(
        Text.assemble(
            (f"{where}", "bold"),
            f"  model {base_id}, {len(seen.input_ids)} tokens, {trained} trained ",
            ("(highlighted)", "black on green"),
        )
    )
    text = Text()
    for segment, is_trained in seen.segments:
        text.append(segment, style="black on green" if is_trained else "dim")
    console.print(text)
