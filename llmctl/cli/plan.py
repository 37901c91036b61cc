"""`llmctl plan`: parameters, tokens, FLOPs, memory per device and wall time of each training stage.

Library: llmctl/stages/plan.py (project -> plan) over llmctl/train/plan.py (the memory model and the
device table). A stage whose memory exceeds the budget prints the plan, then exits 2 (a config that
cannot run on the stated hardware is a config error, as is a batch that does not split over the
processes) with one `Error:` line naming the largest term.
"""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.table import Table

from llmctl.cli.options import JsonOption, SetOption, state_of


def plan(
    ctx: typer.Context,
    gpu_type: Annotated[
        str | None,
        typer.Option(
            "--gpu-type",
            help="H100-SXM, H200, A100-80GB, A100-40GB, L40S, RTX-4090 or cpu (this machine); "
            "default: this machine's GPU, else cpu.",
            show_default=False,
        ),
    ] = None,
    gpus: Annotated[int, typer.Option("--gpus", help="Devices (processes) per node.")] = 1,
    nodes: Annotated[int, typer.Option("--nodes", help="Nodes.")] = 1,
    mfu: Annotated[
        float | None,
        typer.Option(
            "--mfu",
            help="Model FLOPs utilisation for the wall time (default 0.4 on GPUs, 0.3 on CPU).",
            show_default=False,
        ),
    ] = None,
    strategy: Annotated[
        str | None,
        typer.Option(
            "--strategy",
            help="ddp or fsdp (default: each stage's `strategy`, auto = ddp).",
            show_default=False,
        ),
    ] = None,
    sets: SetOption = None,
    json_: JsonOption = False,
) -> None:
    """Plan the training stages before running them: parameters, tokens, FLOPs, Chinchilla ratio,
    memory per device (weights, gradients, AdamW state, activations; DDP or FSDP2) and wall time.

    Exit 2, after the plan, when a stage does not fit in 90% of a device's memory.

    [bold]Examples[/]
      llmctl plan
      llmctl plan --gpu-type H100-SXM --gpus 8 --strategy fsdp
      llmctl plan --gpu-type A100-40GB --set pretrain.model.preset=1b --json
      llmctl plan --gpu-type cpu --mfu 0.25
    """
    from llmctl.errors import UsageError
    from llmctl.stages.plan import fit_error, local_device, plan_project

    if strategy is not None and strategy not in ("ddp", "fsdp"):
        raise UsageError(f"--strategy {strategy!r}: expected ddp or fsdp")
    state = state_of(ctx)
    out = state.output(json_)
    config, folder = state.load_project(sets)
    result = plan_project(
        config,
        folder,
        device=gpu_type or local_device(),
        gpus=gpus,
        nodes=nodes,
        mfu=mfu,
        strategy=strategy,
    )
    error = fit_error(result)
    if error is None or not out.json_mode:  # with --json, one document: the error alone
        out.result(result, _render(result))
    if error is not None:
        raise error


def _count(n: float | None) -> str:
    if n is None:
        return "?"
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return f"{n:,.0f}"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "? (set max_steps)"
    if seconds < 60:
        return f"{seconds:.0f}s"
    if seconds < 3600:
        return f"{seconds // 60:.0f}m{seconds % 60:02.0f}s"
    if seconds < 86400 * 2:
        return f"{seconds // 3600:.0f}h{seconds % 3600 // 60:02.0f}m"
    return f"{seconds / 86400:.1f} days"


def _render(plan: dict[str, Any]):
    from llmctl.stages.plan import gib

    def render(console) -> None:
        dev = plan["device"]
        console.print(
            f"{plan['world_size']} x {dev['name']} ({plan['gpus']} per node x {plan['nodes']} node(s)), "
            f"{gib(dev['memory_bytes'])} each, MFU {plan['mfu']:.0%}",
            highlight=False,
        )
        for s in plan["stages"]:
            m, mem = s["model"], s["memory"]
            table = Table(title=f"{s['stage']}", title_justify="left", show_header=False)
            table.add_column("", style="bold")
            table.add_column("", justify="right")
            table.add_column("", style="dim")
            table.add_row(
                "parameters",
                f"{m['params']:,}",
                f"{m['source']}; {m['n_layer']} layers x {m['n_embd']}, vocab {m['vocab_size']:,}",
            )
            table.add_row(
                "tokens",
                _count(s["tokens"]),
                f"{format(s['steps'], ',') if s['steps'] else '?'} steps ({s['steps_source']}) x {s['tokens_per_step']:,} tokens",
            )
            if "chinchilla" in s:
                ch = s["chinchilla"]
                table.add_row(
                    "tokens per parameter",
                    f"{ch['tokens_per_param']:g}",
                    f"Chinchilla-optimal ~20: {_count(ch['compute_optimal_tokens'])} tokens",
                )
            if s.get("epochs") is not None:
                table.add_row("epochs", f"{s['epochs']:g}", f"of {s['dataset_tokens']:,} dataset tokens")
            table.add_row("FLOPs", f"{s['flops']:.3g}" if s["flops"] else "?", "6N + attention per token")
            table.add_row("wall time", _duration(s["wall_seconds"]), f"at MFU {plan['mfu']:.0%}")
            ckpt = "on" if mem["activation_checkpointing"] else "off"
            table.add_section()
            table.add_row(
                "memory per device", "", f"{s['dtype']}, {s['strategy']}, activation checkpointing {ckpt}"
            )
            for term, size in mem["terms_bytes"].items():
                table.add_row(f"  {term}", gib(size), "largest" if term == mem["largest_term"] else "")
            other = "on" if ckpt == "off" else "off"
            verdict = "fits" if mem["fits"] else "DOES NOT FIT"
            table.add_row(
                "  total",
                gib(mem["total_bytes"]),
                f"{verdict} in {gib(mem['budget_bytes'])}; checkpointing {other}: "
                f"{gib(mem[f'total_bytes_checkpointing_{other}'])}",
            )
            for note in s["notes"]:
                table.add_row("", "", note)
            console.print(table)
        for skip in plan["skipped"]:
            console.print(f"{skip['stage']}: not planned ({skip['reason']})", style="dim", highlight=False)

    return render


def register(app: typer.Typer) -> None:
    app.command("plan")(plan)
