"""Range checks of numeric options, shared by every verb and its Python function.

:func:`check_number` refuses a value that is not a number, not finite, not whole where a count
is asked for, or outside its limits, with one :class:`SpliceError` line that names the option
and the limit; the functions the CLI calls use it before they open a model, so Python callers
get the same check as the command line.
"""

from __future__ import annotations

import math
from typing import Any

from splice.errors import SpliceError

#: the largest seed a verb takes (torch, numpy and Python's random all accept it)
MAX_SEED = 2**32 - 1


def _num(x: float) -> str:
    return f"{x:g}" if isinstance(x, float) else str(x)


def check_number(
    name: str,
    value: Any,
    *,
    least: float | None = None,
    most: float | None = None,
    positive: bool = False,
    whole: bool = False,
    why: str | None = None,
) -> Any:
    """``value`` if it is a finite number (an ``int`` with ``whole``), above 0 with
    ``positive``, at least ``least`` and at most ``most``; else one :class:`SpliceError` line
    ``"<name> must be <what the limits say> (<why>), got <value>"``."""
    kinds = (int,) if whole else (int, float)
    ok = isinstance(value, kinds) and not isinstance(value, bool)
    ok = ok and (isinstance(value, int) or math.isfinite(value))  # a huge int is no float
    if ok:
        ok = (
            (not positive or value > 0)
            and (least is None or value >= least)
            and (most is None or value <= most)
        )
    if ok:
        return value
    what = (
        "a whole number" if whole else "a positive finite number" if positive else "a finite number"
    )
    if least is not None and most is not None:
        what += f" from {_num(least)} to {_num(most)}"
    elif least is not None:
        what += f" of {_num(least)} or more"
    elif most is not None:
        what += f", at most {_num(most)}"
    if why:
        what += f" ({why})"
    raise SpliceError(f"{name} must be {what}, got {value!r}")
