"""The `tokenize` stage: train (or adopt) a byte-level BPE tokenizer, then encode the corpus into shards.

Input: the newest filter (else dedup) corpus artifact, else the raw data sources.
Output artifact (kind tokens):
    tokenizer/            HF-compatible tokenizer folder (tokenizer.json, tokenizer_config.json with the
                          ChatML chat template, special_tokens_map.json, llmctl_tokenizer.json)
    train/, val/          token shards (uint16/uint32 + document index; every document starts with BOS)
    shards.json           the shard index
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from llmctl.data.corpus import iter_corpus
from llmctl.data.encode import encode_corpus
from llmctl.data.shards import TOKENIZER_DIR
from llmctl.data.sources import read_sources
from llmctl.data.tokenizer import adopt_tokenizer, train_tokenizer
from llmctl.errors import ConfigError
from llmctl.stages.context import StageContext


def run(ctx: StageContext) -> dict[str, Any]:
    cfg = ctx.config
    corpus = ctx.inputs.get("corpus")
    if corpus is None and ctx.project.data is None:
        raise ConfigError(
            "nothing to tokenize: no corpus artifact and no data.sources", hint="run `llmctl filter`"
        )
    if corpus is None:
        ctx.note("tokenize: no corpus artifact; reading data.sources directly")

    def documents() -> Iterator[Any]:
        if corpus is not None:
            return iter_corpus(corpus.path)
        return read_sources(ctx.project.data, ctx.project_dir)

    # The corpus artifact's own counts size the progress bars (filter and dedup name its bytes differently).
    sizes = corpus.manifest.metrics if corpus is not None else {}
    docs_in = sizes.get("documents_out")
    bytes_in = sizes.get("text_bytes_kept", sizes.get("bytes_out"))
    if cfg.adopt:
        tokenizer = adopt_tokenizer(cfg.adopt, special_tokens=cfg.special_tokens, reporter=ctx.reporter)
    else:
        tokenizer = train_tokenizer(
            (doc.text for doc in documents()),
            vocab_size=cfg.vocab_size,
            split_pattern=cfg.split_pattern,
            split_digits=cfg.split_digits,
            min_frequency=cfg.min_frequency,
            special_tokens=cfg.special_tokens,
            max_chars=cfg.max_train_chars,
            max_doc_chars=cfg.max_doc_chars,
            reporter=ctx.reporter,
            total_docs=docs_in,
            total_bytes=bytes_in,
        )
    tokenizer.save(ctx.output_dir / TOKENIZER_DIR)
    seed = cfg.seed if cfg.seed is not None else ctx.project.seed
    result = encode_corpus(
        ((doc.id, doc.text) for doc in documents()),
        tokenizer,
        ctx.output_dir,
        val_fraction=cfg.val_fraction,
        shard_tokens=cfg.shard_tokens,
        workers=cfg.workers,
        encoder=cfg.encoder,
        seed=seed,
        total_docs=docs_in,
        reporter=ctx.reporter,
    )
    return {
        **result.to_dict(),
        "vocab_size": tokenizer.vocab_size,
        "tokenizer_id": tokenizer.tokenizer_id,
        "trained": not cfg.adopt,
    }
