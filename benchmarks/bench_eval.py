"""llmctl eval vs lm-evaluation-harness on HellaSwag-shaped items: seconds, items/s, same scores.

    python benchmarks/bench_eval.py --model demo/workspace/artifacts/import/v0001 [--items 200]
    python benchmarks/bench_eval.py            # a random test-1m model (per-request overhead only)

Both tools score the same items with the same model folder in one process, in alternating rounds
(llmctl then lm-eval, then lm-eval then llmctl, ...) so that load from other processes hits both
alike: llmctl through `llmctl.evals.evaluate` (its defaults: packed shared contexts, batches of
`--batch-tokens`), lm-eval through `simple_evaluate(model="hf", batch_size=64)` (HFLM, float32)
with its official `hellaswag` task config pointed at the same local JSONL. Timings include model
loading for both. The table says whether the scores are identical (accuracies, the choice picked on
every item, per-item log-likelihoods to 1e-5 relative) and the largest per-item log-likelihood
difference (against lm-eval's logged samples).

HellaSwag itself cannot be downloaded offline, so the items are HellaSwag-schema rows (ctx_a, ctx_b,
activity_label, endings, label) cut from the synthetic corpus's sentences to HellaSwag's typical
token lengths under the model's own tokenizer: a context of 60-100 tokens and four endings of 20-30
tokens. The speed question is about token lengths and how much of each item is shared, not about
the text; the accuracies are meaningless (random labels).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))


def hellaswag_rows(folder: Path, n: int, seed: int = 0) -> list[dict]:
    """n HellaSwag-schema rows with contexts of 60-100 and endings of 20-30 tokens (model tokenizer)."""
    from llmctl.data.synthetic import iter_documents
    from llmctl.model.hf_tokenizer import load_folder_tokenizer

    tok = load_folder_tokenizer(folder).tokenizer
    sentences = [
        s.strip()
        for d in iter_documents(n_docs=400, seed=seed + 1)
        for s in re.split(r"(?<=[.!?])\s+", d["text"].replace("\n", " "))
        if len(s.split()) >= 4
    ]
    rnd = random.Random(seed)

    def n_tokens(text: str) -> int:
        return len(tok.encode(text, add_special_tokens=False).ids)

    def text_of(lo: int, hi: int) -> str:
        target = rnd.randint(lo, hi)
        words: list[str] = []
        while n_tokens(" ".join(words)) < target:
            words += rnd.choice(sentences).split()
        while n_tokens(" ".join(words)) > target:
            words.pop()
        return " ".join(words)

    rows = []
    for i in range(n):
        words = text_of(60, 100).split()
        cut = len(words) - rnd.randint(2, 6)  # ctx_b: the sentence's last few words, as in HellaSwag
        rows.append(
            {
                "ind": i,
                "activity_label": "Village life",
                "ctx_a": " ".join(words[:cut]),
                "ctx_b": " ".join(words[cut:]),
                "endings": [text_of(20, 30) for _ in range(4)],
                "label": str(rnd.randrange(4)),
                "split": "val",
            }
        )
    return rows


def lm_eval_task(tmp: Path, data: Path) -> Path:
    """A task folder whose `bench_hellaswag` is lm-eval's hellaswag config reading `data`."""
    import lm_eval

    official = Path(lm_eval.__file__).parent / "tasks" / "hellaswag" / "hellaswag.yaml"
    tasks = tmp / "tasks"
    tasks.mkdir()
    (tasks / "bench_hellaswag.yaml").write_text(
        f"include: {official}\ntask: bench_hellaswag\ntag: []\ndataset_path: json\ndataset_name: null\n"
        f"dataset_kwargs:\n  data_files:\n    validation: {data}\n"
        "training_split: null\nvalidation_split: validation\ntest_split: null\n"
    )
    return tasks


def run_llmctl(folder: Path, data_dir: Path, args) -> tuple[float, dict, list[list[float]]]:
    from llmctl.evals.evaluate import evaluate

    t0 = time.perf_counter()
    out = Path(tempfile.mkdtemp())
    res = evaluate(folder, ["hellaswag"], data_dir=data_dir, threads=args.threads, batch_tokens=args.batch_tokens,
                   samples_to_keep=None, out_dir=out)  # fmt: skip
    seconds = time.perf_counter() - t0
    samples = [json.loads(line) for line in (out / "samples/hellaswag.jsonl").read_text().splitlines()]
    return seconds, res["tasks"]["hellaswag"]["metrics"], [s["logprobs"] for s in samples]


