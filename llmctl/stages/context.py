"""What a stage's run function is given: its config, resolved inputs, an output folder, a reporter."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmctl.reporting import Reporter
from llmctl.stages.registry import Stage
from llmctl.workspace.store import Artifact, Workspace


@dataclass
class StageContext:
    """Everything a stage may touch. Outputs go to `output_dir` (published as the artifact);
    temporary files to `scratch_dir`; resumable state (checkpoints) to `run_dir`."""

    stage: Stage
    project: Any  # ProjectConfig; typed loosely so this module imports no stage configs
    project_dir: Path
    workspace: Workspace
    inputs: dict[str, Artifact | None]
    run_dir: Path
    reporter: Reporter = field(default_factory=Reporter)
    resumed: bool = False
    options: dict[str, Any] = field(default_factory=dict)  # per-invocation flags (e.g. gpus) not in config
    notes: list[str] = field(default_factory=list)
    device: str = "cpu"
    # slot -> the id the manifest records; differs from inputs[slot].id for a copy given by path
    input_ids: dict[str, str] = field(default_factory=dict)
    # This process's place in a torchrun job (see llmctl/stages/launch.py): a distributed stage runs
    # on every rank with the same inputs and run folder; only the main rank writes the artifact.
    rank: int = 0
    world_size: int = 1

    @property
    def config(self) -> Any:
        """This stage's own config section."""
        return self.stage.section_of(self.project)

    @property
    def is_main(self) -> bool:
        """Whether this process writes files and reports (rank 0, or the only process)."""
        return self.rank == 0

    @property
    def output_dir(self) -> Path:
        return self.run_dir / "output"

    @property
    def scratch_dir(self) -> Path:
        path = self.run_dir / "scratch"
        path.mkdir(exist_ok=True)
        return path

    def note(self, message: str) -> None:
        """Record a value inherited or overridden (lands in the manifest) and log it once."""
        self.notes.append(message)
        self.reporter.log(message)
