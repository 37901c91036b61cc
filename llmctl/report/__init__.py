"""Model card and report of an artifact, from the manifests along its lineage (`llmctl report`).

    from llmctl.report import collect, write_report
    summary = collect(workspace, workspace.resolve("grpo:latest"))
    paths = write_report(summary, Path("reports/grpo-v0001"))   # README.md + report.html

collect.py gathers a typed summary, card.py renders the hub model card (markdown with a YAML
header), html.py the self-contained page with plots. Nothing here writes into an artifact folder:
artifacts are immutable (their manifest hashes every file), so the report goes to its own folder.
"""

from __future__ import annotations

from pathlib import Path

from llmctl.report.collect import Summary, collect

CARD_FILE = "README.md"
HTML_FILE = "report.html"

__all__ = ["CARD_FILE", "HTML_FILE", "Summary", "collect", "write_report"]


def write_report(summary: Summary, out_dir: Path, license: str = "other") -> dict[str, Path]:
    """Write README.md (the model card) and report.html into `out_dir`; returns their paths."""
    from llmctl.report.card import render_card
    from llmctl.report.html import render_html

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"card": out_dir / CARD_FILE, "html": out_dir / HTML_FILE}
    for key, text in (("card", render_card(summary, license)), ("html", render_html(summary))):
        tmp = paths[key].with_name(paths[key].name + ".tmp")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(paths[key])
    return paths
