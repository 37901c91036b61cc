"""The one list of stages: name, config sections, inputs, output kind, and the module that runs it.

The CLI, `llmctl run`, the config schema and artifact kinds all read this list. A stage module
(`llmctl/stages/<name>.py`) exposes `run(ctx: StageContext) -> dict` returning its metrics; it is
imported only when the stage runs, so `llmctl --help` stays instant.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from llmctl.stages.context import StageContext

# Artifact kinds.
CORPUS = "corpus"  # documents/*.jsonl.gz
TOKENS = "tokens"  # a tokenizer folder plus train/ and val/ token shards
MODEL = "model"  # an HF-Llama-compatible model folder with its tokenizer
EVAL = "eval"  # scores and samples


@dataclass(frozen=True)
class InputSlot:
    """One input of a stage. Without an explicit reference the newest artifact of the first stage in
    `default_stages` that has one is used; with `sources_fallback` the raw data sources are read when
    none exists."""

    name: str
    kinds: tuple[str, ...]
    default_stages: tuple[str, ...] = ()
    required: bool = True
    sources_fallback: bool = False
    config_key: str | None = None  # a field of the stage's section that may hold the reference


@dataclass(frozen=True)
class Stage:
    name: str
    description: str
    output_kind: str
    sections: tuple[str, ...]  # llmctl.yaml sections this stage reads (its own first); hashed for reuse
    inputs: tuple[InputSlot, ...] = ()
    reads_sources: bool = False  # reads data.sources directly (always, not only as a fallback)
    in_pipeline: bool = True  # part of `llmctl run`
    keeps_run_dir: bool = False  # keep checkpoints in the run folder after publishing
    module: str | None = None  # defaults to llmctl.stages.<name>

    def load_run(self) -> Callable[[StageContext], dict[str, Any]]:
        module = importlib.import_module(self.module or f"llmctl.stages.{self.name}")
        return module.run


# Pipeline order: `llmctl run` walks this list top to bottom.
STAGES: dict[str, Stage] = {}


def register(stage: Stage) -> Stage:
    assert stage.name not in STAGES, f"stage {stage.name} registered twice"
    STAGES[stage.name] = stage
    return stage


def pipeline_stages() -> list[Stage]:
    return [s for s in STAGES.values() if s.in_pipeline]
