"""The `dedup:` section of llmctl.yaml: exact and MinHash near-duplicate removal.

Defaults are FineWeb's MinHash settings (word 5-grams, 14 bands x 8 rows, 64-bit hashes): a pair of
documents with word-5-gram Jaccard similarity s becomes a candidate with probability
1 - (1 - s**rows)**bands, an S-curve whose midpoint is about (1/bands)**(1/rows) = 0.72 for 14 x 8
(s=0.8: 92%, s=0.85: 98%, s=0.6: 9%). More rows per band raise the threshold; more bands lower it.
"""

from __future__ import annotations

import os
from typing import Literal

from pydantic import Field, model_validator

from llmctl.config.base import Section


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS has no sched_getaffinity
        return os.cpu_count() or 1


class SlurmOptions(Section):
    """How datatrove's SlurmPipelineExecutor submits the dedup steps (engine: datatrove, executor: slurm)."""

    partition: str = Field("", description="Slurm partition to submit to (required with executor: slurm).")
    time: str = Field("04:00:00", description="Wall-clock limit of each job, HH:MM:SS.")
    cpus_per_task: int = Field(1, ge=1, description="CPUs per task.")
    mem_per_cpu_gb: int = Field(2, ge=1, description="Memory per CPU in GB.")
    workers: int = Field(-1, description="Tasks running at once; -1: no limit.")
    qos: str = Field("normal", description="Slurm quality of service.")
    job_name: str = Field("llmctl-dedup", description="Prefix of the Slurm job names.")
    env_command: str = Field(
        "", description="Shell command run before each job, e.g. activating an environment."
    )
    sbatch_args: dict[str, str] = Field(
        default_factory=dict, description="Extra #SBATCH options, e.g. {account: myproj}."
    )
    poll_seconds: float = Field(
        30.0, gt=0, description="How often to check whether the submitted jobs finished."
    )


class RayOptions(Section):
    """How datatrove's RayPipelineExecutor runs the dedup steps (engine: datatrove, executor: ray)."""

    workers: int = Field(-1, description="Tasks running at once; -1: no limit.")
    cpus_per_task: int = Field(1, ge=1, description="CPUs per Ray task.")
    mem_per_cpu_gb: float = Field(2.0, gt=0, description="Memory per CPU in GB.")


class DedupConfig(Section):
    """Exact and near-duplicate removal; one document is kept per cluster of duplicates."""

    engine: Literal["minhash", "datasketch", "datatrove"] = Field(
        "minhash",
        description=(
            "minhash: llmctl's own MinHash (vectorised numpy signatures, banded LSH, every core); "
            "datasketch: the datasketch library's MinHash and MinHashLSH, one process (~20x slower); "
            "datatrove: datatrove's four-step MinHash pipeline, runnable on Slurm or Ray."
        ),
    )
    exact: bool = Field(
        True, description="Remove exact duplicates (same text up to whitespace and Unicode form)."
    )
    near: bool = Field(True, description="Remove near duplicates found by MinHash LSH.")
    n_grams: int = Field(5, ge=1, description="Words per shingle.")
    bands: int = Field(14, ge=1, description="LSH bands; candidates share all rows of at least one band.")
    rows: int = Field(8, ge=1, description="MinHash values per band; bands x rows hashes per document.")
    seed: int = Field(1, description="Seed of the MinHash permutations.")
    workers: int = Field(
        0,
        ge=0,
        description="Local worker processes; 0 = one per available CPU core (a machine-independent "
        "default, so the config hash is the same everywhere).",
    )
    shard_size: int = Field(
        10_000,
        ge=1,
        description=(
            "Documents per output shard (documents/NNNNN.jsonl.gz). The datatrove engine splits its input "
            "into blocks of this size, one task each, and writes each block's kept documents as one shard."
        ),
    )
    executor: Literal["local", "slurm", "ray"] = Field(
        "local",
        description="Where the datatrove engine runs its steps; slurm and ray need engine: datatrove.",
    )
    slurm: SlurmOptions = Field(default_factory=SlurmOptions, description="Options for executor: slurm.")
    ray: RayOptions = Field(default_factory=RayOptions, description="Options for executor: ray.")

    @property
    def threshold(self) -> float:
        """Jaccard similarity at the midpoint of the LSH S-curve, (1/bands)**(1/rows)."""
        return (1.0 / self.bands) ** (1.0 / self.rows)

    @model_validator(mode="after")
    def _check(self) -> DedupConfig:
        if self.executor != "local" and self.engine != "datatrove":
            raise ValueError(f"executor: {self.executor} needs engine: datatrove")
        if self.executor == "slurm" and not self.slurm.partition:
            raise ValueError("executor: slurm needs slurm.partition")
        return self

    @property
    def local_workers(self) -> int:
        """`workers`, with 0 resolved to the CPU cores this process may use."""
        return self.workers or _cpu_count()
