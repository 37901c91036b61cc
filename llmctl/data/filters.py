"""Quality filtering: run the configured `filter.steps` over a document stream, counting everything.

    metrics = run_filters(iter_corpus(dedup_dir), run_dir, cfg.filter, reporter, project_dir)

writes the kept documents to `run_dir/documents/` (the corpus format of llmctl.data.corpus) and,
with `keep_excluded`, each step's dropped documents to `run_dir/excluded/<step>/` with the reason
in `metadata.filter_reason`. The returned metrics hold per-step documents in/out and drop counts
per reason. `sample_documents(artifact_dir, n)` picks kept and excluded examples for people.

The steps are datatrove's filters and formatters (GopherQualityFilter, C4QualityFilter, ...), called
document by document through their `filter()`/`format()` methods, plus three small filters of ours
(length, regex, bad words). Two deviations from datatrove's defaults, both for speed and offline use:

* words and sentences are split with a regex tokenizer (`RegexWordTokenizer`) instead of spaCy, which
  datatrove loads by default: spaCy is ~8x slower on this workload and may need downloads;
* URLFilter's tldextract uses its bundled public-suffix snapshot instead of fetching one.

On large inputs the steps run in worker processes over batches (output order is kept), so every core
works; small inputs stay in-process, where starting workers would cost more than it saves.
"""

from __future__ import annotations

import multiprocessing
import os
import re
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

import regex
from datatrove.data import Document
from datatrove.pipeline.filters.base_filter import BaseFilter, get_filter_result
from datatrove.pipeline.formatters.base import BaseFormatter
from datatrove.utils.text import TERMINAL_PUNCTUATION
from datatrove.utils.word_tokenizers import WordTokenizer

from llmctl.config.filter import (
    BadWordsStep,
    C4QualityStep,
    FilterConfig,
    FineWebQualityStep,
    GopherQualityStep,
    GopherRepetitionStep,
    LanguageStep,
    LengthStep,
    PiiStep,
    RegexStep,
    UrlStep,
)
from llmctl.data.corpus import DOCUMENTS_DIR, CorpusWriter, corpus_files, iter_shard
from llmctl.data.workers import worker_pool
from llmctl.errors import ConfigError, InputError
from llmctl.reporting import Reporter

EXCLUDED_DIR = "excluded"
BATCH_SIZE = 256
# Below this many documents a worker pool costs more (process start, datatrove import) than it saves.
PARALLEL_MIN_DOCS = 4096
MAX_WORKERS = 8

# ---------------------------------------------------------------------------------------------
# tokenizer


class RegexWordTokenizer(WordTokenizer):
    """Words are runs of letters/digits (with inner - or '), each run of punctuation is one token;
    sentences end at terminal punctuation or a newline. Close to spaCy's output on the statistics the
    Gopher/C4/FineWeb rules use, without loading spaCy."""

    _word = regex.compile(r"\w+(?:[-'’]\w+)*|[^\w\s]+")
    _sent_end = regex.compile(
        "[" + re.escape("".join(sorted(TERMINAL_PUNCTUATION))) + r"]+[\"'”’)\]]*(?=\s|$)|\n+"
    )

    def __init__(self) -> None:
        super().__init__("regex")

    def word_tokenize(self, text: str) -> list[str]:
        return self._word.findall(text)

    def span_tokenize(self, text: str) -> list[tuple[int, int]]:
        spans, start = [], 0
        for m in self._sent_end.finditer(text):
            if text[start : m.end()].strip():
                spans.append((start, m.end()))
            start = m.end()
        if text[start:].strip():
            spans.append((start, len(text)))
        return spans

    def sent_tokenize(self, text: str) -> list[str]:
        return [text[a:b].strip() for a, b in self.span_tokenize(text)]


# One shared instance: datatrove caches tokenizers and split results keyed on it.
WORD_TOKENIZER = RegexWordTokenizer()

# ---------------------------------------------------------------------------------------------
# our small filters


