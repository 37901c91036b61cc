"""A stage registered with `distributed=True` runs on N processes through the launcher
(llmctl/stages/launch.py), whatever stage it is: its command gets --gpus/--nodes/--device, a config
that cannot work fails once before any process starts, and under torchrun every rank gets the job
from rank 0, or hears at once that there is none (up to date, or rank 0 failed), never waiting for a
collective timeout.

The stage is a real plugin (a module plus a `.dist-info` entry point on PYTHONPATH, as in
test_registry.py); every run is the real `llmctl` in subprocesses, with real torchrun and gloo.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import CliResult, cli_env, run_cli, write_project

PLUGIN = '''
"""`toyddp`: every rank sums its share of `items` into one all-reduced total; rank 0 publishes it."""

import os
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field

from llmctl.config.base import Section
from llmctl.errors import ConfigError, InputError
from llmctl.stages.registry import InputSlot, Stage, register
from llmctl.train import distributed as D

if "RANK" in os.environ and "TOYDDP_STARTED" in os.environ:  # a torchrun child: the test counts them
    with Path(os.environ["TOYDDP_STARTED"]).open("a") as log:
        log.write(os.environ["RANK"] + "\\n")


class ToyDdpConfig(Section):
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="Device type.")
    items: int = Field(6, ge=1, description="Work items, split evenly over the processes.")


register(
    Stage(
        name="toyddp",
        description="A toy distributed stage from a plugin.",
        output_kind="tally",
        sections=("toyddp",),
        config="toy_ddp:ToyDdpConfig",
        module="toy_ddp",
        inputs=(InputSlot("init", ("tally",), (), required=False),),
        distributed=True,
    )
)


def preflight(section, world_size, inputs):
    if section.items % world_size:
        raise ConfigError(f"toyddp.items ({section.items}) does not split over {world_size} processes")
    init = inputs.get("init")
    if init is not None and init.manifest.metrics["items"] != section.items:
        raise InputError(f"{init.id} counted {init.manifest.metrics['items']} items, toyddp.items is {section.items}")


def run(ctx):
    info = D.init_distributed(device=ctx.config.device)
    assert (info.rank, info.world_size) == (ctx.rank, ctx.world_size)
    share = ctx.config.items // ctx.world_size
    mine = range(ctx.rank * share, (ctx.rank + 1) * share)
    (ctx.run_dir / f"rank{ctx.rank}.txt").write_text(" ".join(map(str, mine)))  # the shared run folder
    total = D.all_reduce(torch.tensor([float(sum(mine))]))  # also: every marker is written
    if not ctx.is_main:
        return {}
    (ctx.output_dir / "total.txt").write_text(str(int(total[0])))
    markers = sorted(p.name for p in ctx.run_dir.glob("rank*.txt"))
    return {"items": ctx.config.items, "world_size": ctx.world_size, "total": int(total[0]), "markers": markers}
'''

PROMPT_S = 45  # torchrun and two CPU processes start in ~10 s; a waiting rank would wait 1800 s


@pytest.fixture(scope="module")
def plugin_path(tmp_path_factory) -> str:
    site = tmp_path_factory.mktemp("site")
    (site / "toy_ddp.py").write_text(textwrap.dedent(PLUGIN))
    dist = site / "toy_ddp-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: toy-ddp\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[llmctl.stages]\ntoyddp = toy_ddp\n")
    return str(site)


@dataclass
class Toy:
    """A project with a `toyddp:` section, run with the plugin installed."""

    project: Path
    env: dict[str, str]
    started: Path  # one line per torchrun child started (written by the plugin)

    def cli(self, *args: str) -> CliResult:
        return run_cli(*args, cwd=self.project, env=self.env, timeout=120)

    def torchrun(self, *args: str) -> tuple[CliResult, float]:
        return torchrun(*args, cwd=self.project, env=self.env)

    def processes_started(self) -> int:
        return len(self.started.read_text().split()) if self.started.exists() else 0

    def runs(self) -> list[Path]:
        """toyddp's run folders (a published run's is removed; a failed one's stays)."""
        return sorted((self.project / "workspace" / "runs" / "toyddp").glob("*"))


@pytest.fixture
def toy(tmp_path, plugin_path) -> Toy:
    paths = [plugin_path, os.environ.get("PYTHONPATH")]
    started = tmp_path / "started.log"
    env = cli_env(PYTHONPATH=os.pathsep.join(filter(None, paths)), TOYDDP_STARTED=str(started))
    return Toy(write_project(tmp_path / "p", "toyddp:\n  items: 6\n"), env, started)


def torchrun(*args: str, cwd: Path, env: dict | None = None, nproc: int = 2) -> tuple[CliResult, float]:
    """`torchrun --nproc-per-node N -m llmctl ARGS` typed by the user (no --gpus): its result and seconds."""
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
        + ["-m", "llmctl", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=PROMPT_S,
        env=env or cli_env(),
    )
    return CliResult(proc.returncode, proc.stdout, proc.stderr), time.monotonic() - t0


