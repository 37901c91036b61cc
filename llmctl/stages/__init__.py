"""Stage registrations, in pipeline order. One entry per stage; see registry.py for the fields."""

from llmctl.stages.registry import (
    CORPUS,
    EVAL,
    MODEL,
    STAGES,
    TOKENS,
    InputSlot,
    Stage,
    pipeline_stages,
    register,
)

register(
    Stage(
        name="dedup",
        description="Remove exact and near-duplicate documents (MinHash LSH).",
        output_kind=CORPUS,
        sections=("dedup",),
        reads_sources=True,
    )
)
register(
    Stage(
        name="filter",
        description="Drop low-quality documents with datatrove's quality filters; mask PII.",
        output_kind=CORPUS,
        sections=("filter",),
        inputs=(InputSlot("corpus", (CORPUS,), ("dedup",), sources_fallback=True),),
    )
)
register(
    Stage(
        name="tokenize",
        description="Train a byte-level BPE tokenizer and encode the corpus into token shards.",
        output_kind=TOKENS,
        sections=("tokenize",),
        inputs=(InputSlot("corpus", (CORPUS,), ("filter", "dedup"), sources_fallback=True),),
    )
)
register(
    Stage(
        name="pretrain",
        description="Train a transformer on token shards; publish an HF-compatible model folder.",
        output_kind=MODEL,
        sections=("pretrain",),
        inputs=(
            InputSlot("data", (TOKENS,), ("tokenize",)),
            InputSlot("init", (MODEL,), (), required=False, config_key="init"),
        ),
        keeps_run_dir=True,
    )
)
register(
    Stage(
        name="eval",
        description="Score a model on benchmarks, custom tasks and perplexity.",
        output_kind=EVAL,
        sections=("eval",),
        inputs=(
            InputSlot("model", (MODEL,), ("pretrain",)),
            InputSlot("data", (TOKENS,), ("tokenize",), required=False),
        ),
    )
)
register(
    Stage(
        name="import",
        description="Import a pretrained checkpoint (HF folder, hub id or GGUF) as a model artifact.",
        output_kind=MODEL,
        sections=(),
        in_pipeline=False,
        module="llmctl.stages.import_model",
    )
)

__all__ = ["STAGES", "InputSlot", "Stage", "pipeline_stages", "register"]
