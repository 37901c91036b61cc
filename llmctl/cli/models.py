"""Model commands: `llmctl import`, `llmctl generate`, `llmctl chat`."""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from llmctl.cli.completion import complete_refs
from llmctl.cli.options import ForceOption, JsonOption, state_of
from llmctl.errors import UsageError

CkptOption = Annotated[
    str,
    typer.Option(
        "--ckpt",
        help="Model: latest (the newest model in pipeline order: the last training stage that has one; "
        "an import counts as before the pipeline), STAGE:latest, STAGE:vN, or an HF model folder.",
        autocompletion=complete_refs(("model",)),
    ),
]


def plain_model_folder(ref: str) -> Path | None:
    """`ref` as an HF model folder that is not an artifact (no manifest), else None."""
    path = Path(ref).expanduser()
    if path.is_dir() and (path / "config.json").is_file() and not (path / "manifest.json").is_file():
        return path.resolve()
    return None


def model_folder(ctx: typer.Context, ref: str) -> tuple[Path, str]:
    """A model artifact's folder and its id (what `latest` resolved to), or a plain HF model folder
    given by path and that path (works outside projects)."""
    plain = plain_model_folder(ref)
    if plain is not None:
        return plain, str(plain)
    from llmctl.stages.runner import workspace_for

    config, folder = state_of(ctx).load_project()
    artifact = workspace_for(config, folder).resolve(ref, kinds=("model",))
    return artifact.path, artifact.id


def _load(ctx: typer.Context, out, ckpt: str, threads: int | None):
    """Resolve and load the model, say which one on stderr, and size torch's threads to it."""
    from llmctl.inference import load_model
    from llmctl.model.config import num_params
    from llmctl.threads import apply_threads, choose_threads

    folder, label = model_folder(ctx, ckpt)
    out.reporter().log(f"model: {label}")
    loaded = load_model(folder)
    # A decode step does about one multiply-add per parameter.
    used = apply_threads(choose_threads(threads, work=num_params(loaded.config)))
    if threads is not None and used < threads:
        out.reporter().log(f"threads: {used} (--threads {threads} is more than the {used} core(s) available)")
    return loaded, label, used


def import_(
    ctx: typer.Context,
    source: Annotated[str, typer.Argument(help="HF model folder, hub repo id (org/name), or a .gguf file.")],
    revision: Annotated[
        str | None, typer.Option("--revision", help="Hub revision (branch, tag or commit).")
    ] = None,
    force: ForceOption = False,
    json_: JsonOption = False,
) -> None:
    """Import a pretrained model (Llama, Mistral, Qwen2, SmolLM; HF folder, hub id or GGUF) as a model artifact.

    [bold]Examples[/]
      llmctl import ./SmolLM2-135M-Instruct
      llmctl import HuggingFaceTB/SmolLM2-135M --revision main
      llmctl import SmolLM2-135M-Instruct.Q4_1.gguf
    """
    from llmctl.cli.stages import run_stage_command

    source_path = Path(source).expanduser()
    options: dict[str, Any] = {"source": str(source_path.resolve()) if source_path.exists() else source}
    if revision:
        options["revision"] = revision
    run_stage_command(ctx, "import", sets=None, force=force, json_=json_, options=options)


def _sampling(
    max_new_tokens: int,
    temperature: float,
    top_k: int,
    top_p: float,
    repetition_penalty: float,
    stop: list[str] | None,
    seed: int | None,
    stop_ids: tuple[int, ...],
):
    from llmctl.inference import unescape
    from llmctl.model.engine import SamplingParams

    return SamplingParams(
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        repetition_penalty=repetition_penalty,
        stop_strings=tuple(unescape(s) for s in stop or ()),
        stop_token_ids=stop_ids,
        seed=seed,
    )


MaxNew = Annotated[int, typer.Option("--max-new-tokens", "-n", help="Most tokens to generate.")]
Temperature = Annotated[float, typer.Option("--temperature", "-t", help="0 = greedy (deterministic).")]
TopK = Annotated[int, typer.Option("--top-k", help="Sample from the k most likely tokens (0 = off).")]
TopP = Annotated[float, typer.Option("--top-p", help="Nucleus sampling mass (1.0 = off).")]
RepPenalty = Annotated[float, typer.Option("--repetition-penalty", help="> 1 discourages repeats.")]
Stop = Annotated[
    list[str] | None,
    typer.Option(
        "--stop",
        help=r"Stop string (repeatable). Escapes are interpreted: \n newline, \t tab, \r, \\ backslash, "
        r"\xHH, \uHHHH; e.g. --stop '\n' stops at the end of the line.",
    ),
]
Seed = Annotated[int | None, typer.Option("--seed", help="Sampling seed.")]
Threads = Annotated[
    int | None,
    typer.Option(
        "--threads",
        help="CPU threads (default: the cores this process may use that no other process keeps busy, "
        "fewer for small models; never more than the cores).",
        show_default=False,
    ),
]


