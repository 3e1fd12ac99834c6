"""The one error type the commands report as a single line (exit status 2)."""

from __future__ import annotations


class UserError(Exception):
    """A problem with what the user gave (an option, a file, the data, a run folder).

    The message says what was wrong and what to do. Anything else that escapes is a bug and
    keeps its traceback.
    """
