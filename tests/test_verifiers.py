"""Reward verifiers: each one's positive and negative cases, weights, errors reported with the record id,
config validation, and code verifiers scored on real sandboxed processes."""

from __future__ import annotations

import time

import pytest
from pydantic import ValidationError

from llmctl.config.rewards import VerifierConfig
from llmctl.errors import ConfigError
from llmctl.rl.verifiers import build_reward, final_number


def _score(specs: list[dict], records: list[dict], completions: list[str], project_dir=None):
    reward = build_reward([VerifierConfig(**s) for s in specs], project_dir or ".")
    return reward.score(records, completions, [f"r{i}" for i in range(len(records))])


def _parts(spec: dict, pairs: list[tuple[object, str]], field: str = "answer") -> list[float]:
    results = _score([spec], [{field: ref} for ref, _ in pairs], [c for _, c in pairs])
    assert all(not r.errors for r in results), [r.errors for r in results]
    return [r.total for r in results]


GSM8K_REFERENCE = (
    "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nShe sold 48+24 = <<48+24=72>>72 clips.\n#### 72"
)


@pytest.mark.parametrize(
    ("reference", "completion", "expected"),
    [
        (GSM8K_REFERENCE, "48 + 24 = 72 clips in all.\n#### 72", 1.0),
        (GSM8K_REFERENCE, "She sold 72 clips in April and May.", 1.0),
        (GSM8K_REFERENCE, "So the answer is \\boxed{72}. Checking: 72 - 24 = 48", 1.0),
        (GSM8K_REFERENCE, "She sold 70 clips. #### 70", 0.0),
        (GSM8K_REFERENCE, "The answer is 72, or maybe 71", 0.0),
        (GSM8K_REFERENCE, "I do not know.", 0.0),
        ("#### 1,234,567", "The total is 1,234,567 dollars", 1.0),
        ("1234567", "#### 1234567.0", 1.0),
        ("-5", "The temperature fell to -5 degrees.", 1.0),
        ("5", "The temperature fell to -5 degrees.", 0.0),
        ("0.75", "\\boxed{\\frac{3}{4}}", 1.0),
        ("3/4", "It is 0.75 of the cake", 1.0),
        ("0.3333333", "#### 1/3", 1.0),  # within 1e-6 relative
        ("0.33", "#### 1/3", 0.0),
        (72, "#### 72", 1.0),
        ("1000", "#### 1001", 0.0),
        ("1000000000", "#### 1000000001", 1.0),  # within 1e-6 relative
    ],
)
def test_math_compares_the_final_number(reference, completion, expected):
    assert _parts({"type": "math"}, [(reference, completion)]) == [expected]


def test_final_number_forms():
    assert final_number("1,2,3") == 3  # a list, not one hundred and twenty-three
    assert final_number("from 3-4 apples") == 4
    assert final_number("\\boxed{2} then \\boxed{-1.5}") == -1.5
    assert final_number("no digits here") is None


def test_exact_contains_regex_and_format():
    assert _parts(
        {"type": "exact"}, [("Paris", "  paris "), ("New  York", "new york\n"), ("Paris", "Paris!")]
    ) == [
        1.0,
        1.0,
        0.0,
    ]
    contains = [
        ("Paris", "I think PARIS is right."),
        ("Paris", "Parisian food"),
        (["Rome", "Paris"], "It's Paris"),
    ]
    assert _parts({"type": "contains"}, contains) == [1.0, 0.0, 1.0]
    regex = {"type": "regex", "pattern": r"<think>.*</think>\s*<answer>.*</answer>"}
    assert _parts(
        regex, [(None, "<think>a</think>\n<answer>b</answer>\n"), (None, "x <answer>b</answer>")]
    ) == [
        1.0,
        0.0,
    ]
    fmt = {"type": "format", "pattern": r"<answer>.*</answer>"}
    assert _parts(fmt, [(None, "blah <answer>\n4\n</answer> blah"), (None, "<answer>4")]) == [1.0, 0.0]


def test_weights_combine_and_parts_are_named():
    specs = [
        {"type": "math"},
        {"type": "format", "pattern": "<answer>", "weight": 0.5},
        {"type": "math", "weight": 2},
    ]
    [both, only_format] = _score(specs, [{"answer": "7"}] * 2, ["<answer>7</answer>", "<answer>8</answer>"])
    assert both.parts == {"math": 1.0, "format": 1.0, "math_2": 1.0} and both.total == 3.5
    assert only_format.parts == {"math": 0.0, "format": 1.0, "math_2": 0.0} and only_format.total == 0.5


