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
    from llmctl.data.shards import TOKENIZER_DIR
    from llmctl.data.tokenizer import load_tokenizer

    folder = artifact.path / TOKENIZER_DIR if artifact.kind == "tokens" else artifact.path
    return [{"id": i, "token": tok} for i, tok in load_tokenizer(folder).inspect(text)]


def _short(text: str, width: int = 160) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def format_value(value: Any, list_width: int = 8) -> str:
    """A metric value for people: numbers with separators / 4 significant digits, lists and dicts
    spelled out (long lists elided in the middle, with their length), never a Python repr."""
    if isinstance(value, bool) or value is None:
        return str(value).lower() if value is not None else "-"
    if isinstance(value, float):
        return f"{value:,.4g}"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, dict):
        return ", ".join(f"{k}={format_value(v)}" for k, v in value.items()) or "-"
    if isinstance(value, list | tuple):
        items = [format_value(v) for v in value]
        if len(items) > list_width:
            half = list_width // 2
            items = [*items[:half], "…", *items[-half:], f"({len(value)} values)"]
        return ", ".join(items) or "-"
    return str(value)


def _flatten(metrics: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    rows = []
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value and all(not isinstance(v, dict | list) for v in value.values()):
            rows += [(f"{name}.{k}", v) for k, v in value.items()]
        elif isinstance(value, dict):
            rows += _flatten(value, f"{name}.")
        else:
            rows.append((name, value))
    return rows


def render_metrics(console: Console, metrics: dict[str, Any]) -> None:
    """Scalars (and flattened dicts) in one table; each list of records in a table of its own."""
    table = Table("metric", "value", title="metrics")
    record_lists = []
    for key, value in _flatten(metrics):
        if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            record_lists.append((key, value))
        else:
            table.add_row(Text(key), Text(format_value(value)))
    console.print(table)
    for key, records in record_lists:
        columns = list(dict.fromkeys(k for record in records for k in record))
        sub = Table(*columns, title=key)
        for record in records:
            sub.add_row(*(Text(format_value(record.get(c))) for c in columns))
        console.print(sub)


def render_artifact(console: Console, artifact, extras: dict[str, Any]) -> None:
    m = artifact.manifest
    head = Table.grid(padding=(0, 2))
    head.add_row(Text("id", "bold"), m.id)
    head.add_row("kind", m.kind)
    head.add_row("path", Text(str(artifact.path)))
    head.add_row("created", f"{m.started_at} → {m.finished_at}")
    head.add_row("config hash", m.config_hash[:16])
    head.add_row(
        "inputs",
        Text(
            ", ".join(
                f"{i.slot}={i.id}" + (f" (a copy of {i.copy_of}, from {i.path})" if i.copy_of else "")
                for i in m.inputs
            )
            or "-"
        ),
    )
    if m.sources:
        head.add_row("sources", Text(", ".join(str(s.get("path") or s.get("repo")) for s in m.sources)))
    head.add_row("files", f"{len(m.files)} ({sum(f.bytes for f in m.files):,} bytes)")
    problems = extras.get("integrity", {}).get("problems", [])
    if problems:
        head.add_row(Text("integrity", "red"), Text("changed since published: " + "; ".join(problems), "red"))
    else:
        head.add_row("integrity", "files match the manifest")
    console.print(head)
    if m.metrics:
        render_metrics(console, m.metrics)
    for note in m.notes:
        console.print(Text.assemble(("note: ", "dim"), note))
    sampled = extras.get("samples")
    if sampled:
        table = Table("", "id", "reason", "text", title="samples")
        for doc in sampled.get("kept", []):
            table.add_row(Text("kept", "green"), Text(doc["id"]), "", Text(_short(doc["text"])))
        for doc in sampled.get("excluded", []):
            table.add_row(
                Text("dropped", "red"),
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
