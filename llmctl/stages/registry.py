"""The one list of stages: name, config section, inputs, output kind, and the module that runs it.

The CLI (commands, `llmctl run`, completions), the llmctl.yaml schema and artifact kinds all read
this list. A stage module (`llmctl/stages/<name>.py`) exposes `run(ctx: StageContext) -> dict`
returning its metrics; it is imported only when the stage runs, so `llmctl --help` stays instant.

Adding a stage touches four things, and nothing else:
  1. its config section: a `Section` model (`llmctl/config/<name>.py`), named in the entry's `config`;
     the project schema (`llmctl config schema`, llmctl.yaml validation) picks it up from here;
  2. its stage module: `run(ctx)` reading `ctx.inputs`, writing `ctx.output_dir`, returning metrics;
  3. its registry entry: `register(Stage(...))` in `llmctl/stages/__init__.py` (pipeline order);
  4. a thin CLI command, named in the entry's `command` (`module:function`); without one, the stage
     gets a generic command (one `--SLOT` option per input, `--force`, `--set`, `--json`, and
     `--resume` for a stage that keeps its run folder; its `examples` in --help). Both are
     registered by `llmctl.cli.stage_commands` (the original stages' commands, registered by their
     CLI modules before it, are left as they are).
A stage that trains on several processes sets `distributed=True` (see llmctl/stages/launch.py): its
section has a `device` field (auto|cpu|cuda); its command gets `--gpus`, `--nodes`, `--node-rank`,
`--master-addr`, `--master-port` and `--device`; its `run(ctx)` runs on every rank (`ctx.rank`,
`ctx.world_size`; only `ctx.is_main` writes files). Its module may define `preflight(section,
world_size)` (or `preflight(section, world_size, inputs)`, inputs: the resolved artifacts by slot)
raising ConfigError/InputError for a config that cannot work on that many processes: it runs once,
before any process is launched. A stage module may also define `skip_reason(section) -> str | None`:
`llmctl run` leaves the stage out, saying why, for a project that does not configure it (sft without
chat data); a stage that reads data files of its own defines `source_fingerprint(section,
project_dir)` (part of its reuse key) and `training_texts(section, project_dir)` (their records' text,
which `llmctl eval --decontaminate` checks eval items against).
`llmctl run`, `run --from/--until`, command completion and the schema list every stage from here.
Stages from other distributions register the same way from a module named by an entry point in the
`llmctl.stages` group; it is imported after the built-in stages, so its stages come last.

"The newest model" (any kind, in fact) is a rule, not a per-stage list: an input slot with
`newest_in_pipeline` and no reference takes the newest artifact of its kinds in pipeline order,
i.e. from the last stage in `stage_order()` that has one (eval after an sft run: the sft model); a
stage that makes the kind it reads looks only at the stages before it (sft: pretrain's model, never
its own output). Stages outside the pipeline (`import`) come first in that order: an imported model
is a starting point, so any model the pipeline trained is newer; name it (`import:latest`) to use it.
`latest` given to a model consumer (`--ckpt latest`) follows the same order (`Workspace.stage_order`).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator
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
    newest_in_pipeline: bool = False  # default: the newest of `kinds` in pipeline order (see above)

    def defaults(self, consumer: str | None = None) -> tuple[str, ...]:
        """The stages whose newest artifact a reference-less input takes, first match wins. For
        `newest_in_pipeline`: a consumer that makes what it reads (sft: a model from a model) takes
        only stages before it in pipeline order, so never its own output nor a later stage's; a
        consumer of another kind (eval) takes every stage."""
        if not self.newest_in_pipeline:
            return self.default_stages
        order = stage_order()
        if consumer in order and STAGES[consumer].output_kind in self.kinds:
            order = order[: order.index(consumer)]
        return tuple(reversed([s for s in order if STAGES[s].output_kind in self.kinds]))


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
    config: str | None = None  # "module:Class" of its llmctl.yaml section (sections[0])
    command: str | None = None  # "module:function" of its CLI command; None: a generic one
    distributed: bool = False  # runs on N processes under torchrun: --gpus/--nodes/--device (launch.py)
    examples: tuple[str, ...] = ()  # usage lines for the generic command's --help
    # Whether its artifacts count as "the newest" (stage_order): not for a copy of another stage's
    # model (quantize), which eval after training must not pick, nor a second `llmctl run` re-score.
    newest: bool = True

    def load_run(self) -> Callable[[StageContext], dict[str, Any]]:
        return self._module().run

    def load_preflight(self) -> Callable[..., None] | None:
        """The stage module's `preflight(section, world_size[, inputs])`, if it has one."""
        return getattr(self._module(), "preflight", None)

    def _module(self) -> Any:
        return importlib.import_module(self.module or f"llmctl.stages.{self.name}")

    def skip_reason(self, project: Any) -> str | None:
        """Why `llmctl run` leaves this stage out for this project (its module's `skip_reason(section)`,
        e.g. sft without chat data), or None to run it."""
        decide = getattr(self._module(), "skip_reason", None)
        return decide(self.section_of(project)) if decide is not None else None

    def extra_sources(self, project: Any, project_dir: Any) -> list[dict[str, Any]]:
        """Fingerprints of files the stage reads besides its input artifacts and data.sources (its
        module's `source_fingerprint(section, project_dir)`, e.g. sft's chat data): part of the
        reuse key, so changed files make the stage run again."""
        return self.source_fingerprint(self.section_of(project), project_dir)

    def source_fingerprint(self, section: Any, project_dir: Any) -> list[dict[str, Any]]:
        """`extra_sources` for a given section (e.g. one read back from a manifest)."""
        fingerprint = getattr(self._module(), "source_fingerprint", None)
        return fingerprint(section, project_dir) if fingerprint is not None else []

    def training_texts(self, section: Any, project_dir: Any) -> Iterator[str] | None:
        """The text of every record the stage trains on from those files (its module's
        `training_texts(section, project_dir)`), for eval's decontamination; None when it has none."""
        texts = getattr(self._module(), "training_texts", None)
        return texts(section, project_dir) if texts is not None else None

    def section_of(self, project: Any) -> Any:
        """This stage's own section of the project config (None for a stage without one)."""
        return getattr(project, self.sections[0], None) if self.sections else None

    def config_model(self) -> type | None:
        return load_object(self.config) if self.config else None