def test_a_user_function_from_the_project_folder(tmp_path):
    (tmp_path / "my_rewards.py").write_text(
        "def brevity(record, completion):\n"
        "    return 1.0 / (1 + len(completion.split()))\n"
        "def picky(record, completion):\n"
        "    return 1.0 if record['answer'] in completion else 0.0\n"
    )
    specs = [
        {"type": "function", "function": "my_rewards:brevity"},
        {"type": "function", "function": "my_rewards:picky"},
    ]
    [result] = _score(specs, [{"answer": "x"}], ["x y z"], tmp_path)
    assert result.parts == {"function": 0.25, "function_2": 1.0} and result.total == 1.25
    assert str(tmp_path) not in __import__("sys").path  # on sys.path for the import only


def test_a_raising_function_is_reported_with_the_record_id_and_the_batch_goes_on(tmp_path):
    (tmp_path / "flaky.py").write_text(
        "def score(record, completion):\n"
        "    if record['n'] == 1:\n"
        "        raise RuntimeError('cannot judge this one')\n"
        "    return 1.0\n"
    )
    specs = [{"type": "function", "function": "flaky:score", "name": "judge"}, {"type": "exact", "weight": 2}]
    reward = build_reward([VerifierConfig(**s) for s in specs], tmp_path)
    records = [{"n": n, "answer": "yes"} for n in range(3)]
    results = reward.score(records, ["yes"] * 3, ["gsm-0", "gsm-1", "gsm-2"])
    assert [r.total for r in results] == [3.0, 2.0, 3.0]
    assert results[1].parts == {"judge": 0.0, "exact": 1.0}
    assert results[1].errors == ["judge on record gsm-1: RuntimeError: cannot judge this one"]
    assert results[0].errors == results[2].errors == []


def test_a_record_without_the_reference_field_is_an_error_for_that_record_only():
    [bad, good] = _score(
        [{"type": "math", "field": "solution"}], [{"answer": "1"}, {"solution": "1"}], ["1", "1"]
    )
    assert bad.total == 0.0 and bad.errors == [
        "math on record r0: KeyError: \"record has no field 'solution'\""
    ]
    assert good.total == 1.0 and good.errors == []


def test_a_function_that_cannot_be_imported_fails_at_build_time(tmp_path):
    with pytest.raises(ConfigError, match="cannot import nowhere"):
        build_reward([VerifierConfig(type="function", function="nowhere:score")], tmp_path)
    (tmp_path / "half.py").write_text("x = 1\n")
    with pytest.raises(ConfigError, match="has no function score"):
        build_reward([VerifierConfig(type="function", function="half:score")], tmp_path)
    with pytest.raises(ConfigError, match="not in"):  # an installed module is not the project's
        build_reward([VerifierConfig(type="function", function="json:dumps")], tmp_path)


def test_config_errors_name_their_key():
    with pytest.raises(ValidationError) as error:
        VerifierConfig(type="regex", pattern="(unclosed")
    assert error.value.errors()[0]["loc"] == ("pattern",)
    assert "not a valid regular expression" in str(error.value)
    with pytest.raises(ValidationError, match="module:function"):
        VerifierConfig(type="function", function="my_rewards.score")
    with pytest.raises(ValidationError, match="needs `pattern`"):
        VerifierConfig(type="format")
    with pytest.raises(ValidationError, match="needs `function"):
        VerifierConfig(type="function")
    with pytest.raises(ValidationError, match="Extra inputs"):
        VerifierConfig(type="math", tolerance=0.1)
    with pytest.raises(ConfigError, match="named 'a'"):
        build_reward([VerifierConfig(type="math", name="a"), VerifierConfig(type="exact", name="a")], ".")


def test_every_config_field_is_described():
    assert all(f.description for f in VerifierConfig.model_fields.values())


def test_code_runs_the_tests_against_the_completion_in_parallel():
    tests_as_list = ["assert add(2, 3) == 5", "assert add(-1, 1) == 0"]
    tests_as_code = "def test():\n    assert add(2, 2) == 4\ntest()\n"
    records = [
        {"tests": tests_as_list},
        {"tests": tests_as_code},
        {"tests": tests_as_list},
        {"tests": tests_as_list},
    ]
    completions = [
        "Here you go:\n```python\ndef add(a, b):\n    return a - b\n```\nFixed:\n```python\ndef add(a, b):\n"
        "    return a + b\n```\n",
        "def add(a, b):\n    return a + b\n",
        "```python\ndef add(a, b):\n    return a * b\n```",
        "```python\ndef add(a, b):\n    while True:\n        pass\n```",
    ]
    start = time.monotonic()
    results = _score([{"type": "code", "field": "tests", "timeout_s": 1}], records, completions)
    assert [r.total for r in results] == [1.0, 1.0, 0.0, 0.0]
    assert all(not r.errors for r in results)
    assert time.monotonic() - start < 10
