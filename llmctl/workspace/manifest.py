"""The artifact manifest: what a stage run produced, from what, with which config and code.

`manifest.json` is written last, inside the run directory, just before the atomic rename that
publishes the artifact, so a folder under artifacts/ with a manifest is always complete.
"""

from __future__ import annotations

import hashlib
import json
import platform
import sys
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

MANIFEST_FILE = "manifest.json"
# 2: inputs given by path record their content hash and the artifact they are a copy of.
# 3: `code` records llmctl's version and source fingerprint; it joins the input key.
# Older manifests read unchanged (the new fields are optional); they are never up to date.
SCHEMA_VERSION = 3


class InputRecord(BaseModel):
    """One input artifact, pinned by id and by the hash of its manifest."""

    model_config = ConfigDict(extra="forbid")
    slot: str = Field(description="The stage's name for this input (corpus, data, init, model, ...).")
    ref: str = Field(description="The reference as given or defaulted (e.g. dedup:latest).")
    id: str = Field(description="Resolved artifact id, e.g. dedup:v0003.")
    kind: str = Field(description="Artifact kind of the input.")
    manifest_sha256: str = Field(description="sha256 of the input's manifest.json.")
    content_sha256: str | None = Field(
        default=None, description="Hash of the input's files (relative paths and sha256s)."
    )
    copy_of: str | None = Field(
        default=None,
        description="For an input given by a path outside the workspace: the artifact id its manifest "
        "claims. `id` is then copy:<content hash>, never the claimed id.",
    )
    path: str | None = Field(default=None, description="The folder, for an input given by path.")


class FileRecord(BaseModel):
    model_config = ConfigDict(extra="forbid")
    path: str = Field(description="Path relative to the artifact folder.")
    bytes: int
    sha256: str


class Manifest(BaseModel):
    """Everything needed to trust, reproduce and consume an artifact."""

    model_config = ConfigDict(extra="forbid")
    schema_version: int = SCHEMA_VERSION
    id: str = Field(description="STAGE:vNNNN, unique within the workspace.")
    stage: str
    kind: str = Field(description="Output kind (corpus, tokens, model, eval, ...).")
    version: int
    status: str = "complete"
    started_at: str
    finished_at: str
    llmctl_version: str
    project: str | None = None
    project_git_commit: str | None = None
    config: dict[str, Any] = Field(description="The resolved config sections this stage read.")
    config_hash: str
    inputs: list[InputRecord] = Field(default_factory=list)
    sources: list[dict[str, Any]] = Field(
        default_factory=list, description="Fingerprints of raw data sources read directly."
    )
    files: list[FileRecord] = Field(default_factory=list)
    metrics: dict[str, Any] = Field(default_factory=dict)
    environment: dict[str, Any] = Field(default_factory=dict)
    notes: list[str] = Field(default_factory=list, description="Inherited/overridden values, warnings.")
    code: dict[str, str] = Field(
        default_factory=dict,
        description="The code that made it: llmctl_version and source_sha256 (see workspace/code.py).",
    )

    def input_key(self) -> str:
        return inputs_key(self.inputs, self.sources, self.code)


def inputs_key(inputs: list[InputRecord], sources: list[dict[str, Any]], code: dict[str, str]) -> str:
    """What 'the same inputs' means for up-to-date checks: input manifests, source fingerprints and
    the code that runs the stage (a code change must not reuse what older code made)."""
    return stable_hash(
        {"inputs": [(i.slot, i.id, i.manifest_sha256) for i in inputs], "sources": sources, "code": code}
    )


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def stable_hash(obj: Any) -> str:
    """sha256 of a canonical JSON encoding (sorted keys), used for config and input identity."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def environment_info(device: str = "cpu") -> dict[str, Any]:
    """Versions that decide reproducibility; torch is read from metadata so nothing heavy is imported."""

    def version(name: str) -> str | None:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return None

    info: dict[str, Any] = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": version("torch"),
        "device": device,
    }
    if "torch" in sys.modules:
        torch = sys.modules["torch"]
        info["torch_threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            info["cuda"] = torch.version.cuda
            info["gpu"] = torch.cuda.get_device_name(0)
    return info
