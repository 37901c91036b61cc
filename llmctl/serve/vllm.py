"""`llmctl serve --engine vllm`: hand the model folder to vLLM's OpenAI server on a CUDA machine.

A model artifact is an HF-layout folder (config.json, safetensors, tokenizer files, chat template),
which is what vLLM loads; the settings map one to one:

    missing = vllm_missing()            # [] when vllm imports and a CUDA device exists
    argv = vllm_argv(folder, model_id="sft:v0001", host="127.0.0.1", port=8000, api_key=None,
                     max_model_len=1024, chat_template=tok.chat_template)
    os.execvp(argv[0], argv)
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path


def vllm_missing() -> list[str]:
    """What stops vLLM from running here, one phrase each (empty: nothing)."""
    missing = []
    if importlib.util.find_spec("vllm") is None:
        missing.append("vllm is not installed (pip install 'llmctl[vllm]')")
    import torch

    if not torch.cuda.is_available():
        missing.append("no CUDA device is available")
    return missing


def vllm_argv(
    folder: Path,
    *,
    model_id: str,
    host: str,
    port: int,
    api_key: str | None,
    max_model_len: int,
    chat_template: str | None,
    max_num_seqs: int,
) -> list[str]:
    """The command line of vLLM's OpenAI-compatible server with llmctl serve's settings."""
    argv = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(folder),
        "--served-model-name", model_id,
        "--host", host,
        "--port", str(port),
        "--max-model-len", str(max_model_len),
        "--max-num-seqs", str(max_num_seqs),
        "--generation-config", "auto",
    ]  # fmt: skip
    if chat_template:
        argv += ["--chat-template", chat_template]  # the string itself: vLLM accepts a path or a template
    if api_key:
        argv += ["--api-key", api_key]
    return argv
