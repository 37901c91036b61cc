"""The `filter:` section of llmctl.yaml: an ordered list of quality filters and formatters.

    filter:
      steps:
        - type: gopher_repetition
        - type: gopher_quality
          min_doc_words: 50
        - type: pii
        - type: language
          model_path: models/lid.176.bin    # local fastText model; llmctl never downloads it
          languages: [en]
      keep_excluded: true

Each step is one datatrove filter (or a small one of ours) with its parameters as typed fields and
datatrove's defaults. `llmctl.data.filters.run_filters` runs them in order.

Steps that need a file (a fastText model, a word list) must name it here: a missing one is a config
error when the file is loaded, not a download or a crash halfway through a run. When the loader
passes `context={"base_dir": project_dir}` to validation, the files are also checked to exist.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from llmctl.config.base import Section


class _Step(Section):
    name: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9_.-]+$",
        description="Step name, used for excluded/<name>/ and in reports; defaults to the type.",
    )

    @property
    def step_name(self) -> str:
        return self.name or self.type  # type: ignore[attr-defined]


def _check_local_file(value: str | None, info: ValidationInfo, what: str) -> None:
    base = (info.context or {}).get("base_dir") if info.context else None
    if value is None or base is None:
        return
    path = Path(value).expanduser()
    if not path.is_absolute():
        path = Path(base) / path
    if not path.is_file():
        raise ValueError(f"{what} {value!r} does not exist (looked for {path})")


class GopherQualityStep(_Step):
    """Gopher quality heuristics (Rae et al. 2021, table A1), datatrove's GopherQualityFilter."""

    type: Literal["gopher_quality"] = Field(description="Gopher quality rules.")
    min_doc_words: int | None = Field(50, description="Drop documents with fewer (non-symbol) words.")
    max_doc_words: int | None = Field(100_000, description="Drop documents with more (non-symbol) words.")
    min_avg_word_length: float | None = Field(
        3, description="Drop documents whose mean word length is below."
    )
    max_avg_word_length: float | None = Field(
        10, description="Drop documents whose mean word length is above."
    )
    max_symbol_word_ratio: float | None = Field(
        0.1, description="Drop documents with more '#' or ellipses per word than this."
    )
    max_bullet_lines_ratio: float | None = Field(
        0.9, description="Drop documents where more than this fraction of lines start with a bullet."
    )
    max_ellipsis_lines_ratio: float | None = Field(
        0.3, description="Drop documents where more than this fraction of lines end with an ellipsis."
    )
    max_non_alpha_words_ratio: float | None = Field(
        0.8,
        description="Drop documents where fewer than this fraction of words contain a letter "
        "(datatrove's name; it is a minimum).",
    )
    min_stop_words: int | None = Field(
        2, description="Drop documents containing fewer distinct stop words than this."
    )
    stop_words: list[str] | None = Field(
        None, description="Stop words for min_stop_words; default: the, be, to, of, and, that, have, with."
    )


class GopherRepetitionStep(_Step):
    """Gopher repetition rules (duplicate lines/paragraphs/n-grams), datatrove's GopherRepetitionFilter."""

    type: Literal["gopher_repetition"] = Field(description="Gopher repetition rules.")
    dup_line_frac: float | None = Field(0.3, description="Max fraction of duplicated lines.")
    dup_para_frac: float | None = Field(0.3, description="Max fraction of duplicated paragraphs.")
    dup_line_char_frac: float | None = Field(
        0.2, description="Max fraction of characters in duplicated lines."
    )
    dup_para_char_frac: float | None = Field(
        0.2, description="Max fraction of characters in duplicated paragraphs."
    )
    top_n_grams: list[tuple[int, float]] = Field(
        [(2, 0.2), (3, 0.18), (4, 0.16)],
        description="[n, max fraction]: max share of characters covered by the most frequent word n-gram.",
    )
    dup_n_grams: list[tuple[int, float]] = Field(
        [(5, 0.15), (6, 0.14), (7, 0.13), (8, 0.12), (9, 0.11), (10, 0.10)],
        description="[n, max fraction]: max share of characters in duplicated word n-grams.",
    )


class C4QualityStep(_Step):
    """C4 line and document rules (Raffel et al. 2020), datatrove's C4QualityFilter. Rewrites text:
    lines failing the line rules are removed from kept documents."""

    type: Literal["c4_quality"] = Field(description="C4 quality rules.")
    split_paragraph: bool = Field(
        True, description="Apply line rules to lines (true) or to sentences (false)."
    )
    remove_citations: bool = Field(True, description="Remove wikipedia-style citations like [1] and [edit].")
    filter_no_terminal_punct: bool = Field(
        True, description="Remove lines not ending in terminal punctuation."
    )
    min_num_sentences: int = Field(5, description="Drop documents with fewer sentences left (-1: off).")
    min_words_per_line: int = Field(3, description="Remove lines with fewer words (-1: off).")
    max_word_length: int = Field(1000, description="Remove lines with a longer word (-1: off).")
    filter_lorem_ipsum: bool = Field(True, description="Drop documents containing 'lorem ipsum'.")
    filter_javascript: bool = Field(True, description="Remove lines mentioning 'javascript'.")
    filter_curly_bracket: bool = Field(True, description="Drop documents containing '{'.")
    filter_policy: bool = Field(True, description="Remove lines about cookies, terms of use, privacy policy.")


