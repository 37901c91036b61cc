"""Benchmark tasks: turn dataset rows into scoring requests, with lm-evaluation-harness's prompts.

Every prompt string, preprocessing step and few-shot rule below is copied from lm-eval 0.4's task
configs (`lm_eval/tasks/<task>/*.yaml`, `utils.py`) so scores are comparable; `PROMPT_VERSION`
changes whenever one of them changes here.

    items = build_items("arc_easy", rows)       # list[Item]
    item.requests                               # ((context, continuation), ...) one per choice

Kinds: `multiple_choice` (one log-likelihood request per choice; acc and, where lm-eval reports
it, acc_norm = argmax of logprob / len(choice text)), `loglikelihood` (lambada: acc = the target is
the greedy continuation, plus perplexity), `generate` (greedy generation then answer extraction).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from typing import Any, Literal

from llmctl.errors import ConfigError, InputError

PROMPT_VERSION = "lm-eval-0.4"

Kind = Literal["multiple_choice", "loglikelihood", "generate", "perplexity"]

# lm-eval's MMLU subject -> category mapping (lm_eval/tasks/mmlu/_generate_configs.py).
MMLU_SUBJECTS: dict[str, str] = {
    "abstract_algebra": "stem", "anatomy": "stem", "astronomy": "stem", "business_ethics": "other",
    "clinical_knowledge": "other", "college_biology": "stem", "college_chemistry": "stem",
    "college_computer_science": "stem", "college_mathematics": "stem", "college_medicine": "other",
    "college_physics": "stem", "computer_security": "stem", "conceptual_physics": "stem",
    "econometrics": "social_sciences", "electrical_engineering": "stem", "elementary_mathematics": "stem",
    "formal_logic": "humanities", "global_facts": "other", "high_school_biology": "stem",
    "high_school_chemistry": "stem", "high_school_computer_science": "stem",
    "high_school_european_history": "humanities", "high_school_geography": "social_sciences",
    "high_school_government_and_politics": "social_sciences",
    "high_school_macroeconomics": "social_sciences", "high_school_mathematics": "stem",
    "high_school_microeconomics": "social_sciences", "high_school_physics": "stem",
    "high_school_psychology": "social_sciences", "high_school_statistics": "stem",
    "high_school_us_history": "humanities", "high_school_world_history": "humanities",
    "human_aging": "other", "human_sexuality": "social_sciences", "international_law": "humanities",
    "jurisprudence": "humanities", "logical_fallacies": "humanities", "machine_learning": "stem",
    "management": "other", "marketing": "other", "medical_genetics": "other", "miscellaneous": "other",
    "moral_disputes": "humanities", "moral_scenarios": "humanities", "nutrition": "other",
    "philosophy": "humanities", "prehistory": "humanities", "professional_accounting": "other",
    "professional_law": "humanities", "professional_medicine": "other",
    "professional_psychology": "social_sciences", "public_relations": "social_sciences",
    "security_studies": "social_sciences", "sociology": "social_sciences",
    "us_foreign_policy": "social_sciences", "virology": "other", "world_religions": "humanities",
}  # fmt: skip

GSM8K_UNTIL = ("Question:", "</s>", "<|im_end|>")
LM_EVAL_FEWSHOT_SEED = 1234  # lm-eval's default fewshot_random_seed


@dataclass(frozen=True)
class TaskSpec:
    """What a built-in task is: its kind, data split, few-shot source and reported metrics."""

    name: str
    kind: Kind
    split: str | None = None
    fewshot_split: str | None = None  # None: zero-shot only
    default_shots: int = 0
    acc_norm: bool = False
    data: str | None = None  # key in evals.data.SOURCES (defaults to name)


TASKS: dict[str, TaskSpec] = {
    t.name: t
    for t in (
        TaskSpec("mmlu", "multiple_choice", "test", "dev", 0),
        TaskSpec("hellaswag", "multiple_choice", "validation", acc_norm=True),
        TaskSpec("arc_easy", "multiple_choice", "test", acc_norm=True),
        TaskSpec("arc_challenge", "multiple_choice", "test", acc_norm=True),
        TaskSpec("piqa", "multiple_choice", "validation", acc_norm=True),
        TaskSpec("winogrande", "multiple_choice", "validation"),
        TaskSpec("lambada", "loglikelihood", "test"),
        TaskSpec("gsm8k", "generate", "test", "train", 5),
        TaskSpec("perplexity", "perplexity"),
        TaskSpec("world_mc", "multiple_choice"),
    )
}


@dataclass(frozen=True)
class Item:
    """One scored example. Multiple choice: `requests` holds one (context, continuation) per choice
    and `choice_lengths` the lengths acc_norm divides by; generation: `prompt` and `answer`."""

    requests: tuple[tuple[str, str], ...] = ()
    gold: int | None = None
    choice_lengths: tuple[int, ...] = ()
    group: str | None = None
    prompt: str | None = None
    answer: str | None = None
    until: tuple[str, ...] = ()
    match: str = "exact"  # generation: exact | regex | gsm8k
    pattern: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def _mc(context: str, choices: list[str], gold: int, group: str | None = None, delimiter: str = " ") -> Item:
    if not 0 <= gold < len(choices):
        raise InputError(f"gold index {gold} is outside the {len(choices)} choices of {context[:60]!r}")
    return Item(
        requests=tuple((context, delimiter + c) for c in choices),
        gold=gold,
        choice_lengths=tuple(len(c) for c in choices),
        group=group,
    )


# ---- MMLU ----------------------------------------------------------------------------------------


def _mmlu_row(row: dict[str, Any]) -> dict[str, Any]:
    """One MMLU row as {subject, question, choices, answer} from the hub's or the CSV layout."""
    if "_row" in row:  # original CSV: question, A, B, C, D, letter; subject from the file name
        cells = row["_row"]
        if len(cells) != 6:
            raise InputError(
                f"{row['_file']}: MMLU rows have 6 columns (question, A-D, answer), got {len(cells)}"
            )
        subject = re.sub(r"_(test|dev|val)\.csv$", "", row["_file"])
        return {
            "subject": subject,
            "question": cells[0],
            "choices": cells[1:5],
            "answer": "ABCD".index(cells[5].strip()),
        }
    return {
        "subject": row["subject"],
        "question": row["question"],
        "choices": list(row["choices"]),
        "answer": int(row["answer"]),
    }