def load_object(spec: str) -> Any:
    """`package.module:name` -> the object."""
    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name)


# Pipeline order: `llmctl run` walks this list top to bottom.
STAGES: dict[str, Stage] = {}


def register(stage: Stage) -> Stage:
    assert stage.name not in STAGES, f"stage {stage.name} registered twice"
    STAGES[stage.name] = stage
    return stage


def pipeline_stages() -> list[Stage]:
    return [s for s in STAGES.values() if s.in_pipeline]


def stage_order() -> list[str]:
    """Pipeline order for "newest": stages outside the pipeline (starting points such as `import`)
    first, then the pipeline stages in the order `llmctl run` walks them; stages with newest=False
    left out (name them: `quantize:latest`)."""
    order = [s for s in STAGES.values() if not s.in_pipeline] + pipeline_stages()
    return [s.name for s in order if s.newest]


def project_model() -> type:
    """The llmctl.yaml model: `ProjectConfig` plus the section of each registered stage it lacks."""
    from pydantic import Field, create_model

    from llmctl.config.project import ProjectConfig

    extra = {
        s.sections[0]: (model, Field(default_factory=model, description=s.description))
        for s in STAGES.values()
        if s.sections and s.sections[0] not in ProjectConfig.model_fields and (model := s.config_model())
    }
    if not extra:
        return ProjectConfig
    return create_model("ProjectConfig", __base__=ProjectConfig, __doc__=ProjectConfig.__doc__, **extra)
