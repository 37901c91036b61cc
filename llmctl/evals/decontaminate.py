"""Decontamination: which eval items appear in the documents a model was trained on (n-gram overlap).

    checker = Decontaminator([Corpus("filter:v0002", cache_dir, key, lambda: texts_of(folder))])
    flags = checker.check(items)        # per item: True (found), False (not found), None (too short)
    checker.indexes                     # [{"corpus": ..., "index": "built" | "cached", ...}]

The rule is GPT-3's (Brown et al. 2020, appendix C) and lm-evaluation-harness's `decontamination`:
text is normalised (case-folded; apostrophes dropped, so "don't" is "dont"; every other character that
is neither a letter nor a digit becomes a space; split on whitespace), and an item is contaminated when
any 13-gram of its words occurs in a training document. An item of 8 to 12 words is checked as one
n-gram of its own length (GPT-3 lowered N per benchmark to the item length, never below 8); an item of
fewer than 8 words is not checked (`None`): short texts ("The capital of X is Y") match by chance, and
it stays in the clean subset. Unlike GPT-3 we do not drop n-grams that are frequent in the corpus.

Which words of an item are checked (`item_text`): its question or context and its reference answer,
never the prompt template ("Question: ... Answer:"), few-shot examples, a system prompt or the wrong
choices. Multiple choice: question (mmlu, arc, piqa: the bare question; hellaswag: the activity and
context; custom and world_mc: the query) plus the right choice; winogrande: the sentence with the right
option filled in; lambada: the passage; gsm8k and generative: the question and its reference answer;
chat: the user's turn and the first answer.

The index of a corpus is the sorted set of 64-bit hashes of its n-grams (one array per n, `uint64`,
8 bytes per distinct n-gram), built by one streaming pass over its documents and saved as .npy under
the cache folder the caller gives (inside the corpus artifact: workspace/integrity.py's DERIVED_DIR),
named by n, the normaliser version and the caller's key (the corpus's content hash), written to a temp
name then renamed; later checks memory-map it. N-grams never cross document boundaries. Hashes: xxh64
per word, combined per n-gram by a polynomial over the word hashes (mod 2^64) and a final mix, so
all n-grams of a document are hashed in a few numpy operations. Limits: building holds the distinct
hashes in memory (8 bytes each, twice that while merging), so ~1B-word corpora need ~16 GB; one core
indexes about a million words a second (the tiny template's 1.5M-word corpus: 1.5 s on a busy machine,
two thirds of it normalising), so ~1B words take ~20 minutes, once per corpus artifact.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import xxhash

from llmctl.evals.tasks import Item
from llmctl.reporting import Reporter

NGRAM = 13
MIN_WORDS = 8  # GPT-3's smallest N
NORMALISER_VERSION = 1  # bump when `words` changes: cached indexes are named by it
_APOSTROPHES = re.compile(r"['\u2019`]")
_NOT_WORD = re.compile(r"[\W_]+")
_MULT = np.uint64(0x9E3779B97F4A7C15)  # odd: the polynomial's base
_CHUNK = 1 << 24  # hashes buffered before deduplicating, while building (128 MB)


def words(text: str) -> list[str]:
    """The normalised words of `text` (see the module docstring)."""
    return _NOT_WORD.sub(" ", _APOSTROPHES.sub("", text.casefold())).split()


def _word_hashes(ws: Sequence[str]) -> np.ndarray:
    return np.fromiter((xxhash.xxh64_intdigest(w) for w in ws), dtype=np.uint64, count=len(ws))


def _mix(h: np.ndarray) -> np.ndarray:
    """murmur3's fmix64: spreads the polynomial's bits so every bit of the hash depends on every word."""
    h = h ^ (h >> np.uint64(33))
    h = h * np.uint64(0xFF51AFD7ED558CCD)
    h = h ^ (h >> np.uint64(33))
    h = h * np.uint64(0xC4CEB9FE1A85EC53)
    return h ^ (h >> np.uint64(33))


def ngram_hashes(word_hashes: np.ndarray, n: int) -> np.ndarray:
    """The hash of every n-gram (consecutive n words) of a document, in order; empty below n words."""
    count = len(word_hashes) - n + 1
    if count <= 0:
        return np.empty(0, dtype=np.uint64)
    h = np.zeros(count, dtype=np.uint64)
    for j in range(n):
        h = h * _MULT + word_hashes[j : j + count]  # uint64 arithmetic wraps: mod 2^64
    return _mix(h)


def item_text(item: Item) -> str:
    """The words of an item that are checked: its own text (`Item.doc`, set by builders whose prompt
    adds a template or few-shot examples), else the right choice's context and continuation, else
    the prompt and the reference answer."""
    if item.doc:
        return item.doc
    if item.requests:
        context, continuation = item.requests[item.gold or 0]
        return context + continuation
    return f"{item.prompt or ''} {item.answer or ''}"


def item_query(item: Item) -> tuple[int, np.ndarray] | None:
    """(n, the hashes to look up) for an item, or None when it is shorter than MIN_WORDS words."""
    ws = words(item_text(item))
    if len(ws) < MIN_WORDS:
        return None
    n = min(len(ws), NGRAM)
    return n, _sorted_unique(ngram_hashes(_word_hashes(ws), n))


@dataclass(frozen=True)
class Corpus:
    """Training documents to check against: a name for people (an artifact id or a file), the folder
    its index is cached in (None: not cached), a key naming its content, and its texts (a callable,
    so the documents are read only when an index must be built)."""

    name: str
    cache_dir: Path | None
    key: str
    texts: Callable[[], Iterable[str]]


def index_file(cache_dir: Path, key: str, n: int) -> Path:
    return cache_dir / f"ngrams-n{n:02d}-norm{NORMALISER_VERSION}-{key[:16]}.npy"


def _sorted_unique(a: np.ndarray) -> np.ndarray:
    # np.unique is ~100x slower than a sort on uint64 in numpy 2.4 (measured: 3.0 s vs 0.03 s for 1.5M).
    a = np.sort(a)
    return a[np.concatenate(([True], a[1:] != a[:-1]))] if len(a) else a


def build_index(texts: Iterable[str], ns: Sequence[int]) -> dict[int, np.ndarray]:
    """Sorted distinct n-gram hashes of the texts, for each n, in one pass."""
    buffers: dict[int, list[np.ndarray]] = {n: [] for n in ns}
    sizes = dict.fromkeys(ns, 0)
    for text in texts:
        wh = _word_hashes(words(text))
        for n in ns:
            h = ngram_hashes(wh, n)
            buffers[n].append(h)
            sizes[n] += len(h)
            if sizes[n] > _CHUNK:  # keep memory at the distinct hashes, not every n-gram seen
                merged = _sorted_unique(np.concatenate(buffers[n]))
                buffers[n], sizes[n] = [merged], len(merged)
    return {
        n: _sorted_unique(np.concatenate(b)) if b else np.empty(0, dtype=np.uint64)
        for n, b in buffers.items()
    }


def _load(path: Path) -> np.ndarray | None:
    """A cached index, memory-mapped; None when there is none or it cannot be read (it is rebuilt)."""
    try:
        array = np.load(path, mmap_mode="r")
    except (OSError, ValueError):
        return None
    return array if array.dtype == np.uint64 and array.ndim == 1 else None


def _save(path: Path, array: np.ndarray) -> bool:
    """Write atomically (temp name, then rename); False when the folder is not writable."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            np.save(f, array)
        os.replace(tmp, path)
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink()
        return False
    return True


