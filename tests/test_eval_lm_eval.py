"""llmctl eval against lm-evaluation-harness on the same model and items: per-item log-likelihoods
(1e-4), accuracies (exact) and generations.

A random-weight `test-1m` model with a real byte-level BPE is saved as an HF Llama folder; lm-eval
loads it with `transformers` (model="hf") and reads the fixture files through task YAMLs that
`include` lm-eval's official task configs and only swap the dataset for local JSONL files.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch

FIXTURES = Path(__file__).parent / "fixtures" / "eval"
lm_eval = pytest.importorskip("lm_eval")
LM_TASKS = Path(lm_eval.__file__).parent / "tasks"


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def make_model(folder: Path, max_seq_len: int = 1024) -> Path:
    """A random test-1m model with a BPE trained on synthetic text plus the fixtures."""
    from llmctl.data.synthetic import iter_documents
    from llmctl.data.tokenizer import train_tokenizer
    from llmctl.model.checkpoint import save_model_folder
    from llmctl.model.config import preset
    from llmctl.model.transformer import Transformer

    texts = [d["text"] for d in iter_documents(n_docs=200, seed=0)]
    texts += [p.read_text() for p in sorted(FIXTURES.rglob("*.json*"))]
    tok = train_tokenizer(texts, vocab_size=1024)
    torch.manual_seed(0)
    model = Transformer(preset("test-1m", vocab_size=tok.vocab_size, max_seq_len=max_seq_len))
    save_model_folder(model, folder, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id)
    tok.save(folder, model_max_length=max_seq_len)
    return folder


def _yaml(path: Path, include: Path, task: str, files: dict[str, Path], **extra) -> None:
    splits = {"training_split": None, "validation_split": None, "test_split": None}
    splits.update(extra.pop("splits"))
    lines = [
        f"include: {include}",
        f"task: {task}",
        "tag: []",
        "dataset_path: json",
        "dataset_name: null",
        "dataset_kwargs:",
        "  data_files:",
        *[f"    {k}: {v}" for k, v in files.items()],
        *[f"{k}: {'null' if v is None else v}" for k, v in splits.items()],
        *[f"{k}: {json.dumps(v)}" for k, v in extra.items()],
    ]
    path.write_text("\n".join(lines) + "\n")


def lm_eval_tasks(tmp: Path) -> dict[str, str]:
    """Write task YAMLs (and hub-schema copies of original-layout fixtures); llmctl task -> lm-eval task."""
    d = tmp.parent / "data"
    d.mkdir()
    mmlu: dict[str, dict[str, list[dict]]] = {}
    for split in ("test", "dev"):
        for f in sorted((FIXTURES / "mmlu" / split).glob("*.csv")):
            subject = f.name.rsplit("_", 1)[0]
            rows = [
                {"question": r[0], "subject": subject, "choices": r[1:5], "answer": "ABCD".index(r[5])}
                for r in csv.reader(f.open())
            ]
            mmlu.setdefault(subject, {})[split] = rows
    names = {}
    for subject, splits in mmlu.items():
        files = {s: _jsonl(d / f"mmlu_{subject}_{s}.jsonl", rows) for s, rows in splits.items()}
        _yaml(
            tmp / f"t_mmlu_{subject}.yaml",
            LM_TASKS / "mmlu/default/_default_template_yaml",
            f"t_mmlu_{subject}",
            files,
            splits={"test_split": "test"},
            description=f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n",
            num_fewshot=1,
        )
        names[f"mmlu:{subject}"] = f"t_mmlu_{subject}"
    piqa_rows = [json.loads(line) for line in (FIXTURES / "piqa/valid.jsonl").read_text().splitlines()]
    labels = (FIXTURES / "piqa/valid-labels.lst").read_text().split()
    piqa = _jsonl(d / "piqa.jsonl", [{**r, "label": int(x)} for r, x in zip(piqa_rows, labels, strict=True)])
    simple = {
        "hellaswag": ("hellaswag/hellaswag.yaml", FIXTURES / "hellaswag/hellaswag_val.jsonl", "validation"),
        "arc_easy": ("arc/arc_easy.yaml", FIXTURES / "arc/ARC-Easy/ARC-Easy-Test.jsonl", "test"),
        "arc_challenge": (
            "arc/arc_easy.yaml",
            FIXTURES / "arc/ARC-Challenge/ARC-Challenge-Test.jsonl",
            "test",
        ),
        "piqa": ("piqa/piqa.yaml", piqa, "validation"),
        "winogrande": ("winogrande/default.yaml", FIXTURES / "winogrande/dev.jsonl", "validation"),
        "lambada": ("lambada/lambada_openai.yaml", FIXTURES / "lambada/lambada_test.jsonl", "test"),
    }
    for name, (include, path, split) in simple.items():
        _yaml(
            tmp / f"t_{name}.yaml",
            LM_TASKS / include,
            f"t_{name}",
            {split: path},
            splits={f"{split}_split": split},
        )
        names[name] = f"t_{name}"
    _yaml(
        tmp / "t_gsm8k.yaml",
        LM_TASKS / "gsm8k/gsm8k.yaml",
        "t_gsm8k",
        {"test": FIXTURES / "gsm8k/test.jsonl", "train": FIXTURES / "gsm8k/train.jsonl"},
        splits={"test_split": "test", "training_split": "train"},
        num_fewshot=2,
        generation_kwargs={
            "until": ["Question:", "</s>", "<|im_end|>"],
            "do_sample": False,
            "max_gen_toks": 16,
        },
    )
    names["gsm8k"] = "t_gsm8k"
    return names


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    from lm_eval.tasks import TaskManager

    from llmctl.evals.evaluate import evaluate

    tmp = tmp_path_factory.mktemp("lm_eval")
    folder = make_model(tmp / "model")
    (tmp / "tasks").mkdir()
    names = lm_eval_tasks(tmp / "tasks")
    ref = lm_eval.simple_evaluate(
        model="hf",
        model_args=f"pretrained={folder},dtype=float32",
        tasks=sorted(set(names.values())),
        task_manager=TaskManager(include_path=str(tmp / "tasks")),
        log_samples=True,
        batch_size=4,
        device="cpu",
    )
    ours = evaluate(
        folder,
        ["mmlu", "hellaswag", "arc_easy", "arc_challenge", "piqa", "winogrande", "lambada", "gsm8k"],
        data_dir=FIXTURES,
        shots={"mmlu": 1, "gsm8k": 2},
        max_gen_tokens=16,
        batch_size=3,  # different from lm-eval's on purpose: batching must not change scores
        batch_tokens=200,  # a few packed rows per forward: padding and row mixing must not either
        out_dir=tmp / "ours",
    )
    samples = {}
    for task in ours["tasks"]:
        samples[task] = [
            json.loads(line) for line in (tmp / "ours/samples" / f"{task}.jsonl").read_text().splitlines()
        ]
    return ref, ours, samples, names


def _ref_samples(ref, names, task):
    keys = [v for k, v in names.items() if k == task or k.startswith(task + ":")]
    out = []
    for k in sorted(keys):  # our MMLU items are ordered by subject file name, as the lm-eval task names
        out += sorted(ref["samples"][k], key=lambda s: s["doc_id"])
    return out


@pytest.mark.slow
@pytest.mark.parametrize("task", ["mmlu", "hellaswag", "arc_easy", "arc_challenge", "piqa", "winogrande"])
def test_multiple_choice_matches_lm_eval(compared, task):
    ref, ours, samples, names = compared
    theirs = _ref_samples(ref, names, task)
    assert len(theirs) == len(samples[task]) > 0
    accs = []
    for mine, s in zip(samples[task], theirs, strict=True):
        args = s["arguments"]
        assert [a[1] for a in args] == mine["continuations"]
        contexts = mine.get("contexts") or [mine["context"]] * len(args)
        assert [a[0] for a in args] == contexts  # same rendered prompts, byte for byte
        lls = [r[0][0] for r in s["resps"]]
        assert mine["logprobs"] == pytest.approx(lls, abs=1e-4)
        assert float(mine["pred"] == mine["gold"]) == s["acc"]
        if "acc_norm" in s:
            assert float(mine["pred_norm"] == mine["gold"]) == s["acc_norm"]
        accs.append(s["acc"])
    assert ours["tasks"][task]["metrics"]["acc"] == pytest.approx(sum(accs) / len(accs))


@pytest.mark.slow
def test_lambada_matches_lm_eval(compared):
    ref, ours, samples, names = compared
    theirs = _ref_samples(ref, names, "lambada")
    for mine, s in zip(samples["lambada"], theirs, strict=True):
        logprob, greedy = s["resps"][0][0]
        assert mine["logprob"] == pytest.approx(logprob, abs=1e-4)
        assert mine["is_greedy"] == greedy
    r = ref["results"]["t_lambada"]
    assert ours["tasks"]["lambada"]["metrics"]["acc"] == r["acc,none"]
    assert math.log(ours["tasks"]["lambada"]["metrics"]["perplexity"]) == pytest.approx(
        math.log(r["perplexity,none"]), rel=1e-5
    )


@pytest.mark.slow
def test_gsm8k_matches_lm_eval(compared):
    ref, ours, samples, names = compared
    # lm-eval logs one sample per (doc, filter); the prompt and response are the same for both.
    theirs = [s for s in _ref_samples(ref, names, "gsm8k") if s["filter"] == "strict-match"]
    assert len(theirs) == len(samples["gsm8k"]) == 2
    for mine, s in zip(samples["gsm8k"], theirs, strict=True):
        assert mine["prompt"] == s["arguments"][0][0]  # same few-shot draws (seed 1234), same format
        assert mine["response"] == s["resps"][0][0]  # same greedy generation and stop handling
    r = ref["results"]["t_gsm8k"]
    assert ours["tasks"]["gsm8k"]["metrics"]["exact_match_strict"] == r["exact_match,strict-match"]
    assert ours["tasks"]["gsm8k"]["metrics"]["exact_match_flexible"] == r["exact_match,flexible-extract"]


def test_gsm8k_answer_extraction():
    from llmctl.evals.tasks import Item, score_generation

    item = Item(answer="3 * 12 = <<3*12=36>>36 eggs.\n#### 36", match="gsm8k")
    assert score_generation(item, " 3 boxes hold 36 eggs.\n#### 36") == {
        "exact_match_strict": 1.0,
        "exact_match_flexible": 1.0,
    }
    assert score_generation(item, " They hold $36.") == {
        "exact_match_strict": 0.0,
        "exact_match_flexible": 1.0,
    }
    assert score_generation(item, " 1,000 or 35") == {"exact_match_strict": 0.0, "exact_match_flexible": 0.0}
