"""Run tasks on a model and write results: the library behind `llmctl eval` (and scripts).

    results = evaluate("path/to/model", ["arc_easy", "mmlu"], data_dir=Path("bench"), limit=100,
                       out_dir=Path("out"))      # writes out/results.json and out/samples/<task>.jsonl
    results["tasks"]["arc_easy"]["metrics"]["acc"]
    flat_metrics(results)                        # {"arc_easy/acc": 0.71, ...} for the manifest
    compare([eval_dir_a, eval_dir_b])            # scores side by side, deltas vs the first
    check_thresholds(results, {"arc_easy": 0.5}) # ["arc_easy/acc = 0.41 < 0.5"]

Chat tasks (world_chat, custom `type: chat`; llmctl/evals/chat.py) also score `base`, the model the
evaluated one was fine-tuned from, asked with the same prompts: `base_<metric>` beside each metric, and
`vs_base`, the paired difference per metric with its standard error.

With a `Decontaminator` (llmctl/evals/decontaminate.py: the item is in the model's training documents,
by 13-gram overlap), each task also gets `decontamination`: `contaminated` and `clean_n` (items found
and not found; `unchecked`, too short to check, count as clean) and every per-item metric on the clean
subset with its standard error; flat_metrics adds `task/contaminated`, `task/clean_n` and
`task/clean/<metric>`.

Standard errors are lm-eval's: the sample standard deviation of per-item scores over sqrt(n), which
for accuracies is sqrt(p(1-p)/(n-1)); groups (MMLU categories and the MMLU total) pool their items
(lm-eval weights subjects by size, i.e. the same micro average).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llmctl.errors import InputError
from llmctl.evals import data as evdata
from llmctl.evals import tasks as T
from llmctl.evals.chat import ChatPrompts, run_chat
from llmctl.evals.decontaminate import MIN_WORDS, NGRAM, Decontaminator
from llmctl.evals.lm import DEFAULT_BATCH_TOKENS, EvalLM, LogLik, set_threads
from llmctl.reporting import Reporter

RESULTS_FILE = "results.json"
RESULTS_VERSION = 1
LOWER_IS_BETTER = {"loss", "ppl", "perplexity", "bits_per_byte"}
PRIMARY_METRIC = {
    "multiple_choice": "acc",
    "loglikelihood": "acc",
    "generate": "exact_match_strict",
    "perplexity": "bits_per_byte",
    "chat": "exact_match",
}
DEFAULT_CHAT_MAX_GEN_TOKENS = 32


def stderr_of(values: Sequence[float]) -> float | None:
    """lm-eval's mean_stderr: sample stddev (ddof 1) / sqrt(n); None below two items."""
    n = len(values)
    if n < 2:
        return None
    return float(np.std(values, ddof=1) / math.sqrt(n))


def clean_summary(per: dict[str, list[float]], flags: Sequence[bool | None]) -> dict[str, Any]:
    """A task's decontamination entry: counts, and each per-item metric on the clean subset (items not
    found in the training documents, those too short to check included) with its standard error."""
    clean = [i for i, f in enumerate(flags) if not f]
    return {
        "contaminated": sum(1 for f in flags if f),
        "clean_n": len(clean),
        "unchecked": sum(1 for f in flags if f is None),
        "metrics": {m: float(np.mean([v[i] for i in clean])) if clean else None for m, v in per.items()},
        "stderr": {m: stderr_of([v[i] for i in clean]) for m, v in per.items()},
    }


def _summary(per_item: dict[str, list[float]]) -> dict[str, Any]:
    return {
        "n": len(next(iter(per_item.values()))) if per_item else 0,
        "metrics": {k: float(np.mean(v)) for k, v in per_item.items()},
        "stderr": {k: stderr_of(v) for k, v in per_item.items()},
    }


# ---- building items -------------------------------------------------------------------------------


def _world_seed(project_dir: Path | None, world_seed: int | None) -> int:
    if world_seed is not None:
        return world_seed
    truth = project_dir / "data" / "truth.json" if project_dir is not None else None
    if truth is not None and truth.is_file():
        return int(json.loads(truth.read_text())["seed"])
    return 0


