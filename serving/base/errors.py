"""The one exception type for mistakes a user can make.

The CLI prints its message as one line and exits 2; the HTTP service maps its
own subclass to a 4xx. Anything else is our fault and keeps its traceback.
It lives in serving/, the base layer: training/ and the CLI raise it too.
"""
from __future__ import annotations

from collections.abc import Sequence


class UserError(Exception):
    """A problem with the user's input: bad option, missing file, wrong shape."""


def nearest(name: str, candidates: list[str], n: int = 5) -> str:
    """'; nearest: a, b, c' for an error line, or '' when nothing is close. Each candidate is named
    once, however often it comes (a run and its export share a name)."""
    import difflib  # noqa: PLC0415

    close = difflib.get_close_matches(name, list(dict.fromkeys(candidates)), n=n, cutoff=0.4)
    return f"; nearest: {', '.join(close)}" if close else ""


def choose(flag: str, value: str, choices: Sequence[str]) -> str:
    """`value` if it is one of `choices`, else one error line naming the nearest choice: the one
    check every named option goes through, so every such mistake reads the same."""
    if value in choices:
        return value
    raise UserError(f"unknown {flag} '{value}'{nearest(str(value), list(choices))}; choose from {', '.join(choices)}")