class LengthFilter(BaseFilter):
    """Drop documents outside [min, max] characters and/or whitespace-separated words."""

    name = "📏 Length"

    def __init__(
        self, min_chars: int | None, max_chars: int | None, min_words: int | None, max_words: int | None
    ):
        super().__init__()
        self.min_chars, self.max_chars, self.min_words, self.max_words = (
            min_chars,
            max_chars,
            min_words,
            max_words,
        )

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        n = len(doc.text)
        if self.min_chars is not None and n < self.min_chars:
            return False, "too_few_chars"
        if self.max_chars is not None and n > self.max_chars:
            return False, "too_many_chars"
        if self.min_words is not None or self.max_words is not None:
            w = len(doc.text.split())
            if self.min_words is not None and w < self.min_words:
                return False, "too_few_words"
            if self.max_words is not None and w > self.max_words:
                return False, "too_many_words"
        return True


class RegexBlockFilter(BaseFilter):
    """Drop documents matching any pattern; the reason names the pattern's index (`pattern_0`, ...)."""

    name = "🕵 Regex block-list"

    def __init__(self, patterns: list[str], ignore_case: bool = False):
        super().__init__()
        flags = re.IGNORECASE if ignore_case else 0
        self.patterns = [re.compile(p, flags) for p in patterns]

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        for i, p in enumerate(self.patterns):
            if p.search(doc.text):
                return False, f"pattern_{i}"
        return True


class BadWordsFilter(BaseFilter):
    """Drop documents containing a listed word or phrase (case-insensitive, whole words), like
    C4's bad-words rule but from a local list (datatrove's C4BadWordsFilter downloads its lists)."""

    name = "🤬 Bad words"

    def __init__(self, words: list[str], keep_fraction: float = 0.0, seed: int = 0):
        super().__init__()
        import random

        words = sorted({w.strip().lower() for w in words if w.strip() and not w.startswith("#")}, key=len)[
            ::-1
        ]
        self.regex = (
            re.compile(r"(?:\W|^)(" + "|".join(re.escape(w) for w in words) + r")(?:\W|$)") if words else None
        )
        self.keep_fraction = keep_fraction
        self.rng = random.Random(seed)

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        if self.regex is None or not self.regex.search(doc.text.lower()):
            return True
        if self.keep_fraction > 0 and self.rng.random() < self.keep_fraction:
            self.stat_update("kept_with_bad_words")
            return True
        return False, "bad_words"


def _url_filter(step: UrlStep) -> BaseFilter:
    from datatrove.pipeline.filters import URLFilter
    from tldextract import TLDExtract

    class _UrlFilter(URLFilter):
        """URLFilter reading the URL from `url_key`, with a policy for documents without one."""

        def filter(self, doc: Document) -> bool | tuple[bool, str]:
            url = doc.metadata.get(step.url_key)
            if not url:
                self.stat_update("no_url")
                return True if step.missing_url == "keep" else (False, "no_url")
            if step.url_key != "url":
                doc.metadata["url"] = url
            return super().filter(doc)

    f = _UrlFilter(
        soft_word_threshold=step.soft_word_threshold,
        extra_domains=step.extra_domains or None,
        extra_urls=step.extra_urls or None,
        banned_words=step.banned_words or None,
        banned_subwords=step.banned_subwords or None,
        soft_banned_words=step.soft_banned_words or None,
        use_integrated_lists=step.use_integrated_lists,
    )
    # TLDExtract() fetches the public-suffix list over the network; the bundled snapshot is enough.
    f.tldextractor = TLDExtract(suffix_list_urls=())
    f.download_data()  # extracts the bundled block-lists now, not on the first document
    return f


def _language_filter(step: LanguageStep, base_dir: Path) -> BaseFilter:
    from datatrove.pipeline.filters import LanguageFilter

    assert step.model_path is not None, "validated by LanguageStep"
    path = _local_file(step.model_path, base_dir, f"filter.steps: {step.step_name}.model_path")

    class _LanguageFilter(LanguageFilter):
        def filter(self, doc: Document) -> bool | tuple[bool, str]:
            if super().filter(doc):
                return True
            if doc.metadata["language_score"] <= self.language_threshold and (
                self.languages is None or doc.metadata["language"] in self.languages
            ):
                return False, "low_language_score"
            return False, f"language_{doc.metadata['language']}"

    f = _LanguageFilter(
        languages=step.languages,
        language_threshold=step.language_threshold,
        backend=step.backend,
        label_only=step.label_only,
    )
    from fasttext.FastText import _FastText

    try:
        # load our file into datatrove's model wrapper so it never reaches for its download URL
        f.model._model = _FastText(str(path))
    except ValueError as e:
        raise InputError(
            f"{path}: not a fastText model ({e})",
            hint="model_path must be a fastText .bin such as lid.176.bin",
        ) from e
    return f


