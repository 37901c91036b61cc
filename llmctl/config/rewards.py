"""Reward verifiers in llmctl.yaml: how a completion is scored against its prompt record.

    grpo:
      rewards:
        - type: math                      # the final number vs the record's `answer` (GSM8K's `#### 72` too)
        - type: format
          pattern: "<answer>.*</answer>"
          weight: 0.2
        - type: code                      # `tests` holds asserts run against the completion's code
          field: tests
          timeout_s: 5
        - type: function
          function: my_rewards:brevity    # my_rewards.py in the project folder: f(record, completion) -> float

The total reward is the weighted sum of the verifiers' scores; `llmctl.rl.verifiers` builds and runs them.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator, model_validator

from llmctl.config.base import Section

VerifierType = Literal["math", "exact", "contains", "regex", "format", "code", "function"]
# `function` names a module in the project folder: dotted identifiers, a colon, one identifier.
FUNCTION_SPEC = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*$")


class VerifierConfig(Section):
    """One verifier: a score in [0, 1] (a user function may return any float), times its weight."""

    type: VerifierType = Field(
        description="math: the completion's final number (#### N, \\boxed{N} or the last number) equals the "
        "reference numerically; exact: equal after normalising case and whitespace; contains: the reference "
        "(or any of a list) appears as whole words; regex: `pattern` matches the whole (stripped) completion; "
        "format: `pattern` is found somewhere in it (e.g. an answer tag); code: the completion's Python passes the record's unit tests in a sandbox; "
        "function: a user function `module:function` from the project folder."
    )
    weight: float = Field(1.0, description="Multiplier of this verifier's score in the total reward.")
    field: str = Field(
        "answer",
        description="Record key holding the reference (the answer, the accepted strings, or the unit tests).",
    )
    pattern: str | None = Field(
        None,
        description="Regular expression (Python syntax, DOTALL) for regex and format; required by them.",
    )
    function: str | None = Field(
        None,
        description="`module:function` for type function: module.py in the project folder defining "
        "function(record, completion) -> float.",
    )
    timeout_s: float = Field(
        5.0, gt=0, le=600, description="code: CPU seconds per program (the wall clock allows one more)."
    )
    memory_mb: int = Field(512, ge=32, description="code: address-space limit per program, in MiB.")
    name: str | None = Field(
        None, description="Name of this verifier's metrics; defaults to its type (made unique by a suffix)."
    )

    @field_validator("pattern")
    @classmethod
    def _pattern_compiles(cls, pattern: str | None) -> str | None:
        if pattern is not None:
            try:
                re.compile(pattern)
            except re.error as error:
                raise ValueError(f"not a valid regular expression: {error}") from None
        return pattern

    @field_validator("function")
    @classmethod
    def _function_spec(cls, function: str | None) -> str | None:
        if function is not None and not FUNCTION_SPEC.match(function):
            raise ValueError(f"expected 'module:function' (e.g. my_rewards:score), got {function!r}")
        return function

    @model_validator(mode="after")
    def _required_by_type(self) -> VerifierConfig:
        if self.type in ("regex", "format") and self.pattern is None:
            raise ValueError(f"type {self.type} needs `pattern`")
        if self.type == "function" and self.function is None:
            raise ValueError("type function needs `function: module:function`")
        if self.pattern is not None and self.type not in ("regex", "format"):
            raise ValueError(f"`pattern` is only used by regex and format, not {self.type}")
        if self.function is not None and self.type != "function":
            raise ValueError(f"`function` is only used by type function, not {self.type}")
        return self
