"""What every recipe section shares: unknown keys are errors, and cross-field rules report every problem."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

PositiveInt = Annotated[int, Field(gt=0)]


class RuleViolations(ValueError):
    """Raised by a cross-field rule; carries one (key path, message) per broken rule.

    Pydantic keeps the exception in the error's context, so the loader can report each problem
    at its own key path and YAML line instead of one message at the section.
    """

    def __init__(self, problems: list[tuple[str, str]]):
        super().__init__("; ".join(f"{path}: {msg}" for path, msg in problems))
        self.problems = problems


def check_rules(rules: list[tuple[bool, str, str]]) -> None:
    """Raise RuleViolations for every (broken, key path, message) whose condition holds."""
    problems = [(path, msg) for broken, path, msg in rules if broken]
    if problems:
        raise RuleViolations(problems)


class Section(BaseModel):
    """Base of every recipe section: unknown keys are an error, values are checked on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, use_attribute_docstrings=False)
