"""The model card: a README.md the Hugging Face hub shows, built from a `Summary`.

    text = render_card(summary, license="apache-2.0")

A YAML metadata header (license, base_model when the chain starts from a hub model, datasets, tags)
then one section per part of the summary. `sections(summary)` is shared with the HTML page, so the
two say the same things; a section whose stages are not in the lineage says so rather than vanishing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import yaml

from llmctl.report.collect import Summary, TrainingRun

# Section slugs, in order; the page adds plots under the ones that have them.
SECTION_TITLES = {
    "data": "Data",
    "tokenizer": "Tokenizer",
    "model": "Model",
    "training": "Training",
    "post-training": "Post-training",
    "evaluation": "Evaluation",
    "quantization": "Quantization",
    "lineage": "Lineage",
    "environment": "Environment",
}


@dataclass(frozen=True)
class Section:
    slug: str
    title: str
    markdown: str


def fmt(value: Any, digits: int = 4) -> str:
    """Numbers for people: thousands separators for ints, 4 significant digits for floats."""
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if value != 0 and (abs(value) >= 1e6 or abs(value) < 1e-3):
            return f"{value:.{digits - 1}e}"
        return f"{value:.{digits}g}"
    return str(value)


def _table(header: list[str], rows: list[list[Any]]) -> str:
    def cell(v: Any) -> str:
        return (v if isinstance(v, str) else fmt(v)).replace("|", "\\|")

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def metadata(summary: Summary, license: str) -> dict[str, Any]:
    """The card's YAML header (hub model-card metadata)."""
    tags = ["llmctl", "text-generation"]
    tags += [t.stage for t in summary.training if t.stage not in tags]
    if summary.quantize and summary.stage == "quantize":
        tags.append("quantized")
    meta: dict[str, Any] = {"license": license}
    if summary.base_model:
        meta["base_model"] = summary.base_model
    if summary.datasets:
        meta["datasets"] = summary.datasets
    meta["tags"] = tags
    meta["library_name"] = "transformers"
    meta["pipeline_tag"] = "text-generation"
    return meta


def missing_note(summary: Summary) -> str:
    if not summary.missing:
        return ""
    items = "; ".join(
        f"{m.id} (the `{m.slot}` input of {m.consumer}) is no longer in the workspace"
        for m in summary.missing
    )
    return (
        f"> **Incomplete lineage:** {items}. What it recorded, and everything it was made from, is not "
        "in this card.\n"
    )


def _absent(s: Summary, what: str) -> str:
    """What a section says when the lineage has none of its stages: unknown when ancestors are gone."""
    if s.missing:
        gone = ", ".join(m.id for m in s.missing)
        return f"No {what} found: the lineage is incomplete ({gone} no longer in the workspace)."
    return f"No {what} in the lineage."


def _data(s: Summary) -> str:
    f = s.funnel
    if f is None:
        return _absent(s, "data stages (dedup, filter, tokenize)")
    rows = [
        ["documents in", f.documents_in],
        ["after dedup", f.after_dedup],
        ["after filter", f.after_filter],
        ["tokenized documents", f.tokenized_documents],
        ["train tokens", f.tokens],
        ["val tokens", f.val_tokens],
    ]
    out = [
        f"From {', '.join(f'`{x}`' for x in f.sources) or 'the raw sources'} ({', '.join(f.artifacts)}).",
        "",
    ]
    out.append(_table(["step", "count"], [r for r in rows if r[1] is not None]))
    if f.removals:
        out += ["", "Removed documents, by reason:", ""]
        out.append(
            _table(["stage", "reason", "documents"], [[r.stage, r.reason, r.documents] for r in f.removals])
        )
    return "\n".join(out)


def _tokenizer(s: Summary) -> str:
    t = s.tokenizer
    if t is None:
        vocab = s.model.vocab_size if s.model else None
        return _absent(s, "tokenize stage") + f" The model's vocabulary: {fmt(vocab)} tokens."
    return _table(
        ["artifact", "vocab size", "bytes per token", "trained here", "encoder", "tokenizer id"],
        [[t.artifact, t.vocab_size, t.bytes_per_token, t.trained, t.encoder, t.tokenizer_id]],
    )


def _model(s: Summary) -> str:
    m = s.model
    if m is None:
        return _absent(s, "model")
    return (
        _table(
            [
                "parameters",
                "n_layer",
                "n_head",
                "n_kv_head",
                "n_embd",
                "mlp width",
                "vocab",
                "context",
                "tied embeddings",
            ],
            [
                [
                    m.params,
                    m.n_layer,
                    m.n_head,
                    m.n_kv_head,
                    m.n_embd,
                    m.intermediate_size,
                    m.vocab_size,
                    m.max_seq_len,
                    m.tie_word_embeddings,
                ]
            ],
        )
        + f"\n\n{m.architecture or 'Llama'}-compatible folder (config of {m.artifact})."
    )


