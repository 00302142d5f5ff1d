"""Errors that reach the user as a message and exit code 2, never as a traceback."""

from __future__ import annotations


class UserError(Exception):
    """A problem with what the user gave us (a recipe, a data row, a path, a flag).

    The message must say what is wrong, where (key path, file, line or row) and how to fix it.
    The CLI prints it without a traceback and exits with code 2.
    """

    exit_code = 2

    def __init__(self, message: str, *, problems: list[str] | None = None):
        super().__init__(message)
        self.problems = problems or []

    def render(self) -> str:
        """The full text shown to the user: the headline and one line per problem."""
        lines = [str(self)]
        lines += [f"  - {p}" for p in self.problems]
        return "\n".join(lines)
