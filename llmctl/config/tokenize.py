"""The `tokenize:` section of llmctl.yaml: train (or adopt) a tokenizer and encode the corpus.

    tokenize:
      vocab_size: 4096              # includes the special tokens
      split_pattern: gpt4           # or gpt2, or your own regex
      val_fraction: 0.02
      # adopt: openai-community/gpt2   # use an existing tokenizer instead of training one

The library functions live in `llmctl.data.tokenizer` (train/adopt/save/load) and
`llmctl.data.encode` (shards).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from llmctl.config.base import Section

DEFAULT_SPECIAL_TOKENS = ["<|bos|>", "<|pad|>", "<|im_start|>", "<|im_end|>"]
_REQUIRED = DEFAULT_SPECIAL_TOKENS


class TokenizeConfig(Section):
    """How to build the tokenizer and the train/val token shards."""

    vocab_size: int = Field(
        4096,
        ge=1,
        description=(
            "Tokenizer vocabulary size including special tokens; at least 256 + the number of special "
            "tokens. 4096 suits the tiny CPU template; 32768-65536 is typical for real runs."
        ),
    )
    split_pattern: str = Field(
        "gpt4",
        description=(
            "Regex that splits text into pre-tokens before BPE: 'gpt4' (cl100k), 'gpt2', or a custom "
            "regex in Oniguruma syntax (\\p{L}, \\p{N} classes)."
        ),
    )
    split_digits: bool = Field(
        False,
        description="Split numbers into single digits instead of groups of up to 3 (gpt4 pattern).",
    )
    min_frequency: int = Field(
        2, ge=1, description="A pair must occur at least this often in the training text to be merged."
    )
    special_tokens: list[str] = Field(
        default_factory=lambda: list(DEFAULT_SPECIAL_TOKENS),
        description=(
            "Special tokens with fixed ids 0, 1, 2, ... in this order. Must contain <|bos|> (document "
            "start and separator), <|pad|>, <|im_start|> and <|im_end|> (ChatML); append your own."
        ),
    )
    adopt: str | None = Field(
        None,
        description=(
            "Use an existing tokenizer instead of training: a tokenizer.json, a folder holding one, or "
            "a hub repo id such as 'openai-community/gpt2'. vocab_size, split_pattern and "
            "min_frequency are then ignored."
        ),
    )
    val_fraction: float = Field(
        0.02,
        ge=0,
        le=0.5,
        description="Fraction of documents (chosen by a hash of the document id and seed) held out for validation.",
    )
    shard_tokens: int = Field(
        10_000_000, ge=1024, description="Tokens per shard file before starting a new one."
    )
    workers: int | None = Field(None, ge=1, description="Encoding processes; empty means one per CPU core.")
    max_train_chars: int | None = Field(
        100_000_000,
        ge=1,
        description="Train the tokenizer on at most this many characters of the corpus (empty: all).",
    )
    max_doc_chars: int | None = Field(
        10_000,
        ge=1,
        description="Use at most this many characters of each document for tokenizer training.",
    )
    encoder: Literal["auto", "tiktoken", "tokenizers"] = Field(
        "auto",
        description=(
            "Corpus encoder: 'auto' uses tiktoken (faster) when it gives ids identical to tokenizers "
            "on a sample, else tokenizers; 'tiktoken' fails instead of falling back."
        ),
    )
    seed: int | None = Field(
        None, description="Seed of the train/val split hash; empty means the project seed."
    )

    @field_validator("special_tokens")
    @classmethod
    def _distinct_specials(cls, v: list[str]) -> list[str]:
        dupes = sorted({t for t in v if v.count(t) > 1})
        if dupes:
            raise ValueError(f"special tokens must be distinct; listed more than once: {', '.join(dupes)}")
        if any(not t or t != t.strip() for t in v):
            raise ValueError("special tokens must be non-empty and have no surrounding whitespace")
        missing = [t for t in _REQUIRED if t not in v]
        if missing:
            raise ValueError(f"missing required special tokens: {', '.join(missing)}")
        return v

    @field_validator("split_pattern")
    @classmethod
    def _valid_pattern(cls, v: str) -> str:
        if v in ("gpt4", "gpt2"):
            return v
        from tokenizers import Regex

        try:
            Regex(v)
        except Exception as e:
            raise ValueError(f"not a valid regex: {e}") from None
        return v

    @model_validator(mode="after")
    def _vocab_fits(self) -> TokenizeConfig:
        minimum = 256 + len(self.special_tokens)
        if self.adopt is None and self.vocab_size < minimum:
            raise ValueError(
                f"vocab_size {self.vocab_size} is too small: the minimum is {minimum} "
                f"(256 byte tokens + {len(self.special_tokens)} special tokens)"
            )
        if self.split_digits and self.split_pattern != "gpt4" and r"\p{N}{1,3}" not in self.split_pattern:
            raise ValueError(
                "split_digits needs a split_pattern with a '\\p{N}{1,3}' digit group (e.g. gpt4)"
            )
        return self
