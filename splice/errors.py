"""The one exception type that means "the user gave us something wrong".

Anything raised as :class:`SpliceError` reaches the CLI as a single line on stderr and exit
code 2; every other exception is a bug and keeps its traceback.
"""

from __future__ import annotations


class SpliceError(Exception):
    """Bad input: a missing folder, an unknown name, a corrupt file, a recipe that cannot run.

    The message is one line that names the problem and, where possible, the fix.
    """


class SpliceWarning(UserWarning):
    """Something splice did that the user may not expect (a recipe key it ignored, as mergekit
    does); the CLI prints it as one ``splice: warning:`` line."""


def first_line(e: BaseException) -> str:
    """The first line of ``e``'s message, or its type's name when it has none: what a one-line
    error quotes of a library's exception."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
