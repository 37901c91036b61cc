"""The tokenizer: train a byte-level BPE, adopt an existing one, save/load it as an HF folder, inspect.

    tok = train_tokenizer(texts, vocab_size=4096, reporter=reporter)    # or adopt_tokenizer("gpt2")
    tok.save(folder)                        # tokenizer.json + tokenizer_config.json + ... (HF-loadable)
    tok = load_tokenizer(folder)
    ids = tok.encode("hello", bos=True)     # [tok.bos_id, ...]
    tok.inspect("hello world")              # [(id, 'hello'), (id, '␣world')]

Training uses HF `tokenizers` (Rust). The model is a byte-level BPE: text is split into pre-tokens
by a GPT-4 style regex, each pre-token is mapped to bytes, and merges are learned over bytes, so
every string round-trips exactly (decode(encode(s)) == s) and there is no unknown token.

Conventions (recorded in `llmctl_tokenizer.json` so other stages never guess):
- Special tokens come FIRST, with fixed ids in the order given: by default `<|bos|>`=0, `<|pad|>`=1,
  `<|im_start|>`=2, `<|im_end|>`=3; the 256 byte tokens follow, then the merges. Fixed small ids do
  not move when the vocabulary size changes, which keeps configs and tests readable.
- `<|bos|>` is also the document separator (nanochat's convention): every document is encoded as
  `[bos] + tokens`, with no end-of-document token. The model therefore learns to predict `<|bos|>`
  where a document ends, so `eos == bos` for base models; chat models also stop at `<|im_end|>`
  (both are in `stop_token_ids`).
- Text from a corpus is always encoded as ordinary text: a literal "<|im_start|>" typed in a web
  page becomes ordinary tokens, never the special token (no special-token injection from data).
- The tokenizer id is a content hash of tokenizer.json; stages compare it to check compatibility.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import tokenizers
from tokenizers import Regex, decoders, models, pre_tokenizers, processors, trainers

from llmctl.errors import ConfigError, InputError
from llmctl.reporting import Reporter

if TYPE_CHECKING:
    import tiktoken

# The cl100k_base (GPT-4) split pattern in its original form. tiktoken now ships an equivalent with
# possessive quantifiers, but Oniguruma (used by `tokenizers`) reads `\p{N}{1,3}+` as "one or more
# groups of 1-3 digits" rather than possessive, so that spelling would split digits differently.
GPT4_SPLIT_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
# The GPT-2 pattern (what `tokenizers`' ByteLevel pre-tokenizer uses with use_regex=True).
GPT2_SPLIT_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
SPLIT_PATTERNS = {"gpt4": GPT4_SPLIT_PATTERN, "gpt2": GPT2_SPLIT_PATTERN}
_DIGIT_GROUPS = r"\p{N}{1,3}"

BOS = "<|bos|>"
PAD = "<|pad|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
DEFAULT_SPECIAL_TOKENS: tuple[str, ...] = (BOS, PAD, IM_START, IM_END)
REQUIRED_SPECIAL_TOKENS = DEFAULT_SPECIAL_TOKENS

TOKENIZER_FILE = "tokenizer.json"
HF_CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_MAP_FILE = "special_tokens_map.json"
METADATA_FILE = "llmctl_tokenizer.json"
METADATA_VERSION = 1
# What transformers writes when a tokenizer does not know its model's context length.
UNKNOWN_MAX_LENGTH = int(1e30)

# ChatML, preceded by the document BOS because every training document starts with one.
CHATML_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")


def resolve_split_pattern(split_pattern: str, split_digits: bool = False) -> str:
    """The regex for a preset name ('gpt4', 'gpt2') or a custom regex; `split_digits` makes every
    digit its own pre-token instead of runs of up to three (GPT-4)."""
    pattern = SPLIT_PATTERNS.get(split_pattern, split_pattern)
    if split_digits:
        if _DIGIT_GROUPS in pattern:
            pattern = pattern.replace(_DIGIT_GROUPS, r"\p{N}")
        else:
            raise ConfigError(
                "tokenize.split_digits needs a split_pattern with a '\\p{N}{1,3}' digit group",
                hint="use split_pattern: gpt4, or write single-digit splitting into your own pattern",
            )
    try:
        Regex(pattern)
    except Exception as e:
        raise ConfigError(f"tokenize.split_pattern is not a valid regex: {e}") from None
    return pattern


def check_special_tokens(special_tokens: Sequence[str]) -> None:
    """Raise ConfigError on duplicates, empty tokens or a missing required token."""
    seen: set[str] = set()
    for tok in special_tokens:
        if not tok or tok != tok.strip():
            raise ConfigError(f"tokenize.special_tokens: {tok!r} is empty or has surrounding whitespace")
        if tok in seen:
            raise ConfigError(
                f"tokenize.special_tokens: {tok!r} is listed twice (special tokens must be distinct)"
            )
        seen.add(tok)
    missing = [t for t in REQUIRED_SPECIAL_TOKENS if t not in seen]
    if missing:
        raise ConfigError(
            f"tokenize.special_tokens is missing {', '.join(missing)}",
            hint=f"keep {', '.join(REQUIRED_SPECIAL_TOKENS)} in the list and append your own tokens after them",
        )


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table used by byte-level BPE vocabularies."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs, strict=True)}


_BYTE_DECODER = {c: b for b, c in bytes_to_unicode().items()}


def _canonical_hash(tokenizer_json: str) -> str:
    """sha256 of the tokenizer JSON with sorted keys: stable across whitespace and key order."""
    canonical = json.dumps(json.loads(tokenizer_json), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def tokenizer_file_id(path: str | os.PathLike[str]) -> str:
    """The tokenizer id (see Tokenizer.tokenizer_id) of any tokenizer.json, ours or adopted."""
    return _canonical_hash(tokenizers.Tokenizer.from_file(str(path)).to_str())[:16]


def _split_pattern_of(tokenizer_json: dict[str, Any]) -> str | None:
    """The pre-token regex of a byte-level BPE tokenizer.json, or None if it is not one we understand."""
    pre = tokenizer_json.get("pre_tokenizer")
    if not pre:
        return None
    if pre.get("type") == "ByteLevel":
        return GPT2_SPLIT_PATTERN if pre.get("use_regex", True) and not pre.get("add_prefix_space") else None
    if pre.get("type") != "Sequence":
        return None
    steps = pre.get("pretokenizers", [])
    if (
        len(steps) == 2
        and steps[0].get("type") == "Split"
        and steps[0].get("behavior") == "Isolated"
        and not steps[0].get("invert")
        and "Regex" in steps[0].get("pattern", {})
        and steps[1].get("type") == "ByteLevel"
        and not steps[1].get("use_regex", True)
        and not steps[1].get("add_prefix_space")
    ):
        return steps[0]["pattern"]["Regex"]
    return None


def tiktoken_from_json(tokenizer_json: str) -> tiktoken.Encoding | None:
    """Build a `tiktoken.Encoding` from a byte-level BPE tokenizer.json, or None if it is not one.

    Mergeable ranks are the byte strings of the vocabulary with rank = id (the byte-level alphabet
    mapped back to bytes). That reproduces the BPE only when ids follow merge order and a pre-token
    found whole in the vocabulary becomes one token (`ignore_merges`, which our trainer sets), so
    callers must still compare ids on real text before trusting it (`llmctl.data.encode` does).
    """
    import tiktoken

    data = json.loads(tokenizer_json)
    model = data.get("model", {})
    pattern = _split_pattern_of(data)
    if (
        pattern is None
        or model.get("type") != "BPE"
        or data.get("normalizer") is not None
        or model.get("byte_fallback")
        or model.get("continuing_subword_prefix")
        or model.get("end_of_word_suffix")
    ):
        return None
    added = {t["id"]: t["content"] for t in data.get("added_tokens", [])}
    if not all(t.get("special") for t in data.get("added_tokens", [])):
        return None  # `tokenizers` matches non-special added tokens inside text; tiktoken cannot
    ranks: dict[bytes, int] = {}
    for tok, i in model["vocab"].items():
        if i in added:
            continue
        try:
            ranks[bytes(_BYTE_DECODER[c] for c in tok)] = i
        except KeyError:
            return None
    if any(bytes([b]) not in ranks for b in range(256)):
        return None
    specials = {content: i for i, content in added.items()}
    try:
        return tiktoken.Encoding(
            name=f"llmctl-{_canonical_hash(tokenizer_json)[:16]}",
            pat_str=pattern,
            mergeable_ranks=ranks,
            special_tokens=specials,
        )
    except Exception:  # tiktoken rejects some regexes and duplicate ranks; callers fall back
        return None


class Tokenizer:
    """A tokenizer plus the roles of its special tokens; what every later stage uses.

    Build one with `train_tokenizer`, `adopt_tokenizer` or `load_tokenizer`. `hf` is the underlying
    `tokenizers.Tokenizer` (the exact object saved as tokenizer.json).
    """

    def __init__(
        self,
        hf: tokenizers.Tokenizer,
        *,
        bos_token: str,
        pad_token: str,
        im_start_token: str,
        im_end_token: str,
        eos_token: str | None = None,
        chat_template: str = CHATML_TEMPLATE,
        source: dict[str, Any] | None = None,
    ):
        self.hf = hf
        self.bos_token = bos_token
        self.eos_token = eos_token or bos_token
        self.pad_token = pad_token
        self.im_start_token = im_start_token
        self.im_end_token = im_end_token
        self.chat_template = chat_template
        self.source = source or {"kind": "unknown"}
        for role, tok in self._roles().items():
            if hf.token_to_id(tok) is None:
                raise InputError(f"the tokenizer has no {role} token {tok!r}")

    def _roles(self) -> dict[str, str]:
        return {
            "bos": self.bos_token,
            "eos": self.eos_token,
            "pad": self.pad_token,
            "im_start": self.im_start_token,
            "im_end": self.im_end_token,
        }

    # -- ids -------------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        """Number of ids including special tokens (the model's embedding rows must be >= this)."""
        return self.hf.get_vocab_size(with_added_tokens=True)

    @property
    def bos_id(self) -> int:
        return self._id(self.bos_token)

    @property
    def eos_id(self) -> int:
        return self._id(self.eos_token)

    @property
    def pad_id(self) -> int:
        return self._id(self.pad_token)

    @property
    def im_start_id(self) -> int:
        return self._id(self.im_start_token)

    @property
    def im_end_id(self) -> int:
        return self._id(self.im_end_token)

    @property
    def stop_token_ids(self) -> list[int]:
        """Ids that end generation: the document separator (base models) and <|im_end|> (chat)."""
        return sorted({self.eos_id, self.im_end_id})

    @cached_property
    def special_tokens(self) -> dict[str, int]:
        """Every special token of the vocabulary and its id, in id order."""
        added = self.hf.get_added_tokens_decoder()
        return {t.content: i for i, t in sorted(added.items()) if t.special}

    def _id(self, token: str) -> int:
        i = self.hf.token_to_id(token)
        assert i is not None, f"special token {token!r} vanished from the vocabulary"
        return i

    def token_to_id(self, token: str) -> int | None:
        return self.hf.token_to_id(token)

    def id_to_token(self, i: int) -> str | None:
        return self.hf.id_to_token(i)

    @cached_property
    def tokenizer_json(self) -> str:
        return self.hf.to_str()

    @cached_property
    def tokenizer_id(self) -> str:
        """Content hash of tokenizer.json (16 hex chars); equal ids mean identical tokenization."""
        return _canonical_hash(self.tokenizer_json)[:16]

    @cached_property
    def split_pattern(self) -> str | None:
        """The pre-token regex, or None when the tokenizer is not a byte-level BPE we understand."""
        return _split_pattern_of(json.loads(self.tokenizer_json))

    @cached_property
    def _ordinary(self) -> tokenizers.Tokenizer:
        # A copy that encodes special-token text as ordinary text; the flag is not serialized, so the
        # saved tokenizer (and HF chat templates) keep recognising specials.
        hf = tokenizers.Tokenizer.from_str(self.tokenizer_json)
        hf.encode_special_tokens = True
        return hf

    # -- encode / decode -------------------------------------------------------------------------
    def encode(self, text: str, bos: bool = False) -> list[int]:
        """Ids of `text` as ordinary text (special-token strings are not special), BOS first if asked."""
        ids = self._ordinary.encode(text, add_special_tokens=False).ids
        return [self.bos_id, *ids] if bos else ids

    def encode_batch(self, texts: Sequence[str], bos: bool = False) -> list[list[int]]:
        """`encode` for many texts at once (parallel in Rust)."""
        encs = self._ordinary.encode_batch_fast(list(texts), add_special_tokens=False)
        if bos:
            return [[self.bos_id, *e.ids] for e in encs]
        return [e.ids for e in encs]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`, special tokens included as their strings."""
        return self.hf.decode(list(ids), skip_special_tokens=False)

    def token_bytes(self, i: int) -> bytes:
        """The raw bytes a token stands for (special tokens: their UTF-8 string)."""
        tok = self.hf.id_to_token(i)
        if tok is None:
            raise InputError(f"token id {i} is outside the vocabulary (size {self.vocab_size})")
        if i in self.special_tokens.values():
            return tok.encode("utf-8")
        if self.split_pattern is not None and all(c in _BYTE_DECODER for c in tok):
            return bytes(_BYTE_DECODER[c] for c in tok)
        return self.hf.decode([i]).encode("utf-8")

    def inspect(self, text: str) -> list[tuple[int, str]]:
        """(id, printable token) for each token of `text`; see `printable_token`."""
        return [(i, printable_token(self.token_bytes(i))) for i in self.encode(text)]

    # -- conversion ------------------------------------------------------------------------------
    def to_tiktoken(self) -> tiktoken.Encoding | None:
        """The same tokenizer as a `tiktoken.Encoding` (3-6x faster), or None if it cannot be one;
        see `tiktoken_from_json`."""
        return tiktoken_from_json(self.tokenizer_json)

    # -- saving ----------------------------------------------------------------------------------
    def metadata(self) -> dict[str, Any]:
        """The contents of llmctl_tokenizer.json."""
        return {
            "format_version": METADATA_VERSION,
            "tokenizer_id": self.tokenizer_id,
            "tokenizer_json_sha256": _canonical_hash(self.tokenizer_json),
            "vocab_size": self.vocab_size,
            "byte_level": self.split_pattern is not None,
            "split_pattern": self.split_pattern,
            "special_tokens": self.special_tokens,
            "roles": self._roles(),
            "bos_id": self.bos_id,
            "eos_id": self.eos_id,
            "pad_id": self.pad_id,
            "im_start_id": self.im_start_id,
            "im_end_id": self.im_end_id,
            "stop_token_ids": self.stop_token_ids,
            "document_convention": (
                "every document is encoded as [bos] + tokens with no end token; bos separates "
                "documents, so eos == bos for base models"
            ),
            "source": self.source,
        }

    def save(self, folder: str | os.PathLike[str], model_max_length: int | None = None) -> Path:
        """Write an HF tokenizer folder (loads with `transformers.AutoTokenizer`) plus our metadata."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / TOKENIZER_FILE).write_text(self.tokenizer_json, encoding="utf-8")
        added = self.hf.get_added_tokens_decoder()
        roles = {"bos_token": self.bos_token, "eos_token": self.eos_token, "pad_token": self.pad_token}
        extra = [t for t in (self.im_start_token, self.im_end_token) if t not in roles.values()]
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            **roles,
            "unk_token": None,
            "additional_special_tokens": extra,
            "model_max_length": model_max_length or UNKNOWN_MAX_LENGTH,
            # Cleanup would turn " ." into "." on decode and break exact round trips.
            "clean_up_tokenization_spaces": False,
            "added_tokens_decoder": added_tokens_decoder(added),
            "chat_template": self.chat_template,
        }
        _write_json(folder / HF_CONFIG_FILE, config)
        _write_json(folder / SPECIAL_TOKENS_MAP_FILE, {**roles, "additional_special_tokens": extra})
        _write_json(folder / METADATA_FILE, self.metadata())
        return folder


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def printable_token(raw: bytes) -> str:
    """A token's bytes as one readable string: spaces as '␣', control characters and bytes that are
    not complete UTF-8 (a token may hold part of a character) as escapes like '\\n' or '\\xe4'."""
    text = raw.decode("utf-8", errors="backslashreplace")
    out = []
    for ch in text:
        if ch == " ":
            out.append("␣")
        elif ch in "\n\r\t":
            out.append({"\n": "\\n", "\r": "\\r", "\t": "\\t"}[ch])
        elif not ch.isprintable():
            out.append(ch.encode("unicode_escape").decode("ascii"))
        else:
            out.append(ch)
    return "".join(out)


def _training_chars_estimate(
    counts: dict[str, int], max_chars: int | None, total_docs: int | None, total_bytes: int | None
) -> int | None:
    """Characters the training will read: the mean (truncated) characters per document so far x the
    corpus's documents, capped by its text bytes (a character is at least one UTF-8 byte) and the
    budget. None while nothing says how big the corpus is: no total beats a made-up one."""
    known = [total_bytes] if total_bytes is not None else []
    if total_docs is not None and counts["docs"]:
        known.append(round(counts["chars"] / counts["docs"] * total_docs))
    if not known:
        return None
    total = min(known) if max_chars is None else min(*known, max_chars)
    return max(total, counts["chars"])


def _training_batches(
    texts: Iterable[str],
    max_chars: int | None,
    max_doc_chars: int | None,
    counts: dict[str, int],
    reporter: Reporter,
    total_docs: int | None = None,
    total_bytes: int | None = None,
) -> Iterator[list[str]]:
    """Batches of (truncated) texts up to the character budget, counting what was used."""
    batch: list[str] = []
    batch_chars = 0
    total = _training_chars_estimate(counts, max_chars, total_docs, total_bytes)
    with reporter.progress("tokenizer training text", total=total, unit="chars") as bar:
        for text in texts:
            if max_doc_chars is not None:
                text = text[:max_doc_chars]
            if max_chars is not None and counts["chars"] + len(text) > max_chars:
                text = text[: max_chars - counts["chars"]]
            if not text:
                if max_chars is not None and counts["chars"] >= max_chars:
                    break
                continue
            batch.append(text)
            batch_chars += len(text)
            counts["docs"] += 1
            counts["chars"] += len(text)
            if batch_chars >= 1 << 20:
                bar.update(total=_training_chars_estimate(counts, max_chars, total_docs, total_bytes))
                bar.advance(batch_chars)
                yield batch
                batch, batch_chars = [], 0
        bar.update(total=counts["chars"])  # done: the total is exactly what was read
        if batch:
            bar.advance(batch_chars)
            yield batch


def train_tokenizer(
    texts: Iterable[str],
    *,
    vocab_size: int = 4096,
    split_pattern: str = "gpt4",
    split_digits: bool = False,
    min_frequency: int = 2,
    special_tokens: Sequence[str] = DEFAULT_SPECIAL_TOKENS,
    max_chars: int | None = None,
    max_doc_chars: int | None = 10_000,
    reporter: Reporter | None = None,
    total_docs: int | None = None,
    total_bytes: int | None = None,
) -> Tokenizer:
    """Train a byte-level BPE on `texts` and return it (ids: specials, then 256 bytes, then merges).

    `max_chars` caps the total text used and `max_doc_chars` each document (so a few huge documents
    cannot dominate the merges, as in nanochat). `vocab_size` counts the special tokens; a corpus too
    small to learn that many merges yields a smaller vocabulary (with a warning). `total_docs` and
    `total_bytes` (of the corpus, when known) size the progress bar.
    """
    reporter = reporter or Reporter()
    special_tokens = list(special_tokens)
    check_special_tokens(special_tokens)
    minimum = 256 + len(special_tokens)
    if vocab_size < minimum:
        raise ConfigError(
            f"tokenize.vocab_size is {vocab_size}; it must be at least {minimum} "
            f"(256 byte tokens + {len(special_tokens)} special tokens)",
            hint=f"set tokenize.vocab_size to {minimum} or more (4096 suits the tiny template)",
        )
    pattern = resolve_split_pattern(split_pattern, split_digits)

    # ignore_merges: a pre-token that is itself in the vocabulary becomes that one token, which is
    # what tiktoken does, so the tiktoken fast path reproduces our ids exactly.
    hf = tokenizers.Tokenizer(models.BPE(ignore_merges=True))
    hf.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    counts = {"docs": 0, "chars": 0}
    batches = _training_batches(texts, max_chars, max_doc_chars, counts, reporter, total_docs, total_bytes)
    hf.train_from_iterator(batches, trainer)
    if counts["chars"] == 0:
        raise InputError(
            "no text to train the tokenizer on: the corpus is empty (or every document is empty)",
            hint="check the corpus artifact (`llmctl artifacts show`) or adopt a tokenizer with tokenize.adopt",
        )
    bos_id = hf.token_to_id(BOS)
    # HF adds BOS when asked for special tokens, matching how every training document starts.
    hf.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    got = hf.get_vocab_size(with_added_tokens=True)
    if got < vocab_size:
        reporter.warn(
            f"the training text ({counts['chars']:,} chars) only supports {got:,} tokens, "
            f"fewer than vocab_size {vocab_size:,}"
        )
    reporter.log(f"trained a {got:,}-token byte-level BPE on {counts['docs']:,} documents")
    tok = Tokenizer(
        hf,
        bos_token=BOS,
        pad_token=PAD,
        im_start_token=IM_START,
        im_end_token=IM_END,
        source={
            "kind": "trained",
            "vocab_size": vocab_size,
            "min_frequency": min_frequency,
            "split_digits": split_digits,
            "documents": counts["docs"],
            "chars": counts["chars"],
        },
    )
    return tok


# -- adopting and loading ----------------------------------------------------------------------


def _read_tokenizer_json(path: Path) -> tokenizers.Tokenizer:
    try:
        return tokenizers.Tokenizer.from_file(str(path))
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except Exception as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise InputError(
            f"{path}: not a readable tokenizer.json ({msg})",
            hint="re-create it (`llmctl run tokenize --force`) or point tokenize.adopt at a valid file",
        ) from None


def _read_optional_json(path: Path | None) -> dict[str, Any]:
    if path is None or not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise InputError(f"{path}: expected a JSON object")
    return data


def _token_str(value: Any) -> str | None:
    """A special token as written in tokenizer_config.json: a string or {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def _hub_files(repo_id: str, revision: str | None) -> tuple[Path, Path | None, Path | None]:
    """Download (or find in the HF cache) tokenizer.json and its two optional companions."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    from llmctl.data.sources import hub_unreachable

    local_only = hub_unreachable() is not None  # the cache only, without a retry loop first

    def fetch(name: str, required: bool) -> Path | None:
        try:
            return Path(hf_hub_download(repo_id, name, revision=revision, local_files_only=local_only))
        except GatedRepoError:
            raise InputError(
                f"hub repo {repo_id!r} is gated",
                hint=f"accept its license on huggingface.co, then `hf auth login`; or download {name} and adopt the local folder",
            ) from None
        except RepositoryNotFoundError:
            raise InputError(
                f"tokenize.adopt: hub repo {repo_id!r} not found (nor a local path)",
                hint="check the repo id, or point tokenize.adopt at a local tokenizer.json or folder",
            ) from None
        except RevisionNotFoundError:
            raise InputError(f"hub repo {repo_id!r} has no revision {revision!r}") from None
        except LocalEntryNotFoundError:
            if not required:
                return None
            raise InputError(
                f"tokenize.adopt: {repo_id!r} is not a local file or folder, and {repo_id}/{name} is not "
                "in the local Hugging Face cache while the hub cannot be reached (offline or HF_HUB_OFFLINE=1)",
                hint=f"where there is internet run `hf download {repo_id} {TOKENIZER_FILE} {HF_CONFIG_FILE} "
                f"--local-dir tokenizers/{repo_id.split('/')[-1]}` and adopt that folder",
            ) from None
        except EntryNotFoundError:
            if not required:
                return None
            raise InputError(
                f"hub repo {repo_id!r} has no {name}",
                hint="only fast (tokenizer.json) tokenizers can be adopted; convert it with transformers first",
            ) from None

    tok_json = fetch(TOKENIZER_FILE, required=True)
    assert tok_json is not None
    return tok_json, fetch(HF_CONFIG_FILE, required=False), fetch(SPECIAL_TOKENS_MAP_FILE, required=False)


