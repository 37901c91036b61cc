"""Rendering of `llmctl artifacts show`: the manifest, plus kind-specific extras (samples, tokens)."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text


def artifact_extras(artifact, *, samples: int = 0, encode: str | None = None) -> dict[str, Any]:
    """Extra views that need the artifact's files: example documents, tokens of a string."""
    extras: dict[str, Any] = {}
    if samples and artifact.kind == "corpus":
        from llmctl.data.filters import sample_documents

        extras["samples"] = sample_documents(artifact.path, samples)
        from llmctl.data.dedup import removed_samples

        extras["samples"]["removed"] = removed_samples(artifact.path, samples)
    if encode is not None:
        if artifact.kind not in ("tokens", "model"):
            from llmctl.errors import UsageError

            raise UsageError(f"--encode needs a tokens or model artifact; {artifact.id} is {artifact.kind}")
        extras["tokens"] = tokens_of(artifact, encode)
    return extras


def tokens_of(artifact, text: str) -> list[dict[str, Any]]:
    """The tokens of `text` under a tokens or model artifact's tokenizer: [{id, token}]."""
    from llmctl.data.tokenizer import load_tokenizer

    folder = artifact.path / "tokenizer" if artifact.kind == "tokens" else artifact.path
    return [{"id": i, "token": tok} for i, tok in load_tokenizer(folder).inspect(text)]


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
        console.print(Text.assemble(("note: ", "dim"), note))
    sampled = extras.get("samples")
    if sampled:
        table = Table("", "id", "reason", "text", title="samples")
        for doc in sampled.get("kept", []):
            table.add_row("[green]kept[/]", Text(doc["id"]), "", Text(_short(doc["text"])))
        for doc in sampled.get("excluded", []):
            table.add_row(
                "[red]dropped[/]",
                Text(doc["id"]),
                Text(str(doc.get("reason") or "")),
                Text(_short(doc["text"])),
            )
        console.print(table)
        if sampled.get("removed"):
            removed = Table("removed id", "duplicate of", "kind", title="duplicates removed")
            for row in sampled["removed"]:
                removed.add_row(Text(str(row["id"])), Text(str(row["duplicate_of"])), row.get("kind", ""))
            console.print(removed)
    tokens = extras.get("tokens")
    if tokens:
        render_tokens(console, f"{len(tokens)} tokens", tokens)


def render_tokens(console: Console, title: str, tokens: list[dict[str, Any]]) -> None:
    table = Table("#", "id", "token", title=title)
    for i, tok in enumerate(tokens):
        table.add_row(str(i), str(tok["id"]), Text(tok["token"]))
    console.print(table)
