"""User-facing errors.

A `UserError` is something the user can fix (a config value, a path, a missing package). The CLI prints
its message without a traceback and exits with code 2.
"""

from __future__ import annotations

import difflib


class UserError(Exception):
    """An error caused by user input; printed as one clear message, exit code 2."""

    exit_code = 2


class RunFailed(UserError):
    """A run that could not complete for a reason outside fedmole's code (a remote engine failed, its output
    is elsewhere); printed as one message with what to look at, exit code 1."""

    exit_code = 1


def did_you_mean(word: str, choices) -> str:
    """' (did you mean "x"?)' when `word` is close to one of `choices`, else ''."""
    match = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1, cutoff=0.6)
    return f' (did you mean "{match[0]}"?)' if match else ""