def _mmlu_text(doc: dict[str, Any]) -> str:
    c = doc["choices"]
    return f"{doc['question'].strip()}\nA. {c[0]}\nB. {c[1]}\nC. {c[2]}\nD. {c[3]}\nAnswer:"


def build_mmlu(rows: list[dict[str, Any]], dev_rows: list[dict[str, Any]], shots: int) -> list[Item]:
    """lm-eval `mmlu` (default template): description, the first `shots` dev items of the subject
    (sampler first_n), then the question; continuations " A".." D"."""
    docs = [_mmlu_row(r) for r in rows]
    dev: dict[str, list[dict[str, Any]]] = {}
    for r in dev_rows:
        d = _mmlu_row(r)
        dev.setdefault(d["subject"], []).append(d)
    items = []
    for doc in docs:
        subject = doc["subject"]
        if subject not in MMLU_SUBJECTS:
            raise InputError(
                f"unknown MMLU subject {subject!r}", hint="subjects are lm-eval's 57 MMLU subjects"
            )
        prefix = f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"
        if shots:
            examples = dev.get(subject, [])[:shots]
            if len(examples) < shots:
                raise InputError(
                    f"mmlu {subject}: {shots}-shot needs {shots} dev items, found {len(examples)}"
                )
            prefix += "\n\n".join(_mmlu_text(e) + " " + "ABCD"[e["answer"]] for e in examples) + "\n\n"
        items.append(_mc(prefix + _mmlu_text(doc), ["A", "B", "C", "D"], doc["answer"], subject))
    return items


# ---- HellaSwag, ARC, PIQA, Winogrande ------------------------------------------------------------


def hellaswag_preprocess(text: str) -> str:
    """lm-eval hellaswag/utils.py `preprocess` (WikiHow bracket artifacts)."""
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    text = text.replace("  ", " ")
    return text


def build_hellaswag(rows: list[dict[str, Any]]) -> list[Item]:
    items = []
    for doc in rows:
        ctx = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
        query = hellaswag_preprocess(doc["activity_label"] + ": " + ctx)
        choices = [hellaswag_preprocess(e) for e in doc["endings"]]
        items.append(_mc(query, choices, int(doc["label"])))
    return items


def build_arc(rows: list[dict[str, Any]]) -> list[Item]:
    items = []
    for doc in rows:
        q = doc["question"]
        if isinstance(q, dict):  # the original release: {"question": {"stem", "choices": [{text, label}]}}
            texts = [c["text"] for c in q["choices"]]
            labels = [c["label"] for c in q["choices"]]
            q = q["stem"]
        else:
            texts, labels = list(doc["choices"]["text"]), list(doc["choices"]["label"])
        items.append(_mc(f"Question: {q}\nAnswer:", texts, labels.index(doc["answerKey"])))
    return items


def build_piqa(rows: list[dict[str, Any]]) -> list[Item]:
    return [_mc(f"Question: {d['goal']}\nAnswer:", [d["sol1"], d["sol2"]], int(d["label"])) for d in rows]


def build_winogrande(rows: list[dict[str, Any]]) -> list[Item]:
    """Partial scoring (lm-eval): each option substituted into the sentence up to the blank is a
    context; the rest of the sentence after the blank is the one continuation scored."""
    items = []
    for doc in rows:
        sentence = doc["sentence"]
        idx = sentence.index("_")
        target = sentence[idx + 1 :].strip()
        contexts = [sentence[:idx] + opt for opt in (doc["option1"], doc["option2"])]
        gold = {"1": 0, "2": 1}[str(doc["answer"])]
        items.append(
            Item(
                requests=tuple((c, " " + target) for c in contexts),
                gold=gold,
                choice_lengths=(len(target), len(target)),
            )
        )
    return items