def world_chat_file(data_dir: Path | None, project_dir: Path | None) -> Path | None:
    """The rows of world_chat: a --data-dir file, else the project's data/chat_eval.jsonl (written by
    `llmctl init` with the tiny template), else None (rows made from the world seed)."""
    from llmctl.data.synthetic_chat import CHAT_EVAL_FILE

    if data_dir is not None and data_dir.is_file():
        return data_dir
    path = project_dir / "data" / CHAT_EVAL_FILE if project_dir is not None else None
    return path if path is not None and path.is_file() else None


def build_task_items(
    task: str,
    *,
    shots: int,
    seed: int,
    data_dir: Path | None,
    custom: dict[str, Any],
    project_dir: Path | None = None,
    world_seed: int | None = None,
    world_items: int = 150,
) -> list[T.Item]:
    """The items of one task (built-in, world_mc, world_chat or custom)."""
    if task in custom:
        spec = custom[task]
        path = Path(spec["path"])
        if not path.is_absolute() and project_dir is not None:
            path = project_dir / path
        if not path.is_file():
            raise InputError(
                f"custom task {task}: {path} not found", hint="fix eval.custom[].path in llmctl.yaml"
            )
        rows = evdata.read_rows(path)
        if spec["type"] == "multiple_choice":
            return T.build_custom_mc(rows, str(path))
        if spec["type"] == "chat":
            return T.build_chat(rows, str(path))
        return T.build_custom_generative(rows, str(path), tuple(spec.get("until", ["\n"])))
    T.check_shots(task, shots)
    if task == "world_mc":
        from llmctl.data.synthetic import world_multiple_choice

        rows = world_multiple_choice(_world_seed(project_dir, world_seed), world_items)
        return T.build_custom_mc([{**r, "group": r["relation"]} for r in rows], "world_mc")
    if task == "world_chat":
        path = world_chat_file(data_dir, project_dir)
        if path is not None:
            return T.build_chat(evdata.read_rows(path), str(path))
        from llmctl.data.synthetic import World
        from llmctl.data.synthetic_chat import eval_rows, heldout_facts

        seed = _world_seed(project_dir, world_seed)
        world = World.build(seed)
        return T.build_chat(eval_rows(world, heldout_facts(world, seed)), f"world_chat (world seed {seed})")
    spec = T.TASKS[task]
    assert spec.split is not None
    rows = evdata.load_split(spec.data or task, spec.split, data_dir)
    if task == "mmlu":
        dev = evdata.load_split("mmlu", "dev", data_dir) if shots else []
        return T.build_mmlu(rows, dev, shots)
    if task == "gsm8k":
        train = evdata.load_split("gsm8k", "train", data_dir) if shots else []
        return T.build_gsm8k(rows, train, shots, seed)
    builders = {
        "hellaswag": T.build_hellaswag,
        "arc_easy": T.build_arc,
        "arc_challenge": T.build_arc,
        "piqa": T.build_piqa,
        "winogrande": T.build_winogrande,
        "lambada": T.build_lambada,
    }
    return builders[task](rows)


# ---- scoring ------------------------------------------------------------------------------------


def score_multiple_choice(
    items: list[T.Item], lls: list[LogLik], acc_norm: bool
) -> tuple[dict[str, list[float]], list[dict[str, Any]]]:
    """Per-item acc (and acc_norm) from flat log-likelihoods (one per request, items in order)."""
    per: dict[str, list[float]] = {"acc": []}
    if acc_norm:
        per["acc_norm"] = []
    details = []
    k = 0
    for item in items:
        n = len(item.requests)
        scores = np.array([ll.logprob for ll in lls[k : k + n]])
        k += n
        pred = int(np.argmax(scores))
        per["acc"].append(float(pred == item.gold))
        d: dict[str, Any] = {"logprobs": scores.tolist(), "pred": pred, "gold": item.gold}
        if acc_norm:
            pred_norm = int(np.argmax(scores / np.array(item.choice_lengths, dtype=float)))
            per["acc_norm"].append(float(pred_norm == item.gold))
            d["pred_norm"] = pred_norm
        details.append(d)
    return per, details