def generate(
    ctx: typer.Context,
    prompt: Annotated[str, typer.Argument(help="The prompt text.")],
    ckpt: CkptOption = "latest",
    max_new_tokens: MaxNew = 64,
    temperature: Temperature = 0.0,
    top_k: TopK = 0,
    top_p: TopP = 1.0,
    repetition_penalty: RepPenalty = 1.0,
    stop: Stop = None,
    seed: Seed = None,
    threads: Threads = None,
    json_: JsonOption = False,
) -> None:
    """Continue a prompt with a model, streaming tokens as they come.

    Without --ckpt: the newest model in pipeline order (the last training stage that has one).

    [bold]Examples[/]
      llmctl generate "The people of Wynbarmar speak" --ckpt pretrain:latest
      llmctl generate "Once upon a time" -t 0.8 --top-p 0.95 --seed 1 -n 200
      llmctl generate "2 + 2 =" --ckpt ./my-hf-model --stop "\\n" --json
    """
    state = state_of(ctx)
    out = state.output(json_)
    loaded, label, used_threads = _load(ctx, out, ckpt, threads)
    params = _sampling(
        max_new_tokens, temperature, top_k, top_p, repetition_penalty, stop, seed, loaded.stop_token_ids()
    )
    params = dataclasses.replace(params, logprobs=out.json_mode)  # scripts get the log-probabilities
    prompt_ids = loaded.encode(prompt)
    if len(prompt_ids) + max_new_tokens > loaded.config.max_seq_len:
        raise UsageError(
            f"prompt ({len(prompt_ids)} tokens) + --max-new-tokens {max_new_tokens} exceeds the context "
            f"of {loaded.config.max_seq_len}",
            hint="shorten the prompt or lower --max-new-tokens",
        )
    streaming = not out.json_mode

    first_token_at: list[float] = []

    def show(event) -> None:
        if not first_token_at:
            first_token_at.append(time.perf_counter())
        if streaming and event.text:
            sys.stdout.write(event.text)
            sys.stdout.flush()

    if streaming:
        sys.stdout.write(prompt)
    start = time.perf_counter()
    [completion] = loaded.engine.generate([prompt_ids], params, on_token=show)
    end = time.perf_counter()
    if streaming:
        sys.stdout.write("\n")
    else:
        out.result(
            {
                "model": label,
                "prompt": prompt,
                "text": completion.text,
                "tokens": completion.tokens,
                "logprobs": completion.logprobs,
                "finish_reason": completion.finish_reason,
                "threads": used_threads,
                # Prefill (prompt + first token) and decode speed, as llama.cpp and vLLM report them.
                "time_to_first_token_s": round(first_token_at[0] - start, 4),
                "decode_tokens_per_s": round((len(completion.tokens) - 1) / (end - first_token_at[0]), 2)
                if len(completion.tokens) > 1
                else None,
            }
        )


def _user_turns(interactive: bool):
    """User messages until an empty line or end of input; prompts `you> ` only for a person."""
    while True:
        try:
            user = input("you> ") if interactive else sys.stdin.readline()
        except EOFError:
            return
        if not interactive and not user:  # end of input
            return
        user = user.rstrip("\n")
        if not user.strip():
            return
        yield user


def chat(
    ctx: typer.Context,
    ckpt: CkptOption = "latest",
    system: Annotated[str | None, typer.Option("--system", help="System message.")] = None,
    max_new_tokens: MaxNew = 256,
    temperature: Temperature = 0.7,
    top_p: TopP = 0.9,
    stop: Stop = None,
    seed: Seed = None,
    threads: Threads = None,
    json_: JsonOption = False,
) -> None:
    """Chat with a model in the terminal, using its tokenizer's chat template. Empty line or Ctrl-D quits.

    With --json nothing is interactive: user turns come from stdin, one per line, up to an empty line.
    One JSON document with the whole transcript is printed at the end.
    Without --ckpt: the newest model in pipeline order (the last training stage that has one).

    [bold]Examples[/]
      llmctl chat --ckpt import:latest
      llmctl chat --ckpt sft:latest --system "You are terse." -t 0
      printf 'Hi!\\nWhat is 2+2?\\n' | llmctl chat --ckpt import:latest -t 0 --json
    """
    state = state_of(ctx)
    out = state.output(json_)
    loaded, label, _ = _load(ctx, out, ckpt, threads)
    params = _sampling(max_new_tokens, temperature, 0, top_p, 1.0, stop, seed, loaded.stop_token_ids())
    messages: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
    replies: list[dict[str, object]] = []
    streaming = not out.json_mode

    def show(event) -> None:
        if streaming:
            sys.stdout.write(event.text)
            sys.stdout.flush()

    for user in _user_turns(interactive=streaming):
        messages.append({"role": "user", "content": user})
        prompt_ids = loaded.tok.encode_chat(messages)
        if streaming:
            sys.stdout.write("model> ")
        [completion] = loaded.engine.generate([prompt_ids], params, on_token=show)
        if streaming:
            sys.stdout.write("\n")
        text = completion.text or ""
        messages.append({"role": "assistant", "content": text})
        replies.append(
            {"text": text, "tokens": len(completion.tokens), "finish_reason": completion.finish_reason}
        )
    if not streaming:
        out.result({"model": label, "messages": messages, "replies": replies})


def register(app: typer.Typer) -> None:
    app.command("import")(import_)
    app.command("generate")(generate)
    app.command("chat")(chat)