def build_lambada(rows: list[dict[str, Any]]) -> list[Item]:
    items = []
    for doc in rows:
        words = doc["text"].split(" ")
        items.append(Item(requests=((" ".join(words[:-1]), " " + words[-1]),)))
    return items


# ---- GSM8K ---------------------------------------------------------------------------------------


def build_gsm8k(
    rows: list[dict[str, Any]], train_rows: list[dict[str, Any]], shots: int, seed: int
) -> list[Item]:
    """lm-eval `gsm8k`: `shots` random train examples per question (random.Random(seed).sample per
    document, in order, as lm-eval's default sampler with fewshot_random_seed=1234), "\\n\\n"-joined."""
    rnd = random.Random(seed)
    items = []
    for doc in rows:
        prefix = ""
        if shots:
            if len(train_rows) < shots:
                raise InputError(f"gsm8k: {shots}-shot needs {shots} train items, found {len(train_rows)}")
            examples = rnd.sample(train_rows, shots)
            prefix = (
                "\n\n".join(f"Question: {e['question']}\nAnswer: {e['answer']}" for e in examples) + "\n\n"
            )
        items.append(
            Item(
                prompt=prefix + f"Question: {doc['question']}\nAnswer:",
                answer=doc["answer"],
                until=GSM8K_UNTIL,
                match="gsm8k",
            )
        )
    return items


_GSM8K_IGNORE = (",", "\\$", "(?s).*#### ", "\\.$")


def _normalise_gsm8k(s: str) -> str:
    for pattern in _GSM8K_IGNORE:
        s = re.sub(pattern, "", s)
    return s.lower().strip()


def gsm8k_extract(response: str) -> dict[str, str]:
    """lm-eval's two gsm8k filters: strict "#### N" (first match), flexible (last number-like)."""
    strict = re.findall(r"#### (\-?[0-9\.\,]+)", response)
    flexible = re.findall(r"(-?[$0-9.,]{2,})|(-?[0-9]+)", response)
    out = {"strict": strict[0].strip() if strict else "[invalid]"}
    if flexible:
        m = [x for x in flexible[-1] if x]
        out["flexible"] = m[0].strip() if m else "[invalid]"
    else:
        out["flexible"] = "[invalid]"
    return out


def score_generation(item: Item, response: str) -> dict[str, float]:
    """Metrics of one generated response."""
    assert item.answer is not None
    if item.match == "gsm8k":
        ref = _normalise_gsm8k(item.answer)
        got = gsm8k_extract(response)
        return {
            "exact_match_strict": float(_normalise_gsm8k(got["strict"]) == ref),
            "exact_match_flexible": float(_normalise_gsm8k(got["flexible"]) == ref),
        }
    if item.match == "regex":
        assert item.pattern is not None
        found = re.findall(item.pattern, response)
        pred = found[0] if found else ""
        pred = pred if isinstance(pred, str) else next((x for x in pred if x), "")
        return {"exact_match": float(pred.strip() == item.answer.strip())}
    return {"exact_match": float(response.strip() == item.answer.strip())}


# ---- custom and synthetic tasks ------------------------------------------------------------------


def build_custom_mc(rows: list[dict[str, Any]], source: str, delimiter: str = "") -> list[Item]:
    """Rows {"query", "choices", "gold"}: each choice is scored as a continuation of query. Choices
    are appended as written (`delimiter` "" by default: include a leading space in the choice)."""
    items = []
    for n, row in enumerate(rows, 1):
        try:
            query, choices, gold = row["query"], list(row["choices"]), int(row["gold"])
        except (KeyError, TypeError, ValueError) as e:
            raise InputError(
                f"{source}: row {n}: multiple-choice rows need query, choices (list) and gold (int): {e}"
            ) from None
        items.append(_mc(query, choices, gold, row.get("group"), delimiter))
    return items


def build_custom_generative(rows: list[dict[str, Any]], source: str, until: tuple[str, ...]) -> list[Item]:
    """Rows {"prompt", "answer", "match": exact|regex, "pattern"}: greedy generation, then the answer
    is compared (stripped) to the whole response (exact) or the first regex match."""
    items = []
    for n, row in enumerate(rows, 1):
        if "prompt" not in row or "answer" not in row:
            raise InputError(f"{source}: row {n}: generative rows need prompt and answer")
        match = row.get("match", "exact")
        if match not in ("exact", "regex"):
            raise InputError(f"{source}: row {n}: match must be exact or regex, got {match!r}")
        if match == "regex" and not row.get("pattern"):
            raise InputError(f"{source}: row {n}: match: regex needs a pattern")
        items.append(
            Item(
                prompt=str(row["prompt"]),
                answer=str(row["answer"]),
                until=until,
                match=match,
                pattern=row.get("pattern"),
            )
        )
    return items


def check_shots(task: str, shots: int) -> None:
    spec = TASKS.get(task)
    if shots and spec is not None and spec.fewshot_split is None:
        raise ConfigError(
            f"{task}: {shots}-shot is not supported (llmctl runs {task} zero-shot, as lm-eval's default)",
            hint=f"drop the shots for {task}",
        )
