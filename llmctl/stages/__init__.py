"""Stage registrations, in pipeline order. One entry per stage; see registry.py for the fields and
for what adding a stage touches. Stages of other distributions (entry points in the `llmctl.stages`
group) are registered after these."""

from importlib.metadata import entry_points

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
    stage_order,
)

register(
    Stage(
        name="dedup",
        description="Remove exact and near-duplicate documents (MinHash LSH).",
        output_kind=CORPUS,
        sections=("dedup",),
        config="llmctl.config.dedup:DedupConfig",
        reads_sources=True,
    )
)
register(
    Stage(
        name="filter",
        description="Drop low-quality documents with datatrove's quality filters; mask PII.",
        output_kind=CORPUS,
        sections=("filter",),
        config="llmctl.config.filter:FilterConfig",
        inputs=(InputSlot("corpus", (CORPUS,), ("dedup",), sources_fallback=True),),
    )
)
register(
    Stage(
        name="tokenize",
        description="Train a byte-level BPE tokenizer and encode the corpus into token shards.",
        output_kind=TOKENS,
        sections=("tokenize",),
        config="llmctl.config.tokenize:TokenizeConfig",
        inputs=(InputSlot("corpus", (CORPUS,), ("filter", "dedup"), sources_fallback=True),),
    )
)
register(
    Stage(
        name="pretrain",
        description="Train a transformer on token shards; publish an HF-compatible model folder.",
        output_kind=MODEL,
        sections=("pretrain",),
        config="llmctl.config.pretrain:PretrainConfig",
        inputs=(
            InputSlot("data", (TOKENS,), ("tokenize",)),
            InputSlot("init", (MODEL,), (), required=False, config_key="init"),
        ),
        keeps_run_dir=True,
        distributed=True,
    )
)
register(
    Stage(
        name="sft",
        description="Fine-tune a model on conversations into a chat model (full or LoRA), assistant-only loss.",
        output_kind=MODEL,
        sections=("sft",),
        config="llmctl.config.sft:SftConfig",
        command="llmctl.cli.sft:sft",
        inputs=(InputSlot("model", (MODEL,), newest_in_pipeline=True, config_key="model"),),
        keeps_run_dir=True,
        distributed=True,
    )
)
register(
    Stage(
        name="dpo",
        description="Optimise a model on preference pairs (DPO, cDPO, robust DPO, IPO, SimPO); the reference "
        "log-probs are the starting model's, computed once and kept for --resume.",
        output_kind=MODEL,
        sections=("dpo",),
        config="llmctl.config.dpo:DpoConfig",
        examples=(
            "llmctl dpo",
            "llmctl dpo --model sft:latest --set dpo.loss=ipo --set dpo.beta=0.5",
            "llmctl dpo --set dpo.loss=simpo",
            "llmctl dpo --gpus 2 --device cpu",
            "llmctl dpo --resume",
        ),
        inputs=(InputSlot("model", (MODEL,), newest_in_pipeline=True, config_key="model"),),
        keeps_run_dir=True,
        distributed=True,
    )
)
register(
    Stage(
        name="grpo",
        description="Reinforcement learning with verifiable rewards (GRPO, DAPO, Dr. GRPO) on rollouts from our engine.",
        output_kind=MODEL,
        sections=("grpo",),
        config="llmctl.config.grpo:GrpoConfig",
        examples=(
            "llmctl grpo",
            "llmctl grpo --set grpo.loss_type=grpo --set grpo.beta=0.04",
            "llmctl grpo --set grpo.epsilon_high=0.28 --set grpo.drop_zero_variance=true",
            "llmctl grpo --gpus 2 --device cpu",
            "llmctl grpo --resume",
        ),
        inputs=(InputSlot("model", (MODEL,), newest_in_pipeline=True, config_key="model"),),
        keeps_run_dir=True,
        distributed=True,
    )
)
register(
    Stage(
        name="eval",
        description="Score a model on benchmarks, custom tasks and perplexity.",
        output_kind=EVAL,
        sections=("eval",),
        config="llmctl.config.eval:EvalConfig",
        inputs=(
            InputSlot("model", (MODEL,), newest_in_pipeline=True, config_key="model"),
            InputSlot("data", (TOKENS,), ("tokenize",), required=False),
        ),
    )
)
register(
    Stage(
        name="quantize",
        description="Quantize a model's weights (int8, int4; RTN or GPTQ), score it against its source, and "
        "measure size and decode speed.",
        output_kind=MODEL,
        sections=("quantize",),
        config="llmctl.config.quantize:QuantizeConfig",
        command="llmctl.cli.quantize:quantize",
        newest=False,  # a compressed copy: `latest` and eval's default stay the model it came from
        inputs=(
            InputSlot("model", (MODEL,), newest_in_pipeline=True, config_key="model"),
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

for _entry in entry_points(group="llmctl.stages"):
    _entry.load()  # the module registers its stages

__all__ = ["STAGES", "InputSlot", "Stage", "pipeline_stages", "register", "stage_order"]