def _local_file(value: str, base_dir: Path, key: str) -> Path:
    path = Path(value).expanduser()
    if not path.is_absolute():
        path = Path(base_dir) / path
    if not path.is_file():
        raise ConfigError(
            f"{key}: {value!r} does not exist (looked for {path})",
            errors=[f"{key}: file {value!r} not found"],
            hint="download the file and set the path relative to the project folder",
        )
    return path


def build_steps(cfg: FilterConfig, base_dir: Path) -> list[BaseFilter | BaseFormatter]:
    """The datatrove step objects for `cfg.steps`, in order; loads models and lists now."""
    from datatrove.pipeline.filters import (
        C4QualityFilter,
        FineWebQualityFilter,
        GopherQualityFilter,
        GopherRepetitionFilter,
    )
    from datatrove.pipeline.formatters import PIIFormatter

    out: list[BaseFilter | BaseFormatter] = []
    for step in cfg.steps:
        params = step.model_dump(exclude={"type", "name"})
        if isinstance(step, GopherQualityStep):
            out.append(GopherQualityFilter(**params, language=WORD_TOKENIZER))
        elif isinstance(step, GopherRepetitionStep):
            params["top_n_grams"] = tuple(tuple(x) for x in params["top_n_grams"])
            params["dup_n_grams"] = tuple(tuple(x) for x in params["dup_n_grams"])
            out.append(GopherRepetitionFilter(**params, language=WORD_TOKENIZER))
        elif isinstance(step, C4QualityStep):
            out.append(C4QualityFilter(**params, language=WORD_TOKENIZER))
        elif isinstance(step, FineWebQualityStep):
            out.append(FineWebQualityFilter(**params, language=WORD_TOKENIZER))
        elif isinstance(step, LengthStep):
            out.append(LengthFilter(**params))
        elif isinstance(step, RegexStep):
            out.append(RegexBlockFilter(**params))
        elif isinstance(step, PiiStep):
            params["email_replacement"] = tuple(params["email_replacement"])
            params["ip_replacement"] = tuple(params["ip_replacement"])
            out.append(PIIFormatter(**params))
        elif isinstance(step, UrlStep):
            out.append(_url_filter(step))
        elif isinstance(step, LanguageStep):
            out.append(_language_filter(step, base_dir))
        elif isinstance(step, BadWordsStep):
            assert step.words_path is not None, "validated by BadWordsStep"
            path = _local_file(step.words_path, base_dir, f"filter.steps: {step.step_name}.words_path")
            words = path.read_text(encoding="utf-8", errors="replace").splitlines()
            out.append(BadWordsFilter(words, step.keep_fraction, step.seed))
        else:
            raise AssertionError(f"unhandled filter step type {type(step).__name__}")
    return out


# ---------------------------------------------------------------------------------------------
# running


@dataclass
class _Counts:
    """Per-step counters, added up across batches and workers."""

    docs_in: list[int]
    docs_out: list[int]
    modified: list[int]
    seconds: list[float]
    dropped: list[Counter[str]] = field(default_factory=list)

    @classmethod
    def zeros(cls, n: int) -> _Counts:
        return cls([0] * n, [0] * n, [0] * n, [0.0] * n, [Counter() for _ in range(n)])

    def add(self, other: _Counts) -> None:
        for i in range(len(self.docs_in)):
            self.docs_in[i] += other.docs_in[i]
            self.docs_out[i] += other.docs_out[i]
            self.modified[i] += other.modified[i]
            self.seconds[i] += other.seconds[i]
            self.dropped[i].update(other.dropped[i])


# (document, index of the step that dropped it or -1, reason)
_Result = tuple[Document, int, str | None]


