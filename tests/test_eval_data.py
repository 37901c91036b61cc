"""Benchmark data in the shapes users hold it (issue 11 #16, #17): CSVs with a header, one hub-schema
file given directly or under any name, and malformed rows named by file:line with what was expected."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from llmctl.errors import InputError
from llmctl.evals.evaluate import build_task_items

FIXTURES = Path(__file__).parent / "fixtures" / "eval"


def items(task: str, data_dir: Path, shots: int = 0):
    return build_task_items(task, shots=shots, seed=1234, data_dir=data_dir, custom={})


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_mmlu_csv_with_a_header_row_and_numeric_answers(tmp_path):
    original = items("mmlu", FIXTURES)
    astronomy = [i for i in original if i.group == "astronomy"]
    lines = (FIXTURES / "mmlu/test/astronomy_test.csv").read_text().splitlines()
    body = [line.rsplit(",", 1) for line in lines]
    header = "question,choice0,choice1,choice2,choice3,answer"
    csv_file = tmp_path / "mmlu/test/astronomy_test.csv"
    csv_file.parent.mkdir(parents=True)
    csv_file.write_text("\n".join([header, *(f"{q},{'ABCD'.index(a)}" for q, a in body)]) + "\n")
    got = items("mmlu", tmp_path)
    assert [(i.requests, i.gold, i.group) for i in got] == [(i.requests, i.gold, i.group) for i in astronomy]
    # letters under a header are read as letters; A-D columns name the choices
    csv_file.write_text("\n".join(["question,A,B,C,D,answer", *lines]) + "\n")
    assert [i.gold for i in items("mmlu", tmp_path)] == [i.gold for i in astronomy]


@pytest.mark.parametrize(
    ("content", "line", "expected"),
    [
        ("question,choice0,choice1,choice2,choice3,answer\nQ?,a,b,c,d,1\nQ2?,a,b,c,d,E\n", 3,
         "'answer' must be a choice index (0-3 or A-D), got 'E'"),
        ("question,choice0,choice1,choice2,choice3,answer\nQ?,a,b,c,d,1\nQ2?,a,b,c\n", 3,
         "4 cells, but the header"),
        ("Q?,a,b,c,d,B\nQ2?,a,b,c,d,5\n", 2, "'answer' must be a choice index (0-3 or A-D), got '5'"),
        ("Q?,a,b,c,d,B\nQ2?,a,b,c,B\n", 2, "expected 6 CSV columns (question, A, B, C, D, answer), got 5"),
        ("question,opt1,opt2,opt3,opt4,answer\nQ?,a,b,c,d,1\n", 2, "no choice columns"),
    ],
)  # fmt: skip
def test_malformed_mmlu_csv_names_file_line_and_expectation(tmp_path, content, line, expected):
    path = tmp_path / "mmlu/test/astronomy_test.csv"
    path.parent.mkdir(parents=True)
    path.write_text(content)
    with pytest.raises(InputError) as e:
        items("mmlu", tmp_path)
    assert str(e.value).startswith(f"{path}:{line}: ") and expected in str(e.value)
    assert e.value.hint  # what the accepted shapes are, or how to fix the line


GOOD = {
    "hellaswag": {"activity_label": "Cooking", "ctx_a": "A man cuts.", "ctx_b": "he", "endings": ["a", "b"], "label": "1"},
    "arc_easy": {"question": "Q?", "choices": {"text": ["x", "y"], "label": ["A", "B"]}, "answerKey": "B"},
    "piqa": {"goal": "Open a jar", "sol1": "twist", "sol2": "push", "label": 0},
    "winogrande": {"sentence": "Tom beat Bob so _ won.", "option1": "Tom", "option2": "Bob", "answer": "1"},
    "lambada": {"text": "the cat sat on the mat"},
    "gsm8k": {"question": "1+1?", "answer": "2\n#### 2"},
    "mmlu": {"subject": "astronomy", "question": "Q?", "choices": ["a", "b", "c", "d"], "answer": 2},
}  # fmt: skip
BAD = {
    "hellaswag": ({"label": "7"}, "'label' must be a choice index (0-1), got '7'"),
    "arc_easy": ({"answerKey": "E"}, "answerKey 'E' is not one of the choice labels ['A', 'B']"),
    "piqa": ({"sol2": None}, "no 'sol2' field"),
    "winogrande": ({"sentence": "no blank here"}, "the sentence has no blank (_) to fill: 'no blank here'"),
    "lambada": ({"text": 5}, "'text' must be text, got 5"),
    "gsm8k": ({"question": ["a list"]}, "'question' must be text, got ['a list']"),
    "mmlu": ({"choices": ["a", "b"]}, "'choices' must hold 4 texts, got 2"),
}
SPLIT_FILE = {"hellaswag": "validation.jsonl", "piqa": "validation.jsonl", "winogrande": "validation.jsonl"}


@pytest.mark.parametrize("task", sorted(GOOD))
def test_malformed_rows_name_file_line_and_what_was_expected(tmp_path, task):
    bad_row, expected = BAD[task]
    path = _jsonl(tmp_path / SPLIT_FILE.get(task, "test.jsonl"), [GOOD[task], {**GOOD[task], **bad_row}])
    with pytest.raises(InputError) as e:
        items(task, path)
    assert str(e.value) == f"{path}:2: {expected}"
    assert e.value.hint and "rows are" in e.value.hint
    _jsonl(path, [GOOD[task]])
    assert len(items(task, path)) == 1


def test_a_single_hub_schema_file_given_or_found_under_any_name(tmp_path):
    rows = [
        json.loads(line) for line in (FIXTURES / "arc/ARC-Easy/ARC-Easy-Test.jsonl").read_text().splitlines()
    ]
    expected = [(i.requests, i.gold) for i in items("arc_easy", FIXTURES)]
    for path in (tmp_path / "a/test.jsonl", tmp_path / "b/arc_easy-test-00000.jsonl"):
        _jsonl(path, rows)
        assert [(i.requests, i.gold) for i in items("arc_easy", path)] == expected  # the file itself
        assert [
            (i.requests, i.gold) for i in items("arc_easy", path.parent)
        ] == expected  # found in its folder
    # parquet too, and a folder with two candidates is ambiguous, not a guess
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "b/test.parquet")
    assert [(i.requests, i.gold) for i in items("arc_easy", tmp_path / "b/test.parquet")] == expected
    with pytest.raises(InputError, match="several files .* could be it"):
        items("arc_easy", tmp_path / "b")


def test_missing_data_lists_the_layouts_tried(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _jsonl(tmp_path / "test.jsonl", [{"unrelated": 1}])  # a test file of another schema is not taken
    with pytest.raises(InputError) as e:
        items("arc_easy", tmp_path)
    message = str(e.value)
    assert "tried:" in message and "ARC-Easy/test-*.parquet" in message and "ARC-Easy-Test.jsonl" in message
    assert "question, choices, answerKey" in message and "allenai/ai2_arc" in message
    assert re.search(r"--data-dir FILE", e.value.hint)
