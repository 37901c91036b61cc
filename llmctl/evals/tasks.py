"""Benchmark tasks: turn dataset rows into scoring requests, with lm-evaluation-harness's prompts.

Every prompt string, preprocessing step and few-shot rule below is copied from lm-eval 0.4's task
configs (`lm_eval/tasks/<task>/*.yaml`, `utils.py`) so scores are comparable; `PROMPT_VERSION`
changes whenever one of them changes here.

    items = build_items("arc_easy", rows)       # list[Item]
    item.requests                               # ((context, continuation), ...) one per choice

Kinds: `multiple_choice` (one log-likelihood request per choice; acc and, where lm-eval reports
it, acc_norm = argmax of logprob / len(choice text)), `loglikelihood` (lambada: acc = the target is
the greedy continuation, plus perplexity), `generate` (greedy generation then answer extraction),
`chat` (the prompt as one user turn through the model's chat template, greedy generation until its
end-of-turn token, exact match and contains against the answers; llmctl/evals/chat.py runs it).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from llmctl.errors import ConfigError, InputError

PROMPT_VERSION = "lm-eval-0.4"

Kind = Literal["multiple_choice", "loglikelihood", "generate", "perplexity", "chat"]

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
        TaskSpec("world_chat", "chat"),
    )
}


@dataclass(frozen=True)
class Item:
    """One scored example. Multiple choice: `requests` holds one (context, continuation) per choice
    and `choice_lengths` the lengths acc_norm divides by; generation: `prompt` and `answer`; chat:
    `prompt` (the user's turn), `system`, and `answers` (any one counts)."""

    requests: tuple[tuple[str, str], ...] = ()
    gold: int | None = None
    choice_lengths: tuple[int, ...] = ()
    group: str | None = None
    prompt: str | None = None
    answer: str | None = None
    until: tuple[str, ...] = ()
    match: str = "exact"  # generation: exact | regex | gsm8k
    pattern: str | None = None
    answers: tuple[str, ...] = ()
    system: str | None = None
    where: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    # The item's own words (question and reference answer), when the prompt adds a template or
    # few-shot examples; what decontamination checks (evals/decontaminate.py `item_text`).
    doc: str = ""


class Row:
    """One data row of a task, read with the checks a user's file needs: each accessor returns the
    field or raises an InputError that names the file and line, the field and what was expected."""

    def __init__(self, data: dict[str, Any], task: str, schema: str):
        self.data, self.task, self.schema = data, task, schema
        file, line = data.get("_file"), data.get("_line")
        self.where = f"{file}:{line}" if file and line else str(file or task)

    def fail(self, what: str) -> InputError:
        fields = sorted(k for k in self.data if not k.startswith("_"))
        return InputError(
            f"{self.where}: {what}",
            hint=f"{self.task} rows are {self.schema}; this row has {', '.join(fields) or 'no fields'}",
        )

    def get(self, key: str) -> Any:
        if key not in self.data or self.data[key] is None:
            raise self.fail(f"no {key!r} field")
        return self.data[key]

    def text(self, key: str) -> str:
        value = self.get(key)
        if not isinstance(value, str):
            raise self.fail(f"{key!r} must be text, got {value!r:.60}")
        return value

    def texts(self, key: str, n: int | None = None) -> list[str]:
        value = self.get(key)
        if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
            raise self.fail(f"{key!r} must be a list of texts, got {value!r:.60}")
        if n is not None and len(value) != n:
            raise self.fail(f"{key!r} must hold {n} texts, got {len(value)}")
        return list(value)

    def index(self, key: str, n: int, letters: str = "") -> int:
        """A 0-based choice index below n: an int, a digit string, or one of `letters` (A-D)."""
        value = self.get(key)
        text = str(value).strip()
        if letters and len(text) == 1 and text.upper() in letters[:n]:
            return letters.index(text.upper())
        if isinstance(value, int | str) and text.isdigit() and int(text) < n:
            return int(text)
        accepted = f"0-{n - 1}" + (f" or {letters[0]}-{letters[n - 1]}" if letters else "")
        raise self.fail(f"{key!r} must be a choice index ({accepted}), got {value!r:.60}")


def _mc(
    context: str,
    choices: list[str],
    gold: int,
    group: str | None = None,
    delimiter: str = " ",
    question: str | None = None,
) -> Item:
    assert 0 <= gold < len(choices), (gold, len(choices))
    return Item(
        requests=tuple((context, delimiter + c) for c in choices),
        gold=gold,
        choice_lengths=tuple(len(c) for c in choices),
        group=group,
        doc=f"{question} {choices[gold]}" if question is not None else "",
    )


# ---- MMLU ----------------------------------------------------------------------------------------


MMLU_SCHEMA = (
    "{subject, question, choices: 4 texts, answer: 0-3} (the hub), `question,A,B,C,D,answer` CSV "
    "lines with answers A-D (the original release, subject from SUBJECT_test.csv), or a CSV with a "
    "header naming question, four choice columns (A-D or choice0-choice3) and answer (A-D or 0-3)"
)
_MMLU_CHOICE_COLUMNS = (("a", "b", "c", "d"), ("choice0", "choice1", "choice2", "choice3"),
                        ("choice1", "choice2", "choice3", "choice4"))  # fmt: skip


def _mmlu_subject(row: Row) -> str:
    if "subject" in row.data:
        return row.text("subject")
    name = Path(str(row.data.get("_file", ""))).name
    subject = re.sub(r"_(test|dev|val)\.csv$", "", name)
    if subject not in MMLU_SUBJECTS:
        raise row.fail(
            f"no subject: neither a `subject` field nor a SUBJECT_test.csv file name ({name!r}) "
            "naming one of lm-eval's 57 MMLU subjects"
        )
    return subject


def _mmlu_row(data: dict[str, Any]) -> dict[str, Any]:
    """One MMLU row as {subject, question, choices, answer} from the hub's or a CSV layout."""
    row = Row(data, "mmlu", MMLU_SCHEMA)
    if "_cells" in data:  # original CSV: question, A, B, C, D, letter; subject from the file name
        cells = data["_cells"]
        if len(cells) != 6:
            raise row.fail(f"expected 6 CSV columns (question, A, B, C, D, answer), got {len(cells)}")
        row = Row({**data, "answer": cells[5]}, "mmlu", MMLU_SCHEMA)
        question, choices = cells[0], cells[1:5]
    elif "choices" in data:
        question, choices = row.text("question"), row.texts("choices", 4)
    else:  # a CSV with a header
        columns = next((c for c in _MMLU_CHOICE_COLUMNS if set(c) <= set(data)), None)
        if columns is None:
            raise row.fail("no choice columns: expected A, B, C, D or choice0..choice3")
        question, choices = row.text("question"), [row.text(c) for c in columns]
    return {
        "where": row.where,
        "subject": _mmlu_subject(row),
        "question": question,
        "choices": choices,
        "answer": row.index("answer", 4, letters="ABCD"),
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
                f"{doc['where']}: unknown MMLU subject {subject!r}",
                hint="subjects are lm-eval's 57 MMLU subjects (e.g. abstract_algebra)",
            )
        prefix = f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"
        if shots:
            examples = dev.get(subject, [])[:shots]
            if len(examples) < shots:
                raise InputError(
                    f"mmlu {subject}: {shots}-shot needs {shots} dev items, found {len(examples)}"
                )
            prefix += "\n\n".join(_mmlu_text(e) + " " + "ABCD"[e["answer"]] for e in examples) + "\n\n"
        item = _mc(prefix + _mmlu_text(doc), ["A", "B", "C", "D"], doc["answer"], subject)
        items.append(replace(item, doc=f"{doc['question']} {doc['choices'][doc['answer']]}"))
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
    schema = "{activity_label, ctx_a, ctx_b, endings: texts, label: index of the right ending}"
    items = []
    for data in rows:
        row = Row(data, "hellaswag", schema)
        ctx = row.text("ctx_a") + " " + row.text("ctx_b").capitalize()
        query = hellaswag_preprocess(row.text("activity_label") + ": " + ctx)
        endings = row.texts("endings")
        choices = [hellaswag_preprocess(e) for e in endings]
        items.append(_mc(query, choices, row.index("label", len(choices))))
    return items


def build_arc(rows: list[dict[str, Any]], task: str = "arc") -> list[Item]:
    schema = (
        "{question, choices: {text: [...], label: [...]}, answerKey} (the hub) or {question: {stem, "
        "choices: [{text, label}]}, answerKey} (the original release)"
    )
    items = []
    for data in rows:
        row = Row(data, task, schema)
        q = row.get("question")
        if isinstance(q, dict):  # the original release: {"question": {"stem", "choices": [{text, label}]}}
            inner = Row({**q, "_file": data.get("_file"), "_line": data.get("_line")}, task, schema)
            options = inner.get("choices")
            if not isinstance(options, list) or not all(isinstance(c, dict) for c in options):
                raise row.fail(f"question.choices must be a list of {{text, label}}, got {options!r:.60}")
            opts = [
                Row({**c, "_file": data.get("_file"), "_line": data.get("_line")}, task, schema)
                for c in options
            ]
            texts, labels = [o.text("text") for o in opts], [o.text("label") for o in opts]
            q = inner.text("stem")
        else:
            q = row.text("question")
            choices = row.get("choices")
            if not isinstance(choices, dict):
                raise row.fail(f"'choices' must be {{text: [...], label: [...]}}, got {choices!r:.60}")
            inner = Row({**choices, "_file": data.get("_file"), "_line": data.get("_line")}, task, schema)
            texts, labels = inner.texts("text"), inner.texts("label")
        key = str(row.get("answerKey"))
        if len(texts) != len(labels) or key not in labels:
            raise row.fail(f"answerKey {key!r} is not one of the choice labels {labels}")
        items.append(_mc(f"Question: {q}\nAnswer:", texts, labels.index(key), question=q))
    return items


def build_piqa(rows: list[dict[str, Any]]) -> list[Item]:
    schema = "{goal, sol1, sol2, label: 0 or 1}"
    items = []
    for data in rows:
        row = Row(data, "piqa", schema)
        choices = [row.text("sol1"), row.text("sol2")]
        goal = row.text("goal")
        items.append(_mc(f"Question: {goal}\nAnswer:", choices, row.index("label", 2), question=goal))
    return items


def build_winogrande(rows: list[dict[str, Any]]) -> list[Item]:
    """Partial scoring (lm-eval): each option substituted into the sentence up to the blank is a
    context; the rest of the sentence after the blank is the one continuation scored."""
    schema = "{sentence with one _, option1, option2, answer: 1 or 2}"
    items = []
    for data in rows:
        row = Row(data, "winogrande", schema)
        sentence = row.text("sentence")
        if "_" not in sentence:
            raise row.fail(f"the sentence has no blank (_) to fill: {sentence!r:.60}")
        idx = sentence.index("_")
        target = sentence[idx + 1 :].strip()
        contexts = [sentence[:idx] + opt for opt in (row.text("option1"), row.text("option2"))]
        answer = str(row.get("answer")).strip()
        if answer not in ("1", "2"):
            raise row.fail(f"'answer' must be 1 or 2, got {answer!r:.60}")
        items.append(
            Item(
                requests=tuple((c, " " + target) for c in contexts),
                gold=int(answer) - 1,
                choice_lengths=(len(target), len(target)),
            )
        )
    return items


def build_lambada(rows: list[dict[str, Any]]) -> list[Item]:
    items = []
    for data in rows:
        row = Row(data, "lambada", "{text: a passage whose last word is predicted}")
        words = row.text("text").split(" ")
        if len(words) < 2:
            raise row.fail("'text' needs at least two words (the last one is the target)")
        items.append(Item(requests=((" ".join(words[:-1]), " " + words[-1]),)))
    return items


# ---- GSM8K ---------------------------------------------------------------------------------------


def build_gsm8k(
    rows: list[dict[str, Any]], train_rows: list[dict[str, Any]], shots: int, seed: int
) -> list[Item]:
    """lm-eval `gsm8k`: `shots` random train examples per question (random.Random(seed).sample per
    document, in order, as lm-eval's default sampler with fewshot_random_seed=1234), "\\n\\n"-joined."""
    schema = "{question, answer: worked solution ending in #### N}"
    rows = [{"question": r.text("question"), "answer": r.text("answer")}
            for r in (Row(d, "gsm8k", schema) for d in rows)]  # fmt: skip
    train_rows = [{"question": r.text("question"), "answer": r.text("answer")}
                  for r in (Row(d, "gsm8k", schema) for d in train_rows)]  # fmt: skip
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
                doc=f"{doc['question']} {doc['answer']}",
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
    schema = "{query, choices: list of texts, gold: index of the right choice}"
    items = []
    for data in rows:
        row = Row({"_file": source, **data}, source, schema)
        choices = row.texts("choices")
        group = data.get("group")
        items.append(_mc(row.text("query"), choices, row.index("gold", len(choices)), group, delimiter))
    return items


def build_custom_generative(rows: list[dict[str, Any]], source: str, until: tuple[str, ...]) -> list[Item]:
    """Rows {"prompt", "answer", "match": exact|regex, "pattern"}: greedy generation, then the answer
    is compared (stripped) to the whole response (exact) or the first regex match."""
    schema = "{prompt, answer, match: exact|regex, pattern (for regex)}"
    items = []
    for data in rows:
        row = Row({"_file": source, **data}, source, schema)
        prompt, answer = str(row.get("prompt")), str(row.get("answer"))
        match = data.get("match", "exact")
        if match not in ("exact", "regex"):
            raise row.fail(f"'match' must be exact or regex, got {match!r}")
        pattern = row.text("pattern") if match == "regex" else None
        if pattern is not None:
            try:
                re.compile(pattern)
            except re.error as e:
                raise row.fail(f"'pattern' is not a valid regular expression: {e}") from None
        items.append(Item(prompt=prompt, answer=answer, until=until, match=match, pattern=pattern))
    return items


CHAT_SCHEMA = "{prompt, answer: a text or a list of texts (any one counts), system (optional)}"
_TRAILING_PUNCTUATION = ".,;:!?\"'"


def build_chat(rows: list[dict[str, Any]], source: str) -> list[Item]:
    """Rows {"prompt", "answer" (text or list of texts), "system"}: the prompt becomes the user's turn
    (after the system prompt, when given). Other scalar fields (subject, relation) go to the samples;
    `group` or `relation` groups the scores."""
    items = []
    for data in rows:
        row = Row({"_file": source, **data}, source, CHAT_SCHEMA)
        answer = row.get("answer")
        answers = [answer] if isinstance(answer, str) else row.texts("answer")
        if not answers or not all(normalize_answer(a) for a in answers):
            raise row.fail(f"'answer' must hold a non-empty text, got {answer!r:.60}")
        system = row.text("system") if data.get("system") is not None else None
        extra = {
            k: v
            for k, v in data.items()
            if not k.startswith("_")
            and k not in ("prompt", "answer", "system")
            and isinstance(v, str | int | float)
        }
        items.append(
            Item(
                prompt=row.text("prompt"),
                answer=answers[0],
                answers=tuple(answers),
                system=system,
                group=data.get("group") or data.get("relation"),
                match="chat",
                where=row.where,
                extra=extra,
            )
        )
    return items


def normalize_answer(text: str) -> str:
    """Case-folded, whitespace runs made single spaces, trailing punctuation and spaces removed."""
    return " ".join(text.casefold().split()).rstrip(_TRAILING_PUNCTUATION + " ")


def score_chat(item: Item, response: str) -> dict[str, float]:
    """exact_match: the normalized response equals a normalized answer; contains: a normalized
    answer occurs in the normalized response as whole words ("Ostrin." in "The capital is Ostrin.",
    not "Ost" in "Ostrin")."""
    got = normalize_answer(response)
    wanted = [normalize_answer(a) for a in item.answers or (item.answer or "",)]
    return {
        "exact_match": float(got in wanted),
        "contains": float(any(re.search(rf"(?<!\w){re.escape(a)}(?!\w)", got) for a in wanted if a)),
    }


def check_shots(task: str, shots: int) -> None:
    spec = TASKS.get(task)
    if shots and spec is not None and spec.fewshot_split is None:
        raise ConfigError(
            f"{task}: {shots}-shot is not supported (llmctl runs {task} zero-shot, as lm-eval's default)",
            hint=f"drop the shots for {task}",
        )