def _process_batch(
    steps: list[BaseFilter | BaseFormatter], batch: list[Document]
) -> tuple[list[_Result], _Counts]:
    counts = _Counts.zeros(len(steps))
    results: list[_Result] = []
    clock = time.perf_counter
    for doc in batch:
        dropped_by, reason = -1, None
        for i, step in enumerate(steps):
            counts.docs_in[i] += 1
            if not doc.text.strip():
                # datatrove's rules divide by word counts; a blank text would crash them mid-run
                counts.dropped[i]["empty"] += 1
                dropped_by, reason = i, "empty"
                break
            t0 = clock()
            before = doc.text
            if isinstance(step, BaseFormatter):
                doc.text = step.format(doc.text)
                keep = True
            else:
                keep, reason = get_filter_result(step.filter(doc))
            counts.seconds[i] += clock() - t0
            if not keep:
                reason = reason or "dropped"
                counts.dropped[i][reason] += 1
                dropped_by = i
                break
            counts.docs_out[i] += 1
            if doc.text is not before and doc.text != before:
                counts.modified[i] += 1
        results.append((doc, dropped_by, reason))
    return results, counts


# worker-process state, set once per worker by _init_worker
_WORKER_STEPS: list[BaseFilter | BaseFormatter] | None = None


def _init_worker(cfg: FilterConfig, base_dir: Path) -> None:
    global _WORKER_STEPS
    _WORKER_STEPS = build_steps(cfg, base_dir)


def _worker_batch(batch: list[Document]) -> tuple[list[_Result], _Counts]:
    assert _WORKER_STEPS is not None, "worker not initialised"
    return _process_batch(_WORKER_STEPS, batch)


def _batches(documents: Iterable[Document], size: int) -> Iterator[list[Document]]:
    it = iter(documents)
    while batch := list(islice(it, size)):
        yield batch


def _auto_workers(cfg: FilterConfig) -> int:
    if cfg.workers:
        return cfg.workers
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(cpus, MAX_WORKERS))


