"""Rendering of `llmctl artifacts show`: the manifest, plus kind-specific extras (samples, tokens)."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table


def artifact_extras(artifact, *, samples: int = 0, encode: str | None = None) -> dict[str, Any]:
    """Extra views that need the artifact's files: example documents, tokens of a string."""
    extras: dict[str, Any] = {}
    if samples and artifact.kind == "corpus":
        from llmctl.data.filters import sample_documents

        extras["samples"] = sample_documents(artifact.path, samples)
    if encode is not None:
        if artifact.kind not in ("tokens", "model"):
            from llmctl.errors import UsageError

            raise UsageError(f"--encode needs a tokens or model artifact; {artifact.id} is {artifact.kind}")
        from llmctl.data.tokenizer import inspect_tokens, load_tokenizer

        folder = artifact.path / "tokenizer" if artifact.kind == "tokens" else artifact.path
        extras["tokens"] = inspect_tokens(load_tokenizer(folder), encode)
    return extras


def _short(text: str, width: int = 160) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def render_artifact(console: Console, artifact, extras: dict[str, Any]) -> None:
    m = artifact.manifest
    head = Table.grid(padding=(0, 2))
    head.add_row("[bold]id[/]", m.id)
    head.add_row("kind", m.kind)
    head.add_row("path", str(artifact.path))
    head.add_row("created", f"{m.started_at} → {m.finished_at}")
    head.add_row("config hash", m.config_hash[:16])
    head.add_row("inputs", ", ".join(f"{i.slot}={i.id}" for i in m.inputs) or "-")
    if m.sources:
        head.add_row("sources", ", ".join(str(s.get("path") or s.get("repo")) for s in m.sources))
    head.add_row("files", f"{len(m.files)} ({sum(f.bytes for f in m.files):,} bytes)")
    console.print(head)
    if m.metrics:
        table = Table("metric", "value", title="metrics")
        for key, value in m.metrics.items():
            table.add_row(key, _short(str(value), 100))
        console.print(table)
    for note in m.notes:
        console.print(f"[dim]note:[/] {note}", highlight=False)
    sampled = extras.get("samples")
    if sampled:
        table = Table("", "id", "reason", "text", title="samples")
        for doc in sampled.get("kept", []):
            table.add_row("[green]kept[/]", doc["id"], "", _short(doc["text"]))
        for doc in sampled.get("excluded", []):
            table.add_row("[red]dropped[/]", doc["id"], doc.get("reason", ""), _short(doc["text"]))
        console.print(table)
    tokens = extras.get("tokens")
    if tokens:
        table = Table("#", "id", "token", title=f"{len(tokens)} tokens")
        for i, tok in enumerate(tokens):
            table.add_row(str(i), str(tok["id"]), repr(tok["token"]))
        console.print(table)