def adopt_tokenizer(
    source: str | os.PathLike[str],
    *,
    special_tokens: Sequence[str] = DEFAULT_SPECIAL_TOKENS,
    revision: str | None = None,
    reporter: Reporter | None = None,
) -> Tokenizer:
    """Use an existing tokenizer: a tokenizer.json file, an HF folder, or a hub repo id.

    The document separator is the tokenizer's own bos token (else its eos token, else `<|bos|>` is
    added). Missing `<|pad|>`, `<|im_start|>`, `<|im_end|>` and any extra `special_tokens` are
    appended as new special tokens (ids after the existing vocabulary). Its chat template is kept
    if it has one; otherwise ChatML is used.
    """
    reporter = reporter or Reporter()
    special_tokens = list(special_tokens)
    check_special_tokens(special_tokens)
    path = Path(source)
    if path.is_file():
        tok_json, config_path, map_path = (
            path,
            path.with_name(HF_CONFIG_FILE),
            path.with_name(SPECIAL_TOKENS_MAP_FILE),
        )
        origin = {"kind": "adopted", "from": str(path)}
    elif path.is_dir():
        tok_json = path / TOKENIZER_FILE
        if not tok_json.is_file():
            raise InputError(
                f"{path}: no {TOKENIZER_FILE} in this folder",
                hint="only fast tokenizers can be adopted; in Python: "
                "AutoTokenizer.from_pretrained(folder).save_pretrained(folder) writes one",
            )
        config_path, map_path = path / HF_CONFIG_FILE, path / SPECIAL_TOKENS_MAP_FILE
        origin = {"kind": "adopted", "from": str(path)}
    elif _HUB_ID.match(str(source)) and not str(source).startswith((".", "/")):
        tok_json, config_path, map_path = _hub_files(str(source), revision)
        origin = {"kind": "adopted", "from": f"hf://{source}", "revision": revision}
    else:
        raise InputError(
            f"tokenize.adopt: {str(source)!r} is neither an existing file or folder nor a hub repo id",
            hint="give a path to tokenizer.json, a folder holding one, or a hub id like 'openai-community/gpt2'",
        )
    hf = _read_tokenizer_json(tok_json)
    config = _read_optional_json(config_path)
    config = {**_read_optional_json(map_path), **config}

    bos = _token_str(config.get("bos_token")) or _token_str(config.get("eos_token"))
    if bos is None or hf.token_to_id(bos) is None:
        bos = BOS
    pad = _token_str(config.get("pad_token"))
    if pad is None or hf.token_to_id(pad) is None:
        pad = PAD
    eos = _token_str(config.get("eos_token"))
    if eos is None or hf.token_to_id(eos) is None:
        eos = bos
    wanted = [bos, pad, *(t for t in special_tokens if t not in (BOS, PAD))]
    missing = [t for t in dict.fromkeys(wanted) if hf.token_to_id(t) is None]
    if missing:
        hf.add_special_tokens(missing)
        reporter.log(f"added special tokens {', '.join(missing)} to the adopted tokenizer")
    template = config.get("chat_template")
    return Tokenizer(
        hf,
        bos_token=bos,
        eos_token=eos,
        pad_token=pad,
        im_start_token=IM_START,
        im_end_token=IM_END,
        chat_template=template if isinstance(template, str) else CHATML_TEMPLATE,
        source={**origin, "added_special_tokens": missing},
    )