class FineWebQualityStep(_Step):
    """FineWeb's extra line rules (Penedo et al. 2024), datatrove's FineWebQualityFilter."""

    type: Literal["fineweb_quality"] = Field(description="FineWeb quality rules.")
    line_punct_thr: float = Field(
        0.12, description="Drop if fewer than this fraction of lines end in punctuation."
    )
    line_punct_exclude_zero: bool = Field(
        False, description="Do not apply line_punct_thr to documents where no line ends in punctuation."
    )
    short_line_thr: float = Field(0.67, description="Drop if more than this fraction of lines are short.")
    short_line_length: int = Field(30, description="A line this many characters or fewer is short.")
    char_duplicates_ratio: float = Field(
        0.01, description="Drop if more than this fraction of characters are in duplicated lines."
    )
    new_line_ratio: float = Field(0.3, description="Drop if there are more newlines per word than this.")


class LengthStep(_Step):
    """Length bounds in characters and/or words (unset bounds are not checked)."""

    type: Literal["length"] = Field(description="Length bounds.")
    min_chars: int | None = Field(None, ge=0, description="Drop documents with fewer characters.")
    max_chars: int | None = Field(None, ge=1, description="Drop documents with more characters.")
    min_words: int | None = Field(
        None, ge=0, description="Drop documents with fewer whitespace-separated words."
    )
    max_words: int | None = Field(
        None, ge=1, description="Drop documents with more whitespace-separated words."
    )

    @model_validator(mode="after")
    def _bounds(self) -> LengthStep:
        if all(v is None for v in (self.min_chars, self.max_chars, self.min_words, self.max_words)):
            raise ValueError("set at least one of min_chars, max_chars, min_words, max_words")
        for lo, hi, unit in (
            (self.min_chars, self.max_chars, "chars"),
            (self.min_words, self.max_words, "words"),
        ):
            if lo is not None and hi is not None and lo > hi:
                raise ValueError(f"min_{unit} ({lo}) is greater than max_{unit} ({hi})")
        return self


class UrlStep(_Step):
    """URL block-lists, datatrove's URLFilter. Its lists ship inside the datatrove package (no
    download); documents need the URL in metadata (`url_key`)."""

    type: Literal["url"] = Field(description="URL block-list filter.")
    url_key: str = Field("url", description="Metadata key holding the document URL.")
    missing_url: Literal["keep", "drop"] = Field(
        "keep", description="What to do with documents that have no URL (counted either way)."
    )
    use_integrated_lists: bool = Field(
        True,
        description="Use datatrove's bundled domain/URL/word block-lists (shipped offline in the package).",
    )
    soft_word_threshold: int = Field(
        2, description="Drop URLs containing at least this many soft-banned words."
    )
    extra_domains: list[str] = Field([], description="More domains to block (e.g. example.com).")
    extra_urls: list[str] = Field([], description="More exact URLs to block.")
    banned_words: list[str] = Field([], description="More words that block a URL containing them.")
    banned_subwords: list[str] = Field([], description="More substrings that block a URL containing them.")
    soft_banned_words: list[str] = Field([], description="More soft-banned words (see soft_word_threshold).")


class RegexStep(_Step):
    """Drop documents matching any of a list of regular expressions (Python `re` syntax)."""

    type: Literal["regex"] = Field(description="Regex block-list.")
    patterns: list[str] = Field(min_length=1, description="Drop a document if any pattern matches its text.")
    ignore_case: bool = Field(False, description="Match case-insensitively.")

    @field_validator("patterns")
    @classmethod
    def _compile(cls, v: list[str]) -> list[str]:
        for i, p in enumerate(v):
            try:
                re.compile(p)
            except re.error as e:
                raise ValueError(f"pattern {i} ({p!r}) is not a valid regular expression: {e}") from None
        return v


class PiiStep(_Step):
    """Replace email addresses and public IP addresses (datatrove's PIIFormatter). Rewrites text,
    never drops a document."""

    type: Literal["pii"] = Field(description="PII formatter.")
    remove_emails: bool = Field(True, description="Replace email addresses.")
    remove_ips: bool = Field(True, description="Replace IP addresses.")
    only_remove_public_ips: bool = Field(
        True, description="Leave private/reserved IPs (10.x, 192.168.x) alone."
    )
    email_replacement: list[str] = Field(
        ["email@example.com", "firstname.lastname@example.org"],
        min_length=1,
        description="Replacements for emails, used in turn.",
    )
    ip_replacement: list[str] = Field(
        [
            "22.214.171.124",
            "126.96.36.199",
            "188.8.131.52",
            "184.108.40.206",
            "220.127.116.11",
            "18.104.22.168",
        ],
        min_length=1,
        description="Replacements for IPs, used in turn (datatrove's list of unused addresses).",
    )


