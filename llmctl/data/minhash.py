"""MinHash signatures and LSH band keys for whole batches of documents, vectorised with numpy.

The dedup stage (`llmctl.data.dedup`) calls `MinHasher.band_keys` on chunks of texts in worker
processes. Semantics follow datatrove/FineWeb so the two dedup engines agree:

* text normalisation (`simplify_words`): lowercase; strip diacritics (NFD, drop combining marks,
  only for non-ASCII text); numbers (digits with an optional decimal part) become "0"; words are
  runs of Unicode letters/digits, so punctuation and `_` separate words and whitespace is ignored.
  This is datatrove's `simplify_text` followed by a word split, as one regex, without spaCy;
* shingles: every run of `n_grams` consecutive words (a document with fewer words has none and is
  never a near duplicate), hashed to 64 bits;
* signature: `bands * rows` values `min over shingles of (a_i * x + b_i) mod 2**64`, with odd random
  `a_i` and random `b_i` from `seed` (the multiply-add universal family, as in datatrove, whose
  `x * a` also wraps at 2**64 before its final `mod 2**61 - 1`);
* band keys: the `rows` values of each band hashed to one 64-bit key; two documents are candidates
  when any band key matches, which happens with probability 1 - (1 - s**rows)**bands for Jaccard s.

Why not datasketch's `MinHash.bulk`: it hashes each shingle with SHA-1 (or a Python hashfunc) one
call at a time and builds one object per document; here a word is hashed once per batch (xxh3, cached),
shingles are combined from word hashes with array arithmetic, and all permutations run over the whole
batch at once. benchmarks/bench_dedup.py measures the difference.
"""

from __future__ import annotations

import re
import unicodedata

import numpy as np

_NUMBER_RE = re.compile(r"\d+(?:[.,]\d+)?")
_WORD_RE = re.compile(r"[^\W_]+")
_DIGITS_TO_0 = bytes.maketrans(b"123456789", b"000000000")
_ZEROS_RE = re.compile(rb"0+(?:[.,]0+)?")
# lowercase ASCII letters, keep digits, everything else (punctuation, _, whitespace) becomes a space
_ASCII_WORD_TABLE = bytes(
    c + 32 if 65 <= c <= 90 else c if (48 <= c <= 57 or 97 <= c <= 122) else 32 for c in range(256)
)
# Odd 64-bit constants (splitmix64 / golden ratio) for combining word hashes into shingle hashes and
# row values into band keys; any odd multiplier gives a bijection per step.
_K1 = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_P = np.uint64(0x100000001B3)  # FNV's 64-bit prime: odd, so invertible mod 2**64
_P_INV = np.uint64(pow(int(_P), -1, 2**64))


def _simplified(text: str) -> bytes:
    """`text` normalised (see the module docstring) to space-separated words, as bytes."""
    if text.isascii():
        # Fast path, ~4x quicker than the regex path: digits become 0, runs of them (with one decimal
        # part) collapse to a single 0, then one byte table lowercases and turns the rest into spaces.
        b = text.encode("ascii").translate(_DIGITS_TO_0)
        if b"0" in b:
            b = _ZEROS_RE.sub(b"0", b)
        return b.translate(_ASCII_WORD_TABLE)
    text = "".join(c for c in unicodedata.normalize("NFD", text.lower()) if not unicodedata.combining(c))
    return " ".join(_WORD_RE.findall(_NUMBER_RE.sub("0", text))).encode()


