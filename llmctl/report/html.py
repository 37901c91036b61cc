"""The report page: one self-contained HTML file with the card's sections and plots.

    page = render_html(summary, license="other")

The sections are the card's (`card.sections`), rendered from the same markdown; plots are drawn with
matplotlib and inlined as SVG, so the page needs no network and no JavaScript: loss curves of each
training stage, the data funnel, eval scores per task across the eval artifacts of the model chain,
and grpo's reward curve. Each plot is a `<figure class="plot" data-plot="NAME">`.
"""

from __future__ import annotations

import html
import io
from typing import Any

from markdown_it import MarkdownIt

from llmctl.report.card import intro, missing_note, sections, title
from llmctl.report.collect import Summary, TrainingRun

_CSS = """
body { font: 15px/1.5 system-ui, sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em; color: #1f2328; }
h1 { font-size: 1.6em; } h2 { border-bottom: 1px solid #d0d7de; padding-bottom: .2em; margin-top: 1.8em; }
table { border-collapse: collapse; margin: .6em 0; font-size: 13px; }
th, td { border: 1px solid #d0d7de; padding: 3px 8px; text-align: left; }
th { background: #f6f8fa; } code { background: #f6f8fa; padding: 0 .2em; }
blockquote { border-left: 4px solid #d4a72c; background: #fff8c5; margin: 1em 0; padding: .2em 1em; }
figure.plot { margin: 1em 0; } figure.plot svg { max-width: 100%; height: auto; }
figcaption { font-size: 13px; color: #59636e; }
"""


def render_html(summary: Summary) -> str:
    md = MarkdownIt("commonmark", {"html": False}).enable("table")
    plots = _plots(summary)
    body = [f"<h1>{html.escape(title(summary))}</h1>", md.render(intro(summary))]
    if note := missing_note(summary):
        body.append(md.render(note))
    for sec in sections(summary):
        body.append(f'<section id="{sec.slug}">\n<h2>{html.escape(sec.title)}</h2>')
        body.append(md.render(sec.markdown))
        body += [_figure(name, caption, svg) for name, caption, svg in plots.get(sec.slug, [])]
        body.append("</section>")
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{html.escape(title(summary))}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
        + "\n".join(body)
        + "\n</body>\n</html>\n"
    )


def _figure(name: str, caption: str, svg: str) -> str:
    return (
        f'<figure class="plot" data-plot="{html.escape(name)}">\n{svg}\n'
        f"<figcaption>{html.escape(caption)}</figcaption>\n</figure>"
    )


def _plots(s: Summary) -> dict[str, list[tuple[str, str, str]]]:
    """section slug -> [(plot name, caption, inline svg)]."""
    import matplotlib

    matplotlib.use("Agg")
    out: dict[str, list[tuple[str, str, str]]] = {}
    if s.funnel is not None and s.funnel.documents_in is not None:
        out.setdefault("data", []).append(("data-funnel", "Documents through each step", _funnel_svg(s)))
    for t in s.training:
        slug = "training" if t.stage == "pretrain" else "post-training"
        if t.curves.get("loss") or t.curves.get("val_loss"):
            out.setdefault(slug, []).append(
                (
                    f"loss-{t.stage}",
                    f"{t.stage} ({t.artifact}): loss per step",
                    _curves_svg(t, ("loss", "val_loss")),
                )
            )
        if t.curves.get("reward") or t.curves.get("val_reward"):
            out.setdefault(slug, []).append(
                (
                    f"reward-{t.stage}",
                    f"{t.stage} ({t.artifact}): reward per step",
                    _curves_svg(t, ("reward", "val_reward")),
                )
            )
    if any(e.scores for e in s.evals):
        out.setdefault("evaluation", []).append(
            ("eval-scores", "Scores per task, one bar per eval artifact (± standard error)", _evals_svg(s))
        )
    return out


def _svg(fig: Any, name: str) -> str:
    """The figure as an inline <svg> element (no XML prolog or DOCTYPE, which names a URL)."""
    import matplotlib.pyplot as plt

    buf = io.StringIO()
    # Ids of clip paths and markers are hashes salted per figure, so figures on one page never share one.
    # Text stays <text> (searchable, selectable, small) rather than glyph outlines.
    with plt.rc_context({"svg.hashsalt": name, "svg.fonttype": "none"}):
        fig.savefig(buf, format="svg", bbox_inches="tight", metadata={"Date": None})
    plt.close(fig)
    text = buf.getvalue()
    return text[text.index("<svg") :].strip()


def _funnel_svg(s: Summary) -> str:
    import matplotlib.pyplot as plt

    f = s.funnel
    assert f is not None
    steps = [("in", f.documents_in), ("after dedup", f.after_dedup), ("after filter", f.after_filter)]
    steps = [(label, n) for label, n in steps if n is not None]
    removals = sorted(f.removals, key=lambda r: -r.documents)
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 0.4 * max(len(removals), 4) + 1.2))
    left.barh([label for label, _ in steps][::-1], [n for _, n in steps][::-1], color="#4c72b0")
    left.set_xlabel("documents")
    left.set_title("documents kept")
    if removals:
        right.barh(
            [f"{r.stage}: {r.reason}" for r in removals][::-1],
            [r.documents for r in removals][::-1],
            color="#c44e52",
        )
        right.set_xlabel("documents removed")
    right.set_title("removed, by reason")
    fig.tight_layout()
    return _svg(fig, "data-funnel")


def _curves_svg(t: TrainingRun, keys: tuple[str, ...]) -> str:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.2))
    for key in keys:
        points = t.curves.get(key) or []
        if points:
            style = {"marker": "o"} if key.startswith("val_") else {}
            ax.plot([p[0] for p in points], [p[1] for p in points], label=key, **style)
    ax.set_xlabel("step")
    ax.set_title(f"{t.stage} ({t.artifact})")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return _svg(fig, f"{keys[0]}-{t.artifact}")


def _evals_svg(s: Summary) -> str:
    import matplotlib.pyplot as plt

    keys: list[tuple[str, str]] = []
    for e in s.evals:
        for sc in e.scores:
            if (sc.task, sc.metric) not in keys and sc.value is not None:
                keys.append((sc.task, sc.metric))
    cols = min(3, len(keys))
    rows = -(-len(keys) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 2.8 * rows + 0.4 * len(s.evals)), squeeze=False)
    labels = [f"{e.artifact} ({e.model})" for e in s.evals]
    colors = plt.get_cmap("tab10")
    for ax, (task, metric) in zip(axes.flat, keys, strict=False):
        for i, e in enumerate(s.evals):
            score = next((sc for sc in e.scores if (sc.task, sc.metric) == (task, metric)), None)
            if score is None or score.value is None:
                continue
            ax.bar(i, score.value, yerr=score.stderr, color=colors(i % 10), capsize=3, label=labels[i])
        ax.set_title(f"{task}/{metric}", fontsize=10)
        ax.set_xticks([])
    for ax in list(axes.flat)[len(keys) :]:
        ax.axis("off")
    handles = [plt.Rectangle((0, 0), 1, 1, color=colors(i % 10)) for i in range(len(labels))]
    fig.legend(handles, labels, loc="lower center", ncol=1, fontsize=9, frameon=False)
    fig.tight_layout(rect=(0, 0.08 * len(labels) / max(rows, 1), 1, 1))
    return _svg(fig, "eval-scores")
