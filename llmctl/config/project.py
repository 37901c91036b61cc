"""The llmctl.yaml schema: project-level keys plus one section per stage.

Each stage's section model lives beside this file (config/dedup.py, config/tokenize.py, ...); this
module composes those of the original stages for typed access. A stage added later names its section
model in its registry entry only: `llmctl.stages.registry.project_model()` extends this model with it.
"""

from __future__ import annotations

from pydantic import Field

from llmctl.config.base import Section
from llmctl.config.data import DataConfig
from llmctl.config.dedup import DedupConfig
from llmctl.config.eval import EvalConfig
from llmctl.config.filter import FilterConfig
from llmctl.config.pretrain import PretrainConfig
from llmctl.config.tokenize import TokenizeConfig


class ProjectConfig(Section):
    """The whole project file."""

    name: str = Field(description="Project name, shown in manifests and reports.")
    workspace: str = Field(
        default="workspace",
        description="Folder (relative to the project folder, or absolute) holding artifacts and runs.",
    )
    seed: int = Field(default=1337, description="Default random seed for stages that sample.")
    data: DataConfig | None = Field(
        default=None, description="Raw data sources read by the first data stage (dedup)."
    )
    dedup: DedupConfig = Field(default_factory=DedupConfig, description="Exact and near-duplicate removal.")
    filter: FilterConfig = Field(default_factory=FilterConfig, description="Quality filters, in order.")
    tokenize: TokenizeConfig = Field(
        default_factory=TokenizeConfig, description="BPE tokenizer training (or adoption) and token shards."
    )
    pretrain: PretrainConfig = Field(
        default_factory=PretrainConfig, description="Pretraining: model shape, batch, horizon, optimizer."
    )
    eval: EvalConfig = Field(default_factory=EvalConfig, description="Benchmarks and perplexity of a model.")
