"""Code and docs cite only what the repository holds: every document named like `README.md` (capitals)
in the package, tests, benchmarks, templates, completions or the README exists in the repository, and
nothing points into folders that exist only on some machine (a style guide or notes beside the
checkout)."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SCANNED = ("llmctl", "tests", "benchmarks", "templates", "completions", "README.md")
MD_NAME = re.compile(r"\b[A-Z][A-Z_]+\.md\b")
OUTSIDE = re.compile(r"\bSTYLE\b|(?<![\w.])shared/|\.\./")


def _files() -> list[Path]:
    files = []
    for name in SCANNED:
        path = REPO / name
        files += [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    here = Path(__file__).resolve()
    return [p for p in files if p.resolve() != here and "__pycache__" not in p.parts and p.suffix != ".pyc"]


def test_no_citation_of_files_outside_the_repository():
    known = {p.name for p in REPO.rglob("*.md") if ".git" not in p.parts}
    offenders = []
    for path in _files():
        try:
            text = path.read_text()
        except UnicodeDecodeError:
            continue
        for number, line in enumerate(text.splitlines(), 1):
            missing = [m for m in MD_NAME.findall(line) if Path(m).name not in known]
            if missing or OUTSIDE.search(line):
                offenders.append(f"{path.relative_to(REPO)}:{number}: {line.strip()[:120]}")
    assert not offenders, "cites something the repository does not hold:\n" + "\n".join(offenders)