def run_filters(
    documents: Iterable[Document],
    out_dir: Path,
    cfg: FilterConfig,
    reporter: Reporter | None = None,
    base_dir: Path | None = None,
) -> dict[str, Any]:
    """Filter `documents` into `out_dir/documents/` (kept) and `out_dir/excluded/<step>/` (dropped).

    Returns metrics: documents_in/kept/excluded, text_bytes_kept, shards, workers, seconds,
    documents_per_second, and `steps`: one dict per step with name, type, documents_in,
    documents_out, dropped ({reason: count}), modified (documents whose text the step changed),
    seconds. Raises InputError when there is no input or every document is dropped.
    """
    global _WORKER_STEPS
    reporter = reporter or Reporter()
    out_dir, base_dir = Path(out_dir), Path(base_dir or ".")
    names = [s.step_name for s in cfg.steps]
    steps = build_steps(cfg, base_dir)  # fail on missing models/lists before reading anything
    totals = _Counts.zeros(len(steps))
    t_start = time.perf_counter()

    batches = _batches(documents, BATCH_SIZE)
    # look ahead far enough to know whether a worker pool pays off
    head: list[list[Document]] = []
    for batch in batches:
        head.append(batch)
        if len(head) * BATCH_SIZE >= PARALLEL_MIN_DOCS:
            break
    big = len(head) * BATCH_SIZE >= PARALLEL_MIN_DOCS
    workers = _auto_workers(cfg) if big else 1
    if not steps:
        workers = 1

    excluded: dict[int, CorpusWriter] = {}
    if workers == 1:
        pool = worker_pool(1, "fork", stage="filter")  # runs in this process on the steps built above
    elif "fork" in multiprocessing.get_all_start_methods():
        # fork, not forkserver/spawn: those re-run the caller's __main__ in every worker, and a script
        # without an `if __name__ == "__main__"` guard then respawns workers forever. Forked workers
        # inherit the built steps (URL block-lists hold ~4.5M domains); they only compute (no console,
        # no torch), so forking a threaded parent is safe here.
        _WORKER_STEPS = steps
        pool = worker_pool(workers, "fork", stage="filter")
    else:
        pool = worker_pool(workers, "spawn", _init_worker, (cfg, base_dir), stage="filter")
    try:
        with (
            pool,
            CorpusWriter(out_dir / DOCUMENTS_DIR) as kept,
            reporter.progress("filter", unit="docs") as bar,
        ):
            all_batches = _chain(head, batches)
            if workers > 1:
                processed = pool.ordered(_worker_batch, ((b,) for b in all_batches), window=4 * workers)
            else:
                processed = (_process_batch(steps, b) for b in all_batches)
            n_in = 0
            for results, counts in processed:
                totals.add(counts)
                for doc, dropped_by, reason in results:
                    n_in += 1
                    if dropped_by < 0:
                        kept.write(doc)
                    elif cfg.keep_excluded:
                        doc.metadata["filter_reason"] = reason
                        doc.metadata["filter_step"] = names[dropped_by]
                        if dropped_by not in excluded:
                            excluded[dropped_by] = CorpusWriter(out_dir / EXCLUDED_DIR / names[dropped_by])
                        excluded[dropped_by].write(doc)
                bar.advance(len(results), kept=kept.documents)
        for w in excluded.values():
            w.close()
    finally:
        _WORKER_STEPS = None

    seconds = time.perf_counter() - t_start
    if n_in == 0:
        raise InputError(
            "filter: the input holds no documents", hint="check the input artifact of the filter stage"
        )
    step_metrics = [
        {
            "name": names[i],
            "type": cfg.steps[i].type,
            "documents_in": totals.docs_in[i],
            "documents_out": totals.docs_out[i],
            "dropped": dict(totals.dropped[i].most_common()),
            "modified": totals.modified[i],
            "seconds": round(totals.seconds[i], 3),
        }
        for i in range(len(steps))
    ]
    metrics = {
        "documents_in": n_in,
        "documents_out": kept.documents,
        "documents_excluded": n_in - kept.documents,
        "kept_fraction": round(kept.documents / n_in, 4),
        "text_bytes_kept": kept.text_bytes,
        "shards": len(kept.shards),
        "workers": workers,
        "seconds": round(seconds, 3),
        "documents_per_second": round(n_in / seconds, 1) if seconds > 0 else None,
        "steps": step_metrics,
    }
    for s in step_metrics:
        reasons = ", ".join(f"{r} {n}" for r, n in s["dropped"].items()) or "nothing dropped"
        reporter.log(f"{s['name']}: {s['documents_in']:,} in, {s['documents_out']:,} out ({reasons})")
    if kept.documents == 0:
        drops = "; ".join(
            f"{s['name']} dropped {s['documents_in'] - s['documents_out']:,}" for s in step_metrics
        )
        raise InputError(
            f"filter: all {n_in:,} documents were dropped ({drops})",
            hint="loosen the step that drops most in filter.steps (see excluded/ for examples), or check the input",
        )
    return metrics


def _chain(head: list[list[Document]], rest: Iterator[list[Document]]) -> Iterator[list[Document]]:
    yield from head
    yield from rest


# ---------------------------------------------------------------------------------------------
# samples


def _sample(doc: Document, max_chars: int) -> dict[str, Any]:
    text = doc.text if len(doc.text) <= max_chars else doc.text[:max_chars] + "…"
    return {"id": doc.id, "text": text}


def sample_documents(artifact_dir: Path, n: int = 3, max_chars: int = 500) -> dict[str, Any]:
    """Up to `n` kept documents and up to `n` excluded ones per step, texts cut at `max_chars`.

    Returns {"kept": [{"id", "text"}], "excluded": [{"step", "reason", "id", "text"}]}.
    """
    artifact_dir = Path(artifact_dir)
    kept = []
    for shard in corpus_files(artifact_dir):
        for doc in iter_shard(shard):
            kept.append(_sample(doc, max_chars))
            if len(kept) >= n:
                break
        if len(kept) >= n:
            break
    excluded: list[dict[str, Any]] = []
    ex_root = artifact_dir / EXCLUDED_DIR
    for step_dir in sorted(p for p in ex_root.iterdir() if p.is_dir()) if ex_root.is_dir() else []:
        taken = 0
        for shard in corpus_files(step_dir):
            for doc in iter_shard(shard):
                excluded.append(
                    {
                        "step": step_dir.name,
                        "reason": doc.metadata.get("filter_reason"),
                        **_sample(doc, max_chars),
                    }
                )
                taken += 1
                if taken >= n:
                    break
            if taken >= n:
                break
    return {"kept": kept, "excluded": excluded}