def _groups(items: list[T.Item], per: dict[str, list[float]], task: str) -> dict[str, Any]:
    groups: dict[str, list[int]] = {}
    for i, item in enumerate(items):
        if item.group is None:
            continue
        groups.setdefault(item.group, []).append(i)
        if task == "mmlu":
            groups.setdefault(T.MMLU_SUBJECTS[item.group], []).append(i)
    return {
        g: _summary({m: [v[i] for i in idx] for m, v in per.items()}) for g, idx in sorted(groups.items())
    }


def perplexity_on_tokens(
    lm: EvalLM, tokens_dir: Path, *, batch_size: int, limit: int | None, reporter: Reporter
) -> dict[str, float]:
    """Loss, perplexity and bits per byte on a tokens artifact's val split (sequential windows of the
    model's context). Bits per byte counts only tokens that stand for text (special tokens like BOS
    have no bytes and are left out of both sums, as nanochat does)."""
    from llmctl.data.loader import val_batches
    from llmctl.data.shards import TOKENIZER_DIR, VAL_DIR
    from llmctl.data.tokenizer import load_tokenizer, tokenizer_file_id

    tok = load_tokenizer(tokens_dir / TOKENIZER_DIR)
    model_tok = Path(lm.name) / "tokenizer.json"
    if model_tok.is_file() and (model_id := tokenizer_file_id(model_tok)) != tok.tokenizer_id:
        raise InputError(
            f"the model's tokenizer ({model_id}) is not the tokens artifact's ({tok.tokenizer_id}): "
            "perplexity needs text encoded by the model's own tokenizer",
            hint="pass the tokens artifact the model was trained on (llmctl eval perplexity --data tokenize:vN), "
            "or a text file (--data-dir notes.txt)",
        )
    if tok.vocab_size > lm.model.config.vocab_size:
        raise InputError(
            f"the tokens artifact's vocabulary ({tok.vocab_size}) is larger than the model's "
            f"({lm.model.config.vocab_size}): they were not made together",
            hint="evaluate perplexity with the tokens artifact the model was trained on (--data tokenize:vN)",
        )
    nbytes = torch.tensor([len(tok.token_bytes(i)) for i in range(tok.vocab_size)], dtype=torch.float64)
    for i in tok.special_tokens.values():
        nbytes[i] = 0
    seq_len = lm.max_length
    bs = max(1, min(batch_size, 8))
    loss_sum, n_tokens, text_loss, text_bytes = 0.0, 0, 0.0, 0.0
    batches = list(val_batches(tokens_dir / VAL_DIR, batch_size=bs, seq_len=seq_len, max_batches=limit))
    with reporter.progress("perplexity", total=len(batches) * bs * seq_len, unit="tok") as bar:
        for x, y in batches:
            losses = lm.token_losses(x, y).double().cpu()  # (B, T)
            b = nbytes[y]
            loss_sum += float(losses.sum())
            n_tokens += y.numel()
            text_loss += float((losses * (b > 0)).sum())
            text_bytes += float(b.sum())
            bar.advance(y.numel())
    loss = loss_sum / n_tokens
    return {
        "loss": loss,
        "ppl": math.exp(loss),
        "bits_per_byte": text_loss / (math.log(2) * text_bytes) if text_bytes else float("nan"),
        "tokens": float(n_tokens),
    }


