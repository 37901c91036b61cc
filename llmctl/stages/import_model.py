"""The `import` stage: bring a pretrained checkpoint into the workspace as a model artifact.

Sources: a local HF folder of the Llama family (Llama, Mistral, Qwen2, SmolLM), a hub repo id
(downloaded through huggingface_hub's cache), or a GGUF file (dequantised). The artifact is the same
HF-Llama-compatible model folder that pretrain publishes, so every later stage can start from it.
"""

from __future__ import annotations

from typing import Any

from llmctl.model.config import num_params
from llmctl.model.hf_import import import_model
from llmctl.stages.context import StageContext


def run(ctx: StageContext) -> dict[str, Any]:
    source = ctx.options["source"]
    result = import_model(source, ctx.output_dir, ctx.reporter, revision=ctx.options.get("revision"))
    cfg = result.config
    return {
        **result.as_dict(),
        "params": num_params(cfg),
        "n_layer": cfg.n_layer,
        "n_embd": cfg.n_embd,
        "vocab_size": cfg.vocab_size,
    }