def test_a_distributed_stage_gets_the_launch_flags_and_fails_before_any_process(toy):
    help_text = toy.cli("toyddp", "--help").stdout
    for flag in ("--gpus", "--nodes", "--node-rank", "--master-addr", "--master-port", "--device", "--init"):
        assert flag in help_text, flag
    assert "toyddp.device" in help_text and "--gpus 2 --device cpu" in help_text
    assert "--gpus" not in toy.cli("dedup", "--help").stdout  # not a distributed stage

    # 6 items over 4 processes: refused here, once, before torchrun starts any.
    bad = toy.cli("toyddp", "--gpus", "4", "--device", "cpu")
    assert bad.code == 2 and bad.stderr.count("Error:") == 1, bad.stderr
    assert "does not split over 4 processes" in bad.stderr
    assert toy.processes_started() == 0 and not toy.runs()
    zero = toy.cli("toyddp", "--gpus", "0")
    assert zero.code == 2 and "--gpus and --nodes must be >= 1" in zero.stderr
    # The device flag is validated like --set, and a missing GPU is named by the stage's own key.
    assert toy.cli("toyddp", "--device", "tpu").code == 2
    missing = toy.cli("toyddp", "--device", "cuda")
    if missing.code != 0:
        assert missing.code == 2 and "toyddp.device is cuda" in missing.stderr


@pytest.mark.slow  # four torchrun launches of two CPU processes each
def test_every_rank_gets_the_job_or_hears_there_is_none(toy):
    ran = toy.cli("--json", "toyddp", "--gpus", "2", "--device", "cpu")
    assert ran.code == 0, ran.stderr[-3000:]
    doc = ran.json()  # exactly one JSON document on stdout: only rank 0 reports
    assert doc["artifact"] == "toyddp:v0001" and not doc["reused"] and toy.processes_started() == 2
    assert doc["metrics"]["world_size"] == 2 and doc["metrics"]["total"] == sum(range(6))
    assert doc["metrics"]["markers"] == ["rank0.txt", "rank1.txt"]  # rank 1 worked in rank 0's run folder

    # Up to date: reused before any process starts.
    again = toy.cli("--json", "toyddp", "--gpus", "2", "--device", "cpu")
    assert again.code == 0 and again.json()["reused"] is True and toy.processes_started() == 2

    # The user's own torchrun of an up-to-date stage: every rank exits 0 at once, one report.
    direct, seconds = toy.torchrun("--json", "toyddp", "--device", "cpu")
    assert direct.code == 0, direct.stderr[-3000:]
    assert json.loads(direct.stdout)["reused"] is True and seconds < PROMPT_S

    # A bad reference: rank 0 fails while planning and the other rank exits too, at once.
    wrong, seconds = toy.torchrun("toyddp", "--device", "cpu", "--init", "toyddp:v0042")
    assert wrong.code != 0 and "toyddp:v0042" in wrong.stderr and seconds < PROMPT_S
    assert [line for line in wrong.stderr.splitlines() if line.startswith("Error:")] == [
        "Error: unknown reference 'toyddp:v0042'"
    ]  # rank 0 speaks for both

    # A config its input cannot take (preflight gets the resolved inputs): before any process too.
    started = toy.processes_started()
    mismatch = toy.cli(
        "toyddp", "--gpus", "2", "--device", "cpu", "--init", "toyddp:v0001", "--set", "toyddp.items=4"
    )
    assert mismatch.code == 2 and "counted 6 items, toyddp.items is 4" in mismatch.stderr
    assert toy.processes_started() == started

    # Under torchrun the job runs on every rank with rank 0's run folder and inputs.
    forced, _ = toy.torchrun("--json", "toyddp", "--device", "cpu", "--init", "toyddp:v0001", "--force")
    assert forced.code == 0, forced.stderr[-3000:]
    doc = json.loads(forced.stdout)
    assert doc["artifact"] == "toyddp:v0002" and doc["inputs"] == {"init": "toyddp:v0001"}
    assert doc["metrics"]["markers"] == ["rank0.txt", "rank1.txt"]


def _launch_on_rank(rank: int, world: int, port: int, site: str, project: str, out: str) -> None:
    """One rank of a process group started without torchrun (whose agent would stop the others)."""
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        OMP_NUM_THREADS="1",
    )
    sys.path.insert(0, site)  # the plugin registers toyddp through its entry point
    from llmctl.config.loading import load_config
    from llmctl.stages.launch import Launch, launch_stage
    from llmctl.stages.registry import project_model

    folder = Path(project)
    config = load_config(
        project_model(), folder / "llmctl.yaml", ["toyddp.device=cpu"], context={"base_dir": folder}
    )
    try:
        launch_stage("toyddp", config, folder, launch=Launch(), argv=[], refs={"init": "toyddp:v0042"})
    except Exception as exc:
        Path(out, f"rank{rank}").write_text(f"{type(exc).__name__} {getattr(exc, 'exit_code', None)}")


def test_ranks_hear_that_rank_zero_failed_and_exit_with_its_code(toy, plugin_path, tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.monotonic()
    mp.spawn(_launch_on_rank, args=(2, port, plugin_path, str(toy.project), str(tmp_path)), nprocs=2)
    assert (tmp_path / "rank0").read_text() == "InputError 2"  # unknown reference: exit code 2
    assert (tmp_path / "rank1").read_text() == "RankZeroFailed 2"  # told, not a broken connection
    assert time.monotonic() - t0 < PROMPT_S and not toy.runs()