def _training_table(runs: list[TrainingRun]) -> str:
    return _table(
        [
            "stage",
            "artifact",
            "steps",
            "tokens",
            "train time (s)",
            "stage time (s)",
            "hardware",
            "final train loss",
            "final val loss",
        ],
        [
            [
                t.stage,
                t.artifact,
                t.steps,
                t.tokens,
                t.train_seconds,
                t.stage_seconds,
                t.hardware,
                t.train_loss,
                t.val_loss,
            ]
            for t in runs
        ],
    )


def _training(s: Summary) -> str:
    runs = s.pretraining
    if not runs:
        if s.imported_from:
            return (
                f"No pretraining in the lineage: the chain starts from an imported model, {s.imported_from}."
            )
        return _absent(s, "pretraining")
    return _training_table(runs)


def _post_training(s: Summary) -> str:
    runs = s.post_training
    if not runs:
        return _absent(s, "post-training stages")
    out = [_training_table(runs)]
    for t in runs:
        extra = {
            k: v
            for k, v in t.metrics.items()
            if k not in ("steps", "tokens", "train_loss", "val_loss", "train_seconds")
        }
        if extra:
            out += [
                "",
                f"**{t.stage}** ({t.artifact}): " + ", ".join(f"{k} {fmt(v)}" for k, v in extra.items()),
            ]
    return "\n".join(out)


def _evaluation(s: Summary) -> str:
    if not s.evals:
        return "No eval artifacts of this model or its ancestors."
    rows = [
        [e.artifact, e.model, sc.task, sc.metric, sc.value, sc.stderr, sc.n]
        for e in s.evals
        for sc in e.scores
    ]
    return (
        "Every eval artifact of this model and of the models it was made from (± is the standard error; "
        "— where the task has none).\n\n"
        + _table(["eval", "model", "task", "metric", "value", "stderr", "n"], rows)
    )


def _quantization(s: Summary) -> str:
    if not s.quantize:
        return "No quantized version of this model."
    out = []
    for q in s.quantize:
        size = ""
        if q.bytes_source and q.bytes_quantized:
            size = f", {q.bytes_source / 1e6:.1f} MB → {q.bytes_quantized / 1e6:.1f} MB on disk"
        pct = f", perplexity {q.ppl_increase_pct:+.3f}%" if q.ppl_increase_pct is not None else ""
        out.append(f"{q.artifact} from {q.model}: {q.method or '?'}{size}{pct}.")
        out.append("")
        out.append(
            _table(
                ["score", "source", "quantized", "delta"],
                [[d.score, d.source, d.quantized, d.delta] for d in q.deltas],
            )
        )
        out.append("")
    return "\n".join(out).rstrip()


def _lineage(s: Summary) -> str:
    rows = []
    for n in s.lineage:
        name = ("· " * n.depth) + n.id
        status = {
            "missing": "**missing**",
            "changed": "changed since use",
            "copy": f"copy of {n.copy_of}",
        }.get(n.status, "ok")
        rows.append(
            [
                name,
                n.kind,
                n.slot or "(this card)",
                status,
                (n.manifest_sha256 or "")[:16] or "—",
                (n.content_sha256 or "")[:16] or "—",
            ]
        )
    return (
        "Newest first; hashes as each consumer recorded them (first 16 hex digits of sha256).\n\n"
        + _table(["artifact", "kind", "as input", "status", "manifest sha256", "content sha256"], rows)
    )


def _environment(s: Summary) -> str:
    env = s.environment
    rows = [["llmctl (made it)", s.llmctl_version], ["llmctl (wrote this card)", s.report_llmctl_version]]
    if s.code.get("source_sha256"):
        rows.append(["llmctl source sha256", s.code["source_sha256"][:16]])
    rows += [[k, str(v)] for k, v in env.items()]
    return _table(["what", "value"], rows)


_RENDERERS = {
    "data": _data,
    "tokenizer": _tokenizer,
    "model": _model,
    "training": _training,
    "post-training": _post_training,
    "evaluation": _evaluation,
    "quantization": _quantization,
    "lineage": _lineage,
    "environment": _environment,
}


def title(summary: Summary) -> str:
    return f"{summary.project or 'llmctl'}: {summary.subject}"


def intro(summary: Summary) -> str:
    params = summary.model.params if summary.model else None
    what = f"A {fmt(params)}-parameter language model" if params else f"A {summary.kind} artifact"
    return (
        f"{what} built with llmctl {summary.llmctl_version}: "
        f"artifact `{summary.subject}` ({summary.stage}), published {summary.created}."
    )


def sections(summary: Summary) -> list[Section]:
    return [Section(slug, SECTION_TITLES[slug], render(summary)) for slug, render in _RENDERERS.items()]


def render_card(summary: Summary, license: str = "other") -> str:
    header = yaml.safe_dump(metadata(summary, license), sort_keys=False, allow_unicode=True)
    parts = [f"---\n{header}---", f"# {title(summary)}", intro(summary)]
    if note := missing_note(summary):
        parts.append(note.rstrip())
    parts += [f"## {sec.title}\n\n{sec.markdown}" for sec in sections(summary)]
    return "\n\n".join(parts) + "\n"
