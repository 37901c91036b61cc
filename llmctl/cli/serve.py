"""`llmctl serve`: an OpenAI-compatible server for a model artifact (llmctl/serve/), or vLLM's."""

from __future__ import annotations

import os
from enum import Enum
from typing import Annotated

import typer

from llmctl.cli.models import CkptOption, Threads, model_folder
from llmctl.cli.options import state_of
from llmctl.errors import InputError, UsageError


class EngineChoice(str, Enum):
    llmctl = "llmctl"
    vllm = "vllm"


def serve(
    ctx: typer.Context,
    ckpt: CkptOption = "latest",
    host: Annotated[
        str, typer.Option("--host", help="Address to listen on (0.0.0.0: every interface).")
    ] = "127.0.0.1",
    port: Annotated[
        int, typer.Option("--port", help="Port to listen on (0: any free port, printed).")
    ] = 8000,
    api_key: Annotated[
        str | None,
        typer.Option(
            "--api-key",
            envvar="LLMCTL_API_KEY",
            help="Require `Authorization: Bearer KEY` on /v1.",
            show_default=False,
        ),
    ] = None,
    model_name: Annotated[
        str | None, typer.Option("--model-name", help="The model id clients name (default: the artifact id).")
    ] = None,
    engine: Annotated[
        EngineChoice,
        typer.Option("--engine", help="llmctl (CPU or GPU, this engine) or vllm (CUDA, vllm installed)."),
    ] = EngineChoice.llmctl,
    max_num_seqs: Annotated[
        int, typer.Option("--max-num-seqs", help="Most rows (choices) decoded at once.")
    ] = 32,
    max_queue: Annotated[
        int, typer.Option("--max-queue", help="Requests that may wait; more get 429.")
    ] = 256,
    kv_tokens: Annotated[
        int | None,
        typer.Option(
            "--kv-tokens",
            help="KV cache budget in tokens (default: max-num-seqs x context).",
            show_default=False,
        ),
    ] = None,
    prefill_chunk: Annotated[
        int,
        typer.Option(
            "--prefill-chunk",
            help="Most prompt tokens prefilled between two decode steps (whole prompts that fit go "
            "through one batched forward): lower keeps running streams smooth (a CPU prefills 128 "
            "tokens in about the time of a few decode steps), higher starts new requests sooner.",
        ),
    ] = 512,
    prefix_cache: Annotated[
        bool,
        typer.Option(
            "--prefix-cache/--no-prefix-cache",
            help="Compute a prompt prefix shared by requests (a system prompt) once and keep it for "
            "later ones (outputs equal up to float rounding).",
        ),
    ] = True,
    max_body_kb: Annotated[
        int, typer.Option("--max-body-kb", help="Largest request body; more gets 413.")
    ] = 1024,
    drain_timeout: Annotated[
        float, typer.Option("--drain-timeout", help="Seconds SIGTERM waits for running requests.")
    ] = 30.0,
    threads: Threads = None,
) -> None:
    """Serve a model over the OpenAI API (/v1/completions, /v1/chat/completions, /v1/models) with continuous batching.

    Chat prompts use the chat template stored with the model (the one sft trained with).
    Without --ckpt: the newest model in pipeline order. SIGTERM drains running requests and exits 0.

    [bold]Examples[/]
      llmctl serve --ckpt sft:latest
      llmctl serve --ckpt ./SmolLM2-135M-Instruct --port 8080 --api-key secret
      llmctl serve --ckpt sft:latest --engine vllm --max-num-seqs 256
    """
    for name, value in (
        ("--max-num-seqs", max_num_seqs),
        ("--max-queue", max_queue),
        ("--prefill-chunk", prefill_chunk),
        ("--max-body-kb", max_body_kb),
    ):
        if value < 1:
            raise UsageError(f"{name} must be >= 1 (got {value})")
    if not 0 <= port < 65536:
        raise UsageError(f"--port must be in 0..65535 (got {port})")
    out = state_of(ctx).output()
    folder, label = model_folder(ctx, ckpt)
    model_id = model_name or label
    if engine is EngineChoice.vllm:
        _exec_vllm(folder, model_id, host, port, api_key, max_num_seqs)
        return

    from llmctl.inference import load_model
    from llmctl.model.config import num_params
    from llmctl.serve.server import ServeOptions
    from llmctl.serve.server import serve as run_server
    from llmctl.threads import apply_threads, choose_threads

    out.reporter().log(f"model: {label}")
    loaded = load_model(folder)
    apply_threads(choose_threads(threads, work=num_params(loaded.config)))
    options = ServeOptions(
        model_id=model_id,
        host=host,
        port=port,
        api_key=api_key or None,
        max_rows=max_num_seqs,
        kv_tokens=kv_tokens,
        prefill_chunk=prefill_chunk,
        prefix_cache=prefix_cache,
        max_queue=max_queue,
        max_body_bytes=max_body_kb * 1024,
        drain_timeout=drain_timeout,
    )
    run_server(loaded, options, log=out.reporter().log)


def _exec_vllm(folder, model_id: str, host: str, port: int, api_key: str | None, max_num_seqs: int) -> None:
    """Replace this process with vLLM's OpenAI server on the folder, or refuse with what is missing."""
    from llmctl.model.hf_tokenizer import load_folder_tokenizer
    from llmctl.serve.vllm import vllm_argv, vllm_missing

    missing = vllm_missing()
    if missing:
        raise InputError(
            "--engine vllm cannot run here: " + "; ".join(missing),
            hint="use --engine llmctl (the default), or install vllm on a machine with a CUDA GPU",
        )
    import json

    config = json.loads((folder / "config.json").read_text())
    argv = vllm_argv(
        folder,
        model_id=model_id,
        host=host,
        port=port,
        api_key=api_key,
        max_model_len=int(config.get("max_position_embeddings", 2048)),
        chat_template=load_folder_tokenizer(folder).chat_template,
        max_num_seqs=max_num_seqs,
    )
    os.execvp(argv[0], argv)


def register(app: typer.Typer) -> None:
    app.command("serve")(serve)