def load_tokenizer(folder: str | os.PathLike[str]) -> Tokenizer:
    """Load a tokenizer folder written by `Tokenizer.save` (checks it was not modified since)."""
    folder = Path(folder)
    meta_path = folder / METADATA_FILE
    if not meta_path.is_file():
        if (folder / TOKENIZER_FILE).is_file():
            raise InputError(
                f"{folder}: has {TOKENIZER_FILE} but no {METADATA_FILE}; it was not saved by llmctl",
                hint=f"adopt it: set tokenize.adopt: {folder}",
            )
        raise InputError(f"{folder}: not a tokenizer folder (no {METADATA_FILE})")
    meta = _read_optional_json(meta_path)
    hf = _read_tokenizer_json(folder / TOKENIZER_FILE)
    config = _read_optional_json(folder / HF_CONFIG_FILE)
    try:
        roles = meta["roles"]
        tok = Tokenizer(
            hf,
            bos_token=roles["bos"],
            eos_token=roles["eos"],
            pad_token=roles["pad"],
            im_start_token=roles["im_start"],
            im_end_token=roles["im_end"],
            chat_template=config.get("chat_template") or CHATML_TEMPLATE,
            source=meta.get("source"),
        )
    except (KeyError, TypeError) as e:
        raise InputError(f"{meta_path}: missing key {e}") from None
    if meta.get("tokenizer_id") != tok.tokenizer_id:
        raise InputError(
            f"{folder / TOKENIZER_FILE} was modified after it was saved "
            f"(id {tok.tokenizer_id}, metadata says {meta.get('tokenizer_id')})",
            hint="re-run the tokenize stage rather than editing tokenizer files by hand",
        )
    return tok


def added_tokens_decoder(added: dict) -> dict[str, dict]:
    """tokenizer_config.json's `added_tokens_decoder` for `tokenizers`' added tokens by id."""
    return {
        str(i): {
            "content": t.content,
            "lstrip": t.lstrip,
            "normalized": t.normalized,
            "rstrip": t.rstrip,
            "single_word": t.single_word,
            "special": t.special,
        }
        for i, t in sorted(added.items())
    }
