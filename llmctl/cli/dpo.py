"""`llmctl dpo`: preference optimisation (DPO, cDPO, robust DPO, IPO, SimPO) of a model."""

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


def dpo(
    ctx: typer.Context,
    model: Annotated[
        str | None,
        typer.Option(
            "--model",
            "-m",
            help="Model artifact to optimise, also the reference (default: dpo.model, else the newest model "
            "made before dpo: sft's).",
            autocompletion=complete_refs(("model",)),
        ),
    ] = None,
    gpus: GpusOption = 1,
    nodes: NodesOption = 1,
    node_rank: NodeRankOption = None,
    master_addr: MasterAddrOption = None,
    master_port: MasterPortOption = 29500,
    device: device_option("dpo") = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the newest unfinished run.")] = False,
    force: ForceOption = False,
    sets: SetOption = None,
    json_: JsonOption = False,
) -> None:
    """Optimise a model on preference pairs: DPO (sigmoid), cDPO, robust DPO, IPO or SimPO.

    The reference log-probs are computed once by the starting model and kept in the run folder.

    [bold]Examples[/]
      llmctl dpo
      llmctl dpo --model sft:latest --set dpo.loss=ipo --set dpo.beta=0.5
      llmctl dpo --set dpo.loss=simpo
      llmctl dpo --gpus 2 --device cpu
      llmctl dpo --resume
    """
    launch = launch_request(gpus, nodes, node_rank, master_addr, master_port, device)
    run_stage_command(
        ctx, "dpo", sets=sets, force=force, json_=json_, refs={"model": model}, resume=resume, launch=launch
    )
