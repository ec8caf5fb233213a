"""The one error type users see: a clear message, no traceback, exit code 2."""
from __future__ import annotations

import json

EXCERPT = 40  # characters of a user's value quoted in an error message


class UserError(Exception):
    """Bad input from the user: a file, a record or a setting that tunelab refuses.

    The message names the file, the line or record and the problem; the CLI prints it and exits with 2. `code` is
    the problem's kind as a short stable name (`bad-json`, `missing-label`, ...), given where the error is raised:
    `tunelab data check` reports it, and it never has to be guessed from the message's words, which quote the
    user's values. None where the problem has no kind of its own (check then says `invalid-record`).
    """

    def __init__(self, problem: str, path: str | None = None, line: int | None = None, code: str | None = None):
        self.problem, self.path, self.line, self.code = problem, path, line, code
        where = path or ""
        if path and line is not None:
            where = f"{path}:{line}"
        super().__init__(f"{where}: {problem}" if where else problem)


def excerpt(value, limit: int = EXCERPT) -> str:
    """A value quoted in an error: a string in quotes, anything else as JSON, cut to `limit` characters. An error
    message shows what is wrong with a record, never a file's content at length (it may travel to an API client)."""
    if isinstance(value, str):
        return repr(cut(value, limit))
    try:
        text = json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError, RecursionError):
        text = f"a {type(value).__name__}"
    return cut(text, limit)


def cut(text: str, limit: int = EXCERPT) -> str:
    """`text` shortened to `limit` characters, an ellipsis marking the cut."""
    return text if len(text) <= limit else text[:limit - 1] + "…"
