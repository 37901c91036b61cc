"""Which code makes an artifact: llmctl's version plus a fingerprint of llmctl's own source files.

    code_identity()  # {'llmctl_version': '0.1.0', 'source_sha256': '3f1c...'}

The identity joins every stage's reuse key (see `manifest.inputs_key`) and its manifest, so a fix to
llmctl's code reruns a stage instead of silently reusing an artifact the old code made. The version
alone would not do: an editable install keeps its version through every edit.

The fingerprint hashes every `.py` file of the installed package (relative path and content). It is
computed once per process, and again only when a file's size or mtime changed (a stat per file, no
reads), which keeps the check cheap for commands that plan several stages.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import llmctl

PACKAGE_ROOT = Path(llmctl.__file__).resolve().parent

_cache: dict[Path, tuple[tuple, str]] = {}


def _stats(root: Path) -> tuple[tuple[str, int, int], ...]:
    stats = []
    for path in sorted(root.rglob("*.py")):
        st = path.stat()
        stats.append((path.relative_to(root).as_posix(), st.st_size, st.st_mtime_ns))
    return tuple(stats)


def source_fingerprint(root: Path = PACKAGE_ROOT) -> str:
    """sha256 over the relative path and bytes of every `.py` file under `root`."""
    stats = _stats(root)
    cached = _cache.get(root)
    if cached is not None and cached[0] == stats:
        return cached[1]
    digest = hashlib.sha256()
    for rel, _, _ in stats:
        digest.update(rel.encode() + b"\0")
        digest.update(hashlib.sha256((root / rel).read_bytes()).digest())
    fingerprint = digest.hexdigest()
    _cache[root] = (stats, fingerprint)
    return fingerprint


def code_identity() -> dict[str, str]:
    """What a manifest records as the code that made an artifact, and what reuse compares."""
    return {"llmctl_version": llmctl.__version__, "source_sha256": source_fingerprint()}
