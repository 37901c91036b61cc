"""llmctl eval vs lm-evaluation-harness: items/s on the same model and multiple-choice items, CPU.

    python benchmarks/bench_eval.py [--items 150] [--threads 2]

The model is a random test-1m model (built by tests/test_eval_lm_eval.make_model); the items are
world_mc (the synthetic world's multiple-choice questions), written as a JSONL task that both tools
read. Both runs use float32, the same thread count and batch size; the script checks the accuracies
agree and prints items/s for each and the speed-up.

Real-model HellaSwag on a machine with the data (not part of this offline benchmark):
    llmctl import <SmolLM2-135M GGUF or hub id>
    llmctl eval hellaswag --ckpt import:latest --limit 300 --data-dir <folder with hellaswag_val.jsonl>
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--items", type=int, default=150)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=16)
    args = ap.parse_args()

    import torch
    from test_eval_lm_eval import make_model

    from llmctl.data.synthetic import world_multiple_choice
    from llmctl.evals.evaluate import evaluate

    torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp())
    folder = make_model(tmp / "model", max_seq_len=512)
    rows = world_multiple_choice(0, args.items)
    data = tmp / "world.jsonl"
    data.write_text(
        "".join(
            json.dumps({"query": r["query"], "choices": [c[1:] for c in r["choices"]], "gold": r["gold"]})
            + "\n"
            for r in rows
        )
    )
    (tmp / "tasks").mkdir()
    (tmp / "tasks/world.yaml").write_text(
        f"task: bench_world\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: '{{query}}'\n"
        "doc_to_choice: '{{choices}}'\ndoc_to_target: gold\nmetric_list:\n  - metric: acc\n"
    )

    import lm_eval
    from lm_eval.tasks import TaskManager

    t0 = time.perf_counter()
    ref = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={folder},dtype=float32",
                                  tasks=["bench_world"], task_manager=TaskManager(include_path=str(tmp / "tasks")),
                                  batch_size=args.batch_size, device="cpu")  # fmt: skip
    t_ref = time.perf_counter() - t0
    custom = [{"name": "bench_world", "path": str(tmp / "ours.jsonl"), "type": "multiple_choice"}]
    (tmp / "ours.jsonl").write_text("".join(json.dumps({**r, "relation": None}) + "\n" for r in rows))
    t0 = time.perf_counter()
    ours = evaluate(folder, ["bench_world"], custom=custom, batch_size=args.batch_size, threads=args.threads)
    t_ours = time.perf_counter() - t0
    acc_ref = ref["results"]["bench_world"]["acc,none"]
    acc_ours = ours["tasks"]["bench_world"]["metrics"]["acc"]
    print(f"items: {args.items}, threads: {args.threads}, batch size: {args.batch_size}")
    print(f"lm-eval  {args.items / t_ref:8.1f} items/s  ({t_ref:.1f} s incl. model load)  acc {acc_ref:.4f}")
    print(
        f"llmctl   {args.items / t_ours:8.1f} items/s  ({t_ours:.1f} s incl. model load)  acc {acc_ours:.4f}"
    )
    print(
        f"speed-up {t_ref / t_ours:.2f}x; accuracies {'agree' if abs(acc_ref - acc_ours) < 1e-9 else 'DIFFER'}"
    )


if __name__ == "__main__":
    main()