def simplify_words(text: str) -> list[bytes]:
    """Words of `text` (UTF-8 bytes) after datatrove-style normalisation (see the module docstring)."""
    return _simplified(text).split()


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser, in place: spreads every input bit over the whole word."""
    x ^= x >> np.uint64(30)
    x *= _M1
    x ^= x >> np.uint64(27)
    x *= _M2
    x ^= x >> np.uint64(31)
    return x


class MinHasher:
    """Computes MinHash signatures and LSH band keys for batches of texts.

    One instance per process: it caches word hashes (bounded), which is most of the speed on
    natural text where a few thousand words make up most tokens.
    """

    def __init__(self, n_grams: int = 5, bands: int = 14, rows: int = 8, seed: int = 1):
        assert n_grams >= 1 and bands >= 1 and rows >= 1, (n_grams, bands, rows)
        self.n_grams, self.bands, self.rows = n_grams, bands, rows
        rng = np.random.default_rng(seed)
        num_perm = bands * rows
        self.a = rng.integers(0, 2**64, size=num_perm, dtype=np.uint64, endpoint=False) | np.uint64(1)
        self.b = rng.integers(0, 2**64, size=num_perm, dtype=np.uint64, endpoint=False)
        self._word_seed = np.uint64(rng.integers(0, 2**63))
        self._pow = self._inv_pow = np.zeros(0, dtype=np.uint64)

    def _powers(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        if len(self._pow) < n:
            size = max(n, 2 * len(self._pow), 1 << 16)
            one = np.ones(1, dtype=np.uint64)
            with np.errstate(over="ignore"):
                self._pow = np.concatenate((one, np.full(size - 1, _P, dtype=np.uint64).cumprod()))
                self._inv_pow = np.concatenate((one, np.full(size - 1, _P_INV, dtype=np.uint64).cumprod()))
            assert int(self._pow[5]) * int(self._inv_pow[5]) % 2**64 == 1, "P * P^-1 != 1 mod 2**64"
        return self._pow[:n], self._inv_pow[:n]

    def word_hashes(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """64-bit hashes of the normalised words of all texts, concatenated, and words per text.

        Hashing is vectorised over the whole batch: a word's hash is the polynomial
        sum(c_j * P**(j - start)) mod 2**64 of its bytes, read off one prefix sum of c_j * P**j,
        then mixed. This replaces a Python-level split and a dict lookup per word (~3x slower).
        """
        parts = [_simplified(t) for t in texts]
        doc_start = np.zeros(len(parts), dtype=np.int64)
        if parts:
            doc_start[1:] = np.cumsum([len(p) + 1 for p in parts[:-1]])
        buf = np.frombuffer(b" " + b" ".join(parts) + b" ", dtype=np.uint8)
        is_word = buf != 32
        edges = np.flatnonzero(is_word[1:] != is_word[:-1]) + 1  # alternating starts and ends
        starts, ends = edges[0::2], edges[1::2]
        pw, inv = self._powers(len(buf))
        with np.errstate(over="ignore"):
            prefix = np.cumsum(buf.astype(np.uint64) * pw, dtype=np.uint64)  # prefix[i] = sum_{j<=i}
            h = (prefix[ends - 1] - prefix[starts - 1]) * inv[starts]
            h ^= self._word_seed
        _mix64(h)
        # starts are offsets in buf, which has one leading space: doc d's bytes begin at doc_start[d] + 1
        word_doc = np.searchsorted(doc_start + 1, starts, side="right") - 1
        lengths = np.bincount(word_doc, minlength=len(parts)).astype(np.int64)
        return h, lengths

    def shingles(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Shingle hashes of all texts, concatenated, and per-text counts (0 for too-short texts)."""
        n = self.n_grams
        wh, lengths = self.word_hashes(texts)
        counts = np.maximum(lengths - (n - 1), 0)
        if len(wh) < n:
            return np.zeros(0, dtype=np.uint64), counts
        # Polynomial combination of n consecutive word hashes (mod 2**64), then a mixer. Windows that
        # cross a document boundary are computed and dropped below.
        m = len(wh) - n + 1
        h = wh[:m].copy()
        with np.errstate(over="ignore"):
            for j in range(1, n):
                h *= _K1
                h += wh[j : j + m]
        _mix64(h)
        starts = np.concatenate(([0], np.cumsum(lengths)[:-1]))
        # index of every valid window: for doc d, starts[d] .. starts[d] + counts[d] - 1
        total = int(counts.sum())
        doc_of = np.repeat(np.arange(len(texts)), counts)
        offsets = np.arange(total) - np.repeat(np.cumsum(counts) - counts, counts)
        idx = starts[doc_of] + offsets
        return h[idx], counts

    def signatures(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(n_texts, bands*rows) uint64 signatures, and a mask of texts that have any shingle.

        Rows of texts without shingles are all 2**64-1 and must not be used for matching.
        """
        x, counts = self.shingles(texts)
        num_perm = len(self.a)
        sig = np.full((len(texts), num_perm), np.iinfo(np.uint64).max, dtype=np.uint64)
        has = counts > 0
        if not has.any():
            return sig, has
        seg_starts = (np.cumsum(counts) - counts)[has]
        tmp = np.empty_like(x)
        out = np.empty((num_perm, int(has.sum())), dtype=np.uint64)
        with np.errstate(over="ignore"):
            for i in range(num_perm):
                np.multiply(x, self.a[i], out=tmp)
                tmp += self.b[i]
                out[i] = np.minimum.reduceat(tmp, seg_starts)
        sig[has] = out.T
        return sig, has

    def band_keys_from_signatures(self, sig: np.ndarray) -> np.ndarray:
        """(n, bands) uint64 keys: each band's `rows` values hashed together."""
        s = sig.reshape(len(sig), self.bands, self.rows)
        key = s[:, :, 0].copy()
        with np.errstate(over="ignore"):
            for r in range(1, self.rows):
                key *= _K1
                key += s[:, :, r]
        return _mix64(key)

    def band_keys(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(n_texts, bands) band keys and the mask of texts that have shingles."""
        sig, has = self.signatures(texts)
        return self.band_keys_from_signatures(sig), has
