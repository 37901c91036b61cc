"""Verifiable rewards for RL: score completions against their prompt records, a batch at a time.

    reward = build_reward(cfg.grpo.rewards, project_dir)
    results = reward.score(records, completions, ids)      # one RewardResult per completion
    results[0].total, results[0].parts["math"], results[0].errors

Scoring never raises for anything a record, a completion or a user function does: a verifier that fails
on one record scores 0 there and its error, naming the record id, lands in `errors`. Code verifiers run
the whole batch's programs in parallel processes (`llmctl.rl.sandbox`). Configuration mistakes (a user
function that cannot be imported, two verifiers with one name) are raised by `build_reward`, up front.
"""

from __future__ import annotations

import importlib
import math
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

from llmctl.config.rewards import VerifierConfig
from llmctl.errors import ConfigError
from llmctl.rl.sandbox import SandboxLimits, run_programs

REL_TOL = 1e-6
# A number as people write one: -1,234.5, 3/4, .5; thousands separators only in groups of three, so a
# list such as "1,2,3" is three numbers, not 123.
_NUMBER = (
    r"-?(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)?(?:\.\d+)?(?<=\d)(?:/(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?)?"
)
NUMBER = re.compile(r"(?<![\w.])" + _NUMBER)
FRAC = re.compile(r"\\d?frac\{([^{}]*)\}\{([^{}]*)\}")
FENCED_PYTHON = re.compile(r"```(?:python|py)[ \t]*\n(.*?)```", re.DOTALL)


@dataclass(frozen=True)
class RewardResult:
    """One completion's reward: the weighted total, each verifier's unweighted score, and what failed."""

    total: float
    parts: dict[str, float]
    errors: list[str]


def parse_number(text: str) -> float | None:
    """The number a string spells ("1,234", "-3/4", "0.5"), or None."""
    text = text.strip().replace(",", "")
    try:
        if "/" in text:
            numerator, denominator = text.split("/", 1)
            return float(Fraction(numerator) / Fraction(denominator))
        return float(text)
    except (ValueError, ZeroDivisionError):
        return None


def _last_boxed(text: str) -> str | None:
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 0, start + len("\\boxed")
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i + 1 : j]
    return None


def final_number(text: str) -> float | None:
    """The answer a solution ends with: after its last `####`, else in its last \\boxed{}, else its last number."""
    if "####" in text:
        found = NUMBER.search(text.rsplit("####", 1)[1])
        return parse_number(found.group()) if found else None
    boxed = _last_boxed(text)
    if boxed is not None:
        boxed = FRAC.sub(r"\1/\2", boxed)
        found = NUMBER.findall(boxed)
        return parse_number(found[-1]) if found else None
    found = NUMBER.findall(text)
    return parse_number(found[-1]) if found else None


def _normalise(text: str) -> str:
    return " ".join(str(text).split()).casefold()


def _references(value: Any) -> list[str]:
    return [str(v) for v in value] if isinstance(value, list | tuple) else [str(value)]


def score_math(reference: Any, completion: str) -> float:
    expected = final_number(str(reference))
    if expected is None:
        raise ValueError(f"reference {str(reference)[-60:]!r} holds no number")
    got = final_number(completion)
    return float(got is not None and math.isclose(got, expected, rel_tol=REL_TOL, abs_tol=1e-12))


def score_exact(reference: Any, completion: str) -> float:
    return float(_normalise(completion) in {_normalise(r) for r in _references(reference)})


def score_contains(reference: Any, completion: str) -> float:
    for ref in _references(reference):
        words = ref.split()
        if words and re.search(r"(?<!\w)" + r"\s+".join(map(re.escape, words)) + r"(?!\w)", completion, re.I):
            return 1.0
    return 0.0


def completion_code(completion: str) -> str:
    """The program in a completion: its last ```python fenced block, else the whole text."""
    blocks = FENCED_PYTHON.findall(completion)
    return blocks[-1] if blocks else completion


def code_program(tests: Any, completion: str) -> str:
    """The completion's code followed by its tests (a string of test code, or a list of assert lines)."""
    test_code = "\n".join(tests) if isinstance(tests, list | tuple) else str(tests)
    return f"{completion_code(completion)}\n\n# --- tests ---\n{test_code}\n"


