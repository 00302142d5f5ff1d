"""What every recipe section shares: unknown keys are errors, and cross-field rules report every problem."""

from __future__ import annotations

from functools import cache
from typing import Annotated, Any, get_args

from pydantic import BaseModel, ConfigDict, Field, model_validator

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
    """Base of every recipe section: unknown keys are an error, values are checked on assignment.

    Numbers are finite (`.inf` and `.nan` are refused), and a boolean is never read as a number:
    YAML turns `yes`, `no`, `on` and `off` into booleans, and pydantic would take `epochs: yes` as 1.
    """

    model_config = ConfigDict(
        extra="forbid", validate_assignment=True, use_attribute_docstrings=False, allow_inf_nan=False
    )

    @model_validator(mode="before")
    @classmethod
    def _no_boolean_numbers(cls, data: Any) -> Any:
        if isinstance(data, dict):
            check_rules(
                [
                    (
                        True,
                        key,
                        f"found the boolean {value!r} where a value of another type belongs (YAML reads true, "
                        "false, yes, no, on and off as booleans); write a number, or quote the word if you mean it",
                    )
                    for key, value in data.items()
                    if isinstance(key, str) and _holds_bool(value) and not _admits_bool(cls, key)
                ]
            )
        return data


def _holds_bool(value: Any) -> bool:
    return isinstance(value, bool) or (isinstance(value, list) and any(isinstance(v, bool) for v in value))


@cache
def _admits_bool(model: type[BaseModel], field: str) -> bool:
    """Whether the field's type has a boolean anywhere in it (then pydantic decides)."""
    info = model.model_fields.get(field)
    return info is None or _mentions_bool(info.annotation)


def _mentions_bool(annotation: Any) -> bool:
    if annotation is bool or annotation is Any:
        return True
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return False  # a sub-section checks its own fields
    return any(_mentions_bool(arg) for arg in get_args(annotation))