def run_lm_eval(folder: Path, tasks: Path, args) -> tuple[float, dict, list[list[float]]]:
    import lm_eval
    import torch
    from lm_eval.tasks import TaskManager

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    ref = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={folder},dtype=float32",
                                  tasks=["bench_hellaswag"], task_manager=TaskManager(include_path=str(tasks)),
                                  batch_size=args.batch_size, device="cpu", log_samples=True)  # fmt: skip
    seconds = time.perf_counter() - t0
    r = ref["results"]["bench_hellaswag"]
    samples = sorted(ref["samples"]["bench_hellaswag"], key=lambda s: s["doc_id"])
    return (
        seconds,
        {"acc": r["acc,none"], "acc_norm": r["acc_norm,none"]},
        [[x[0][0] for x in s["resps"]] for s in samples],
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, help="an HF-Llama model folder (default: a random test-1m model)")
    ap.add_argument("--items", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--batch-size", type=int, default=64, help="lm-eval's batch size")
    ap.add_argument("--batch-tokens", type=int, default=None, help="llmctl's (default: its default)")
    args = ap.parse_args()

    from llmctl.evals.lm import DEFAULT_BATCH_TOKENS

    args.batch_tokens = args.batch_tokens or DEFAULT_BATCH_TOKENS
    tmp = Path(tempfile.mkdtemp())
    folder = args.model
    if folder is None:
        from test_eval_lm_eval import make_model

        folder = make_model(tmp / "model", max_seq_len=512)
    folder = folder.resolve()
    data_dir = tmp / "data"
    data_dir.mkdir()
    rows = hellaswag_rows(folder, args.items)
    data = data_dir / "hellaswag_val.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tasks = lm_eval_task(tmp, data)

    runs: dict[str, list[float]] = {"llmctl": [], "lm-eval": []}
    scores: dict[str, tuple[dict, list[list[float]]]] = {}
    for r in range(args.rounds):
        order = ["llmctl", "lm-eval"] if r % 2 == 0 else ["lm-eval", "llmctl"]
        for name in order:
            if name == "llmctl":
                seconds, metrics, lls = run_llmctl(folder, data_dir, args)
            else:
                seconds, metrics, lls = run_lm_eval(folder, tasks, args)
            runs[name].append(seconds)
            scores[name] = (metrics, lls)
            print(f"round {r + 1}: {name:8s} {seconds:7.1f} s", file=sys.stderr, flush=True)

    (m_ours, ll_ours), (m_ref, ll_ref) = scores["llmctl"], scores["lm-eval"]
    pairs = [(a, b) for x, y in zip(ll_ours, ll_ref, strict=True) for a, b in zip(x, y, strict=True)]
    diff = max(abs(a - b) for a, b in pairs)
    rel = max(abs(a - b) / max(abs(b), 1e-9) for a, b in pairs)
    # fp32 sums of ~25 token log-probs from two implementations differ in the last bits; "identical"
    # means the same accuracies, the same choice picked on every item, and log-likelihoods to 1e-5.
    picks = all(x.index(max(x)) == y.index(max(y)) for x, y in zip(ll_ours, ll_ref, strict=True))
    same = m_ours["acc"] == m_ref["acc"] and m_ours["acc_norm"] == m_ref["acc_norm"] and picks and rel < 1e-5
    print(f"model: {folder}\nitems: {args.items} HellaSwag-shaped, threads: {args.threads}, "
          f"lm-eval batch size: {args.batch_size}, llmctl batch tokens: {args.batch_tokens}")  # fmt: skip
    print(
        f"{'round':>5}  {'llmctl s':>9}  {'lm-eval s':>9}  {'llmctl it/s':>11}  {'lm-eval it/s':>12}  speed-up"
    )
    for r, (a, b) in enumerate(zip(runs["llmctl"], runs["lm-eval"], strict=True), 1):
        print(f"{r:>5}  {a:9.1f}  {b:9.1f}  {args.items / a:11.2f}  {args.items / b:12.2f}  {b / a:7.2f}x")
    a, b = sum(runs["llmctl"]), sum(runs["lm-eval"])
    print(f"{'all':>5}  {a:9.1f}  {b:9.1f}  {args.items * args.rounds / a:11.2f}  "
          f"{args.items * args.rounds / b:12.2f}  {b / a:7.2f}x")  # fmt: skip
    print(f"identical scores: {'yes' if same else 'NO'} (llmctl acc {m_ours['acc']:.4f} acc_norm "
          f"{m_ours['acc_norm']:.4f}; lm-eval acc {m_ref['acc']:.4f} acc_norm {m_ref['acc_norm']:.4f}; "
          f"same pick on every item: {'yes' if picks else 'NO'}; per-item log-likelihoods differ by at most "
          f"{diff:.1e} absolute, {rel:.1e} relative)")  # fmt: skip


if __name__ == "__main__":
    main()
