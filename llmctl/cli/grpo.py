"""`llmctl grpo`: reinforcement learning with verifiable rewards (GRPO, DAPO, Dr. GRPO)."""

from __future__ import annotations

from typing import Annotated

import typer

from llmctl.cli.completion import complete_refs
from llmctl.cli.options import ForceOption, JsonOption, SetOption
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


def grpo(
    ctx: typer.Context,
    model: Annotated[
        str | None,
        typer.Option(
            "--model",
            "-m",
            help="Model artifact to train, also the KL reference (default: grpo.model, else the newest model "
            "made before grpo: dpo's, else sft's).",
            autocompletion=complete_refs(("model",)),
        ),
    ] = None,
    gpus: GpusOption = 1,
    nodes: NodesOption = 1,
    node_rank: NodeRankOption = None,
    master_addr: MasterAddrOption = None,
    master_port: MasterPortOption = 29500,
    device: device_option("grpo") = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the newest unfinished run.")] = False,
    force: ForceOption = False,
    sets: SetOption = None,
    json_: JsonOption = False,
) -> None:
    """Train a model on prompts with verifiable rewards: G sampled completions per prompt, group-relative
    advantages, clipped policy updates (GRPO; DAPO's clip-higher and token-level loss; Dr. GRPO).

    [bold]Examples[/]
      llmctl grpo
      llmctl grpo --set grpo.loss_type=grpo --set grpo.beta=0.04
      llmctl grpo --set grpo.epsilon_high=0.28 --set grpo.drop_zero_variance=true
      llmctl grpo --gpus 2 --device cpu
      llmctl grpo --resume
    """
    launch = launch_request(gpus, nodes, node_rank, master_addr, master_port, device)
    run_stage_command(
        ctx, "grpo", sets=sets, force=force, json_=json_, refs={"model": model}, resume=resume, launch=launch
    )
