"""Resolving recipe parameters for one tensor: filters, gradients, precedence (as mergekit).

A setting is a scalar, a gradient (a list of values spread evenly over a slice's layers and
interpolated linearly at ``t``), a ``{filter, value}`` condition, or a list of conditions (the
first whose ``filter`` is a substring of the tensor name wins; no filter or ``*`` matches all).
Settings are looked up from the most specific scope to the least: the model's own entry, the
slice, the recipe.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Iterable, Mapping
from typing import Any

from splice.merge.recipe import Conditional, Setting

MISSING = object()


def setting_value(setting: Setting, tensor_name: str, t: float) -> Any:
    """Value of ``setting`` for ``tensor_name`` at gradient position ``t`` in [0, 1].

    Returns ``MISSING`` when conditions exist but none matches the name.
    """
    if isinstance(setting, Conditional):
        setting = [setting]
    if isinstance(setting, list) and setting and all(isinstance(c, Conditional) for c in setting):
        for cond in setting:
            if cond.filter in (None, "*") or cond.filter in tensor_name:
                return setting_value(cond.value, tensor_name, t)
        return MISSING
    if isinstance(setting, list):
        if not setting:
            return MISSING
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in setting)
        if not numeric:  # booleans / strings pick a value, never interpolate
            return setting[int(t * (len(setting) - 1))]
        scaled = t * (len(setting) - 1)
        i0 = int(scaled)
        i1 = min(len(setting) - 1, i0 + 1)
        frac = scaled - i0
        return (1 - frac) * setting[i0] + frac * setting[i1]
    return setting


def resolve(
    name: str,
    scopes: Iterable[Mapping[str, Setting] | None],
    tensor_name: str,
    t: float,
) -> Any:
    """First value of parameter ``name`` found in ``scopes`` (most specific first), or MISSING."""
    for scope in scopes:
        if scope and name in scope:
            value = setting_value(scope[name], tensor_name, t)
            if value is not MISSING and value is not None:
                return value
    return MISSING


def coerce(value: Any, default: Any, what: str) -> Any:
    """Cast a resolved value to the type of the parameter's default (float when required)."""
    from splice.errors import SpliceError

    required = default is MISSING or default is None or default is inspect.Parameter.empty
    kind = float if required else type(default)
    try:
        if kind is bool:
            if isinstance(value, str):
                if value.lower() not in ("true", "false", "yes", "no", "1", "0"):
                    raise ValueError(value)
                return value.lower() in ("true", "yes", "1")
            if isinstance(value, (int, float)) and value in (0, 1):
                return bool(value)
            raise ValueError(value)
        if kind in (int, float):
            if isinstance(value, bool):
                raise ValueError(value)
            number = float(value)
            if not math.isfinite(number):
                raise SpliceError(f"{what}: {value!r} is not a finite number")
            return int(number) if kind is int else number
        return value if kind is object else kind(value)
    except (TypeError, ValueError):
        raise SpliceError(f"{what}: {value!r} is not a valid {kind.__name__}") from None