@dataclass
class Decontaminator:
    """Checks items against the n-gram indexes of training corpora, building what is missing."""

    corpora: list[Corpus]
    reporter: Reporter = field(default_factory=Reporter)
    indexes: list[dict[str, Any]] = field(default_factory=list)  # what was built or read, per corpus and n
    _loaded: dict[tuple[int, int], np.ndarray] = field(default_factory=dict)

    def _index(self, i: int, ns: set[int]) -> None:
        """Load (memory-map) or build the indexes of corpus i for every n in ns not loaded yet."""
        corpus = self.corpora[i]
        missing = []
        for n in sorted(ns):
            if (i, n) in self._loaded:
                continue
            path = index_file(corpus.cache_dir, corpus.key, n) if corpus.cache_dir is not None else None
            array = _load(path) if path is not None else None
            if array is None:
                missing.append(n)
                continue
            self._loaded[i, n] = array
            self.indexes.append({"corpus": corpus.name, "n": n, "index": "cached", "path": str(path)})
        if not missing:
            return
        self.reporter.log(
            f"decontamination: indexing {corpus.name} ({', '.join(f'{n}-grams' for n in missing)})"
        )
        built = build_index(corpus.texts(), missing)
        for n, array in built.items():
            self._loaded[i, n] = array
            path = index_file(corpus.cache_dir, corpus.key, n) if corpus.cache_dir is not None else None
            saved = path is not None and _save(path, array)
            if path is not None and not saved:
                self.reporter.log(f"decontamination: cannot write {path}; the index is not kept")
            self.indexes.append(
                {
                    "corpus": corpus.name,
                    "n": n,
                    "index": "built",
                    "ngrams": len(array),
                    "path": str(path) if saved else None,
                }
            )

    def check(self, items: Sequence[Item]) -> list[bool | None]:
        """Per item: True when an n-gram of its text is in any corpus, False when none is, None when
        it is too short to check."""
        queries = [item_query(item) for item in items]
        ns = {q[0] for q in queries if q is not None}
        flags: list[bool | None] = [None if q is None else False for q in queries]
        for i in range(len(self.corpora)):
            self._index(i, ns)
            for k, q in enumerate(queries):
                if q is None or flags[k]:
                    continue
                index = self._loaded[i, q[0]]
                pos = np.searchsorted(index, q[1])
                flags[k] = (
                    bool(np.any(index[np.minimum(pos, len(index) - 1)] == q[1])) if len(index) else False
                )
        return flags
