"""The one error type users see: a clear message, no traceback, exit code 2."""
from __future__ import annotations


class UserError(Exception):
    """Bad input from the user: a file, a record or a setting that tunelab refuses.

    The message names the file, the line or record and the problem; the CLI prints it and exits with 2.
    """

    def __init__(self, problem: str, path: str | None = None, line: int | None = None):
        self.problem, self.path, self.line = problem, path, line
        where = path or ""
        if path and line is not None:
            where = f"{path}:{line}"
        super().__init__(f"{where}: {problem}" if where else problem)