def import_function(spec: str, project_dir: Path) -> Callable[[dict, str], float]:
    """Import `module:function` from the project folder (on sys.path only while importing)."""
    module_name, function_name = spec.split(":")
    folder = str(Path(project_dir).resolve())
    sys.path.insert(0, folder)
    try:
        module = importlib.import_module(module_name)
    except Exception as error:
        raise ConfigError(
            f"reward function {spec}: cannot import {module_name}: {type(error).__name__}: {error}",
            hint=f"put {module_name.replace('.', '/')}.py in {folder}",
        ) from None
    finally:
        sys.path.remove(folder)
    origin = Path(getattr(module, "__file__", "") or "").resolve()
    if not origin.is_relative_to(folder):
        raise ConfigError(f"reward function {spec}: module {module_name} is {origin}, not in {folder}")
    function = getattr(module, function_name, None)
    if not callable(function):
        raise ConfigError(f"reward function {spec}: {module_name} has no function {function_name}")
    return function


@dataclass(frozen=True)
class Verifier:
    """One configured verifier: `score_batch` returns a score or an exception per completion."""

    name: str
    weight: float
    config: VerifierConfig
    function: Callable[[dict, str], float] | None = None

    def _reference(self, record: dict) -> Any:
        if self.config.field not in record:
            raise KeyError(f"record has no field {self.config.field!r}")
        return record[self.config.field]

    def score_one(self, record: dict, completion: str) -> float:
        kind = self.config.type
        if kind in ("regex", "format"):
            found = (re.fullmatch if kind == "regex" else re.search)(
                self.config.pattern, completion.strip() if kind == "regex" else completion, re.DOTALL
            )
            return float(found is not None)
        if kind == "function":
            value = float(self.function(record, completion))
            if not math.isfinite(value):
                raise ValueError(f"returned {value}")
            return value
        return {"math": score_math, "exact": score_exact, "contains": score_contains}[kind](
            self._reference(record), completion
        )

    def score_batch(self, records: Sequence[dict], completions: Sequence[str]) -> list[float | Exception]:
        if self.config.type == "code":
            return self._score_code(records, completions)
        scores: list[float | Exception] = []
        for record, completion in zip(records, completions, strict=True):
            try:
                scores.append(self.score_one(record, completion))
            except Exception as error:  # a user's function or a bad record must not stop the step
                scores.append(error)
        return scores

    def _score_code(self, records: Sequence[dict], completions: Sequence[str]) -> list[float | Exception]:
        scores: list[float | Exception] = []
        programs: dict[int, str] = {}
        for i, (record, completion) in enumerate(zip(records, completions, strict=True)):
            try:
                programs[i] = code_program(self._reference(record), completion)
                scores.append(0.0)
            except Exception as error:
                scores.append(error)
        limits = SandboxLimits(cpu_s=self.config.timeout_s, memory_mb=self.config.memory_mb)
        for i, result in zip(programs, run_programs(list(programs.values()), limits), strict=True):
            scores[i] = float(result.ok)
        return scores


@dataclass(frozen=True)
class Reward:
    """Weighted verifiers; `score` gives one RewardResult per completion, in order."""

    verifiers: tuple[Verifier, ...]

    @property
    def names(self) -> list[str]:
        return [v.name for v in self.verifiers]

    def score(self, records: list[dict], completions: list[str], ids: list[str]) -> list[RewardResult]:
        assert len(records) == len(completions) == len(ids), (len(records), len(completions), len(ids))
        columns = [v.score_batch(records, completions) for v in self.verifiers]
        results = []
        for row, record_id in enumerate(ids):
            parts, errors = {}, []
            for verifier, column in zip(self.verifiers, columns, strict=True):
                value = column[row]
                if isinstance(value, Exception):
                    errors.append(f"{verifier.name} on record {record_id}: {type(value).__name__}: {value}")
                    value = 0.0
                parts[verifier.name] = value
            total = sum(v.weight * parts[v.name] for v in self.verifiers)
            results.append(RewardResult(total, parts, errors))
        return results


def build_reward(specs: list[VerifierConfig], project_dir: Path) -> Reward:
    """Verifiers from config; user functions are imported now, so a missing one fails before training."""
    if not specs:
        raise ConfigError("no reward verifiers configured", hint="add one, e.g. `- type: math`")
    verifiers, seen = [], set()
    for spec in specs:
        name = spec.name or spec.type
        if spec.name is None:
            suffix = 2
            while name in seen:
                name, suffix = f"{spec.type}_{suffix}", suffix + 1
        elif name in seen:
            raise ConfigError(f"two reward verifiers are named {name!r}", hint="give each a distinct `name`")
        seen.add(name)
        function = import_function(spec.function, project_dir) if spec.type == "function" else None
        verifiers.append(Verifier(name, spec.weight, spec, function))
    return Reward(tuple(verifiers))