def perplexity_on_text(lm: EvalLM, path: Path, *, batch_size: int, limit: int | None) -> dict[str, float]:
    """Loss, perplexity and bits per byte of a UTF-8 text file encoded with the model's tokenizer,
    in non-overlapping windows of the model's context."""
    text = path.read_text(encoding="utf-8")
    ids = lm.encode(text)
    T_ = lm.max_length
    n_windows = max(1, (len(ids) - 1 + T_ - 1) // T_)
    if limit is not None:
        n_windows = min(n_windows, limit)
    loss_sum, n = 0.0, 0
    for w in range(0, n_windows, batch_size):
        xs, ys = [], []
        for j in range(w, min(w + batch_size, n_windows)):
            chunk = ids[j * T_ : j * T_ + T_ + 1]
            if len(chunk) < 2:
                continue
            x = chunk[:-1] + [0] * (T_ - len(chunk) + 1)
            y = chunk[1:] + [-100] * (T_ - len(chunk) + 1)
            xs.append(x)
            ys.append(y)
        if not xs:
            break
        y = torch.tensor(ys)
        losses = lm.token_losses(torch.tensor(xs), y)
        loss_sum += float(losses.sum())
        n += int((y != -100).sum())
    if n == 0:
        raise InputError(f"{path}: too little text to measure perplexity")
    scored_bytes = len(lm.decode(ids[1 : n + 1]).encode("utf-8")) if limit else len(text.encode("utf-8"))
    loss = loss_sum / n
    return {
        "loss": loss,
        "ppl": math.exp(loss),
        "bits_per_byte": loss_sum / (math.log(2) * scored_bytes),
        "tokens": float(n),
    }


# ---- the entry point -----------------------------------------------------------------------------


def evaluate(
    model: str | Path | EvalLM,
    tasks: Sequence[str],
    *,
    limit: int | None = None,
    shots: dict[str, int] | None = None,
    batch_size: int = 16,
    batch_tokens: int = DEFAULT_BATCH_TOKENS,
    data_dir: Path | None = None,
    custom: Sequence[dict[str, Any]] = (),
    samples_to_keep: int | None = 20,
    seed: int = T.LM_EVAL_FEWSHOT_SEED,
    max_gen_tokens: int = 256,
    chat_max_gen_tokens: int = DEFAULT_CHAT_MAX_GEN_TOKENS,
    base: str | Path | EvalLM | None = None,
    base_name: str | None = None,
    perplexity_data: Path | None = None,
    project_dir: Path | None = None,
    world_seed: int | None = None,
    world_items: int = 150,
    out_dir: Path | None = None,
    threads: int | None = None,
    reporter: Reporter | None = None,
    decontaminator: Decontaminator | None = None,
) -> dict[str, Any]:
    """Score `model` (a model folder or an EvalLM) on `tasks`; write results.json and samples/ to
    out_dir when given (the first `samples_to_keep` items per task; None: all, lm-eval's
    --log_samples). `perplexity_data` is a tokens artifact folder or a text file. `base` (a model
    folder or EvalLM, named `base_name` in the results) is scored beside `model` on chat tasks.
    `decontaminator` checks every item against the model's training documents (see above)."""
    reporter = reporter or Reporter()
    shots = dict(shots or {})
    custom_map = {c["name"]: dict(c) for c in custom}
    unknown = [t for t in tasks if t not in T.TASKS and t not in custom_map]
    if unknown:
        raise InputError(
            f"unknown eval task(s): {', '.join(unknown)}",
            hint=f"built-in tasks: {', '.join(T.TASKS)}; or declare it under eval.custom in llmctl.yaml",
        )
    if not tasks:
        raise InputError(
            "no eval tasks given", hint="name tasks (e.g. `llmctl eval arc_easy`) or set eval.tasks"
        )
    n_threads = set_threads(threads)
    lm = model if isinstance(model, EvalLM) else EvalLM.from_folder(model)
    results: dict[str, Any] = {
        "version": RESULTS_VERSION,
        "model": lm.name,
        "prompt_version": T.PROMPT_VERSION,
        "decoding": {
            "generation": "greedy",
            "max_gen_tokens": max_gen_tokens,
            "chat_max_gen_tokens": chat_max_gen_tokens,
            "dtype": str(next(lm.model.parameters()).dtype),
        },
        "settings": {
            "limit": limit,
            "batch_size": batch_size,
            "batch_tokens": batch_tokens,
            "seed": seed,
            "threads": n_threads,
        },
        "tasks": {},
    }
    if decontaminator is not None:
        results["decontamination"] = {
            "corpora": [c.name for c in decontaminator.corpora],
            "ngram": NGRAM,
            "min_words": MIN_WORDS,
            "indexes": decontaminator.indexes,  # filled as tasks need them
        }
    samples: dict[str, list[dict[str, Any]]] = {}
    base_lm: EvalLM | None = None
    prompts: ChatPrompts | None = None
    for task in tasks:
        t0 = time.perf_counter()
        spec = T.TASKS.get(task)
        if task in custom_map:
            kind = {"generative": "generate"}.get(custom_map[task]["type"], custom_map[task]["type"])
        else:
            assert spec is not None
            kind = spec.kind
        if kind == "perplexity":
            if perplexity_data is None:
                raise InputError(
                    "perplexity needs a tokens artifact or a text file",
                    hint="run `llmctl tokenize` first, or pass --data-dir with a text file",
                )
            if perplexity_data.is_dir():
                metrics = perplexity_on_tokens(
                    lm, perplexity_data, batch_size=batch_size, limit=limit, reporter=reporter
                )
            else:
                metrics = perplexity_on_text(lm, perplexity_data, batch_size=batch_size, limit=limit)
            n_tok = int(metrics.pop("tokens"))
            results["tasks"][task] = {
                "kind": kind,
                "n": n_tok,
                "unit": "tokens",
                "shots": 0,
                "metrics": metrics,
                "stderr": {},
                "source": str(perplexity_data),
                "seconds": round(time.perf_counter() - t0, 3),
            }
            reporter.log(f"{task}: ppl {metrics['ppl']:.3f}, {metrics['bits_per_byte']:.4f} bits/byte")
            continue
        k = shots.get(task, spec.default_shots if spec else 0)
        items = build_task_items(
            task,
            shots=k,
            seed=seed,
            data_dir=data_dir,
            custom=custom_map,
            project_dir=project_dir,
            world_seed=world_seed,
            world_items=world_items,
        )
        if limit is not None:
            items = items[:limit]
        if kind == "chat" and task == "world_chat":
            source = world_chat_file(data_dir, project_dir)
            reporter.log(f"world_chat: {source or 'rows made from the world seed (no data/chat_eval.jsonl)'}")
        task_samples: list[dict[str, Any]] = []
        with reporter.progress(task, total=len(items), unit="items") as bar:
            if kind in ("multiple_choice", "loglikelihood"):
                requests = [r for item in items for r in item.requests]
                sizes = [len(item.requests) for item in items]
                # The bar counts items; the engine reports requests, so scale by requests per item.
                ratio = len(items) / max(1, len(requests))
                lls = lm.loglikelihood(requests, batch_tokens=batch_tokens, progress=_Scaled(bar, ratio))
                if kind == "multiple_choice":
                    per, details = score_multiple_choice(items, lls, acc_norm=bool(spec and spec.acc_norm))
                else:
                    per = {"acc": [float(ll.is_greedy) for ll in lls]}
                    details = [{"logprob": ll.logprob, "is_greedy": ll.is_greedy} for ll in lls]
                assert sum(sizes) == len(lls)
                for item, d in list(zip(items, details, strict=True))[:samples_to_keep]:
                    task_samples.append(
                        {
                            "context": item.requests[0][0],
                            "continuations": [c for _, c in item.requests],
                            **(
                                {"contexts": [c for c, _ in item.requests]}
                                if len({c for c, _ in item.requests}) > 1
                                else {}
                            ),
                            **d,
                        }
                    )
            elif kind == "chat":
                if prompts is None:
                    prompts = ChatPrompts.of(lm.folder_tokenizer)
                    for note in prompts.notes:
                        reporter.log(note)
                per, details = run_chat(
                    lm,
                    items,
                    prompts,
                    max_gen_tokens=chat_max_gen_tokens,
                    batch_size=batch_size,
                    progress=bar,
                )
            else:
                responses = lm.generate_until(
                    [it.prompt or "" for it in items],
                    until=items[0].until if items else (),
                    max_gen_tokens=max_gen_tokens,
                    batch_size=batch_size,
                    progress=bar,
                )
                per = {}
                for item, resp in zip(items, responses, strict=True):
                    for m, v in T.score_generation(item, resp).items():
                        per.setdefault(m, []).append(v)
                for item, resp in list(zip(items, responses, strict=True))[:samples_to_keep]:
                    task_samples.append(
                        {
                            "prompt": item.prompt,
                            "response": resp,
                            "answer": item.answer,
                            **T.score_generation(item, resp),
                        }
                    )
        if not items:
            raise InputError(f"{task}: no items to score")
        vs_base = None
        if kind == "chat":
            assert prompts is not None
            if base is not None:
                if base_lm is None:
                    base_lm = base if isinstance(base, EvalLM) else EvalLM.from_folder(base)
                    base_lm.name = base_name or base_lm.name
                    results["base_model"] = base_lm.name
                base_per, base_details = _run_base(
                    base_lm, items, prompts, task, chat_max_gen_tokens, batch_size, reporter
                )
                vs_base = {m: _paired(per[m], base_per[m]) for m in base_per}
                per.update({f"base_{m}": v for m, v in base_per.items()})
                details = [{**d, **b} for d, b in zip(details, base_details, strict=True)]
            for item, d in list(zip(items, details, strict=True))[:samples_to_keep]:
                task_samples.append(_chat_sample(item, d))
        seconds = time.perf_counter() - t0
        entry = {
            "kind": kind,
            "shots": k,
            **_summary(per),
            "seconds": round(seconds, 3),
            "items_per_s": round(len(items) / seconds, 2) if seconds else None,
        }
        if kind == "loglikelihood":  # lambada: lm-eval's perplexity aggregation, exp(-mean logprob)
            entry["metrics"]["perplexity"] = math.exp(-float(np.mean([ll.logprob for ll in lls])))
        if vs_base is not None:
            entry["vs_base"] = vs_base
        if decontaminator is not None:
            flags = decontaminator.check(items)
            entry["decontamination"] = clean_summary(per, flags)
            for row, flag in zip(task_samples, flags, strict=False):
                row["contaminated"] = flag
            d = entry["decontamination"]
            reporter.log(
                f"{task}: {d['contaminated']} of {len(items)} items in the training documents "
                f"({d['unchecked']} too short to check)"
            )
        groups = _groups(items, per, task)
        if groups:
            entry["groups"] = groups
        results["tasks"][task] = entry
        samples[task] = task_samples
        shown = ", ".join(f"{m} {v:.4f}" for m, v in entry["metrics"].items())
        reporter.log(f"{task}: {shown} ({len(items)} items, {len(items) / seconds:.1f} items/s)")
    if out_dir is not None:
        write_results(results, samples, out_dir)
    return results


def _run_base(
    base_lm: EvalLM,
    items: list[T.Item],
    prompts: ChatPrompts,
    task: str,
    max_gen_tokens: int,
    batch_size: int,
    reporter: Reporter,
) -> tuple[dict[str, list[float]], list[dict[str, Any]]]:
    """The base model asked exactly as the evaluated one: its prompts rendered with the same template."""
    base_prompts = ChatPrompts.of(base_lm.folder_tokenizer, prompts.template, whose="the evaluated model's")
    for note in base_prompts.notes:
        reporter.log(f"base model: {note}")
    with reporter.progress(f"{task} (base)", total=len(items), unit="items") as bar:
        per, details = run_chat(
            base_lm, items, base_prompts, max_gen_tokens=max_gen_tokens, batch_size=batch_size, progress=bar
        )
    return per, [
        {f"base_{k}": v for k, v in d.items() if k != "rendered" or v != prompts.render(item)}
        for item, d in zip(items, details, strict=True)
    ]


def _paired(values: list[float], base_values: list[float]) -> dict[str, float | None]:
    """Mean of the per-item differences from the base model, and its standard error (the paired
    test: items both models get right or wrong cancel out, so it is tighter than either stderr)."""
    diff = [a - b for a, b in zip(values, base_values, strict=True)]
    return {"delta": float(np.mean(diff)), "stderr": stderr_of(diff)}


def _chat_sample(item: T.Item, details: dict[str, Any]) -> dict[str, Any]:
    answers = {"answer": item.answer} if len(item.answers) <= 1 else {"answers": list(item.answers)}
    system = {"system": item.system} if item.system is not None else {}
    return {**system, "prompt": item.prompt, **answers, **item.extra, **details}


class _Scaled:
    """Advance a progress bar by a fixed fraction of each step (requests -> items)."""

    def __init__(self, bar, ratio: float):
        self.bar, self.ratio = bar, ratio

    def advance(self, n: float = 1, **fields: Any) -> None:
        self.bar.advance(n * self.ratio, **fields)


def write_results(results: dict[str, Any], samples: dict[str, list[dict[str, Any]]], out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / RESULTS_FILE).write_text(json.dumps(results, indent=2) + "\n")
    if samples:
        (out_dir / "samples").mkdir(exist_ok=True)
        for task, rows in samples.items():
            with open(out_dir / "samples" / f"{task}.jsonl", "w", encoding="utf-8") as f:
                for row in rows:
                    f.write(json.dumps(row, ensure_ascii=False) + "\n")


# ---- results: flatten, compare, gates ------------------------------------------------------------


def flat_metrics(results: dict[str, Any]) -> dict[str, float]:
    """{"task/metric": value} plus {"task/group/metric": value} for MMLU categories and other groups
    (not the 57 MMLU subjects), and with decontamination task/contaminated, task/clean_n and
    task/clean/metric."""
    flat: dict[str, float] = {}
    for task, entry in results["tasks"].items():
        for m, v in entry["metrics"].items():
            flat[f"{task}/{m}"] = v
        if "decontamination" in entry:
            d = entry["decontamination"]
            flat[f"{task}/contaminated"] = float(d["contaminated"])
            flat[f"{task}/clean_n"] = float(d["clean_n"])
            flat.update({f"{task}/clean/{m}": v for m, v in d["metrics"].items() if v is not None})
        for g, sub in entry.get("groups", {}).items():
            if task == "mmlu" and g in T.MMLU_SUBJECTS:
                continue
            for m, v in sub["metrics"].items():
                flat[f"{task}/{g}/{m}"] = v
    return flat


def load_results(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / RESULTS_FILE
    if not path.is_file():
        raise InputError(f"{folder}: no {RESULTS_FILE}; not an eval artifact", hint="run `llmctl eval` first")
    return json.loads(path.read_text())


def compare(artifacts: Sequence[Any]) -> dict[str, Any]:
    """Scores of several eval artifacts (Artifact objects or folders) side by side:

        {"evals": [{"eval": label, "model": the model id it scored}, ...],
         "rows": [{"metric": "task/metric", "values": {label: value}, "delta": {label: value - first}}]}

    one row per task/metric present in any of them (missing values, and their deltas, are None);
    deltas are against the first eval, for every later one."""
    evals: list[dict[str, Any]] = []
    columns: list[tuple[str, dict[str, float]]] = []
    for a in artifacts:
        path = getattr(a, "path", a)
        label = getattr(a, "id", str(path))
        results = load_results(path)
        evals.append({"eval": label, "model": results.get("model")})
        columns.append((label, flat_metrics(results)))
    keys = sorted({k for _, flat in columns for k in flat})
    first = columns[0][1] if columns else {}
    rows = []
    for k in keys:
        base = first.get(k)
        values = {label: flat.get(k) for label, flat in columns}
        delta = {
            label: None if base is None or flat.get(k) is None else flat[k] - base
            for label, flat in columns[1:]
        }
        rows.append({"metric": k, "values": values, "delta": delta})
    return {"evals": evals, "rows": rows}


def _primary(results: dict[str, Any], task: str) -> str:
    entry = results["tasks"][task]
    metric = PRIMARY_METRIC[entry["kind"]]
    if metric not in entry["metrics"]:
        metric = next(iter(entry["metrics"]))
    return metric


def check_thresholds(results: dict[str, Any], minimums: dict[str, float]) -> list[str]:
    """Failed gates, one line each. Keys are "task/metric", "task/group/metric" or "task" (its main
    metric: acc, exact_match_*, bits_per_byte). Lower-is-better metrics (loss, ppl, bits_per_byte)
    fail when above the value."""
    flat = flat_metrics(results)
    failures = []
    for key, threshold in minimums.items():
        if "/" not in key and key in results["tasks"]:
            key = f"{key}/{_primary(results, key)}"
        if key not in flat:
            raise InputError(
                f"--min {key}: no such score in these results", hint=f"scores: {', '.join(sorted(flat))}"
            )
        value = flat[key]
        if key.rsplit("/", 1)[-1] in LOWER_IS_BETTER:
            if not value <= threshold:
                failures.append(f"{key} = {value:.4f} > {threshold} (lower is better)")
        elif not value >= threshold:
            failures.append(f"{key} = {value:.4f} < {threshold}")
    return failures