class LanguageStep(_Step):
    """Language id with a local fastText model (datatrove's LanguageFilter); writes `language` and
    `language_score` into metadata."""

    type: Literal["language"] = Field(description="fastText language id filter.")
    model_path: str | None = Field(
        None,
        description="Local fastText language-id model file, relative to the project folder "
        "(lid.176.bin for backend ft176, glotlid model_v3.bin for glotlid). Required: llmctl never downloads it.",
    )
    backend: Literal["ft176", "glotlid"] = Field("ft176", description="Which model family model_path is.")
    languages: list[str] | None = Field(
        ["en"], description="Languages to keep; null keeps any confident language."
    )
    language_threshold: float = Field(0.65, ge=0, le=1, description="Minimum score of a kept language.")
    label_only: bool = Field(False, description="Only label documents (metadata), drop nothing.")

    @field_validator("model_path")
    @classmethod
    def _model_exists(cls, v: str | None, info: ValidationInfo) -> str | None:
        _check_local_file(v, info, "model_path")
        return v

    @model_validator(mode="after")
    def _model_given(self) -> LanguageStep:
        if self.model_path is None:
            raise ValueError(
                "the language step needs `model_path`: a local fastText language-id model file "
                "(lid.176.bin from https://fasttext.cc/docs/en/language-identification.html, or "
                "`hf download cis-lmu/glotlid model_v3.bin` with backend: glotlid); llmctl does not download it"
            )
        return self


class BadWordsStep(_Step):
    """Drop documents containing a word from a local list (one word or phrase per line, '#' comments)."""

    type: Literal["bad_words"] = Field(description="Bad-words filter.")
    words_path: str | None = Field(
        None,
        description="Local word list, relative to the project folder (e.g. the LDNOOBW list for your "
        "language). Required: llmctl never downloads it.",
    )
    keep_fraction: float = Field(
        0.0, ge=0, le=1, description="Keep this fraction of matching documents anyway."
    )
    seed: int = Field(0, description="Seed for keep_fraction.")

    @field_validator("words_path")
    @classmethod
    def _words_exist(cls, v: str | None, info: ValidationInfo) -> str | None:
        _check_local_file(v, info, "words_path")
        return v

    @model_validator(mode="after")
    def _words_given(self) -> BadWordsStep:
        if self.words_path is None:
            raise ValueError(
                "the bad_words step needs `words_path`: a local word list, one word per line (e.g. "
                "https://github.com/LDNOOBW/List-of-Dirty-Naughty-Obscene-and-Otherwise-Bad-Words); "
                "llmctl does not download it"
            )
        return self


FilterStep = Annotated[
    GopherQualityStep
    | GopherRepetitionStep
    | C4QualityStep
    | FineWebQualityStep
    | LengthStep
    | UrlStep
    | RegexStep
    | PiiStep
    | LanguageStep
    | BadWordsStep,
    Field(discriminator="type"),
]


def default_steps() -> list[FilterStep]:
    """The tiny template's steps: repetition, Gopher quality, FineWeb line rules, then PII masking.

    Tuned on the synthetic corpus (llmctl.data.synthetic; tests/test_filters.py checks it): seeds 0-3
    at 3,000 documents drop 100% of planted junk and keep 100% of clean documents. Two changes from
    datatrove's defaults, both measured there:
    * gopher_repetition without `dup_n_grams`: templated prose repeats 5-10-grams legitimately, and
      those rules dropped 6% of clean documents; duplicated lines/paragraphs and top n-grams stay.
    * fineweb_quality `new_line_ratio` 0.08 instead of 0.3: nav menus and cookie banners have >= 0.10
      newlines per word, clean prose <= 0.05; nothing else separated that boilerplate from prose.
    C4's rules are left out: C4QualityFilter rejoins kept lines with single newlines, which erases
    paragraph breaks in every kept document.
    """
    return [
        GopherRepetitionStep(type="gopher_repetition", dup_n_grams=[]),
        GopherQualityStep(type="gopher_quality"),
        FineWebQualityStep(type="fineweb_quality", new_line_ratio=0.08),
        PiiStep(type="pii"),
    ]


class FilterConfig(Section):
    """Quality filtering: steps run in order; a document dropped by one step is not seen by the next."""

    steps: list[FilterStep] = Field(
        default_factory=default_steps, description="Filters and formatters, run in this order."
    )
    keep_excluded: bool = Field(
        True, description="Write dropped documents to excluded/<step>/ (with metadata.filter_reason)."
    )
    workers: int = Field(
        0,
        ge=0,
        description="Processes running the steps; 0 = one per CPU core (up to 8) on inputs big enough to gain.",
    )

    @model_validator(mode="after")
    def _unique_names(self) -> FilterConfig:
        seen: set[str] = set()
        for i, step in enumerate(self.steps):
            if step.step_name in seen:
                raise ValueError(
                    f"steps[{i}]: step name {step.step_name!r} is used twice; give one of them a distinct `name:`"
                )
            seen.add(step.step_name)
        return self
