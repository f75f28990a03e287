"""What a merge method is: a registered pure function on the tensors of one name.

A method receives the tensors of one parameter name from the recipe's models (same shape, all
in the computation dtype, on the computation device), the base model's tensor (or ``None``),
and its validated parameters as keyword arguments, and returns the merged tensor. No I/O, no
device or dtype handling, no globals: the executor owns those.

Which models are in ``tensors`` (as in mergekit): for a method that uses a base
(``base="required"`` or ``"optional"`` with a base given), the models other than the base, in
recipe order, and the base separately; for a method with ``base="none"``, every model listed in
the recipe (the base model too, if it is listed) and ``base=None``.

Parameters come in two kinds, declared by the decorator:

* per-model parameters (``weight``, ``density``, ...) arrive as a ``list[float]`` aligned with
  ``tensors``; ``per_model`` maps each name to its default (``None``: the recipe must give it);
* global parameters (``t``, ``normalize``, ``lambda_``, ...) are the function's other
  keyword-only arguments, with the function's defaults (no default: required). A recipe key that
  is a Python keyword is spelled with a trailing underscore in Python (``lambda`` ->
  ``lambda_``).

A method may declare ``check``: a function of the resolved parameters (Python spellings, one
tensor's values) that yields ``(model index or None, problem)`` for values it cannot use
(weights that cannot be normalized, a density outside [0, 1]), and ``inputs``: how many models
it takes besides the base (min, max); the planner reports problems before anything runs.
Parameters annotated with a ``Literal`` accept only its values.

Stochastic methods (DARE, DELLA) also receive ``generator``, a ``torch.Generator`` seeded from the
recipe seed and the tensor name, so a merge is reproducible whatever the order or threads.

Example::

    @merge_method("linear", per_model={"weight": None})
    def linear(tensors, base, *, weight, normalize=True):
        ...
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from splice.registry import Registry

REQUIRED = inspect.Parameter.empty
BaseUse = Literal["required", "optional", "none"]

MethodFn = Callable[..., torch.Tensor]
Check = Callable[[dict[str, Any]], Iterable[tuple[int | None, str]]]


@dataclass(frozen=True)
class MergeMethod:
    """A registered method and what it accepts (see the module docstring)."""

    name: str
    fn: MethodFn
    base: BaseUse
    per_model: dict[str, float | None]
    global_params: dict[str, Any]  # name (recipe spelling) -> default, or REQUIRED
    stochastic: bool = False
    doc: str = field(default="", repr=False)
    choices: dict[str, tuple[Any, ...]] = field(default_factory=dict)  # Literal parameters
    check: Check | None = field(default=None, repr=False)
    inputs: tuple[int, int | None] = (1, None)  # how many models besides the base: min, max
    #: ``None``: planned tensor by tensor with ``fn``; else the planner that builds the output
    #: from whole layers ("layers": passthrough, layer_path) or experts ("moe")
    planner: str | None = None

    def count_problem(self, n: int, with_base: bool) -> str | None:
        """Why ``n`` models (besides the base, if ``with_base``) cannot be merged, or None."""
        lo, hi = self.inputs
        if lo <= n and (hi is None or n <= hi):
            return None
        count = f"exactly {lo}" if lo == hi else f"at least {lo}" if hi is None else f"{lo}-{hi}"
        models = "model" if (hi if hi is not None else lo) == 1 else "models"
        besides = " besides the base" if with_base else ""
        return f"{self.name} merges {count} {models}{besides}, got {n}"

    def problems(self, params: dict[str, Any]) -> list[tuple[int | None, str]]:
        """What is wrong with one tensor's resolved parameters: ``(model index, problem)``."""
        out: list[tuple[int | None, str]] = []
        for key, allowed in self.choices.items():
            value = params.get(self.python_name(key))
            if value is not None and value not in allowed:
                shown = ", ".join(str(a) for a in allowed)
                out.append((None, f"{key} {value!r} is not one of {shown}"))
        if self.check is not None:
            out += list(self.check(params))
        return out

    def __call__(
        self, tensors: Sequence[torch.Tensor], base: torch.Tensor | None, **params: Any
    ) -> torch.Tensor:
        return self.fn(list(tensors), base, **params)

    def python_name(self, key: str) -> str:
        """Keyword-argument spelling of a recipe parameter (``lambda`` -> ``lambda_``)."""
        return f"{key}_" if key in ("lambda",) else key


METHODS: Registry[MergeMethod] = Registry("merge method")


def merge_method(
    name: str,
    *,
    base: BaseUse = "optional",
    per_model: dict[str, float | None] | None = None,
    stochastic: bool = False,
    check: Check | None = None,
    inputs: tuple[int, int | None] = (1, None),
    planner: str | None = None,
) -> Callable[[MethodFn], MethodFn]:
    """Register ``fn`` as merge method ``name``; global parameters come from its signature.

    ``planner`` marks a method whose output is planned from whole layers or experts (copies),
    not tensor by tensor; ``fn`` then states what each copied tensor is, for the record.
    """
    per_model = dict(per_model or {})

    def register(fn: MethodFn) -> MethodFn:
        sig = inspect.signature(fn)
        choices = {
            key.rstrip("_"): typing.get_args(hint)
            for key, hint in _hints(fn).items()
            if typing.get_origin(hint) is Literal and key in sig.parameters
        }
        globals_: dict[str, Any] = {}
        for p in sig.parameters.values():
            if p.kind is not inspect.Parameter.KEYWORD_ONLY or p.name in per_model:
                continue
            if p.name == "generator":
                continue
            globals_[p.name.rstrip("_")] = p.default
        missing = [k for k in per_model if k not in sig.parameters]
        if missing:
            raise TypeError(f"{fn.__name__}: per-model parameter {missing[0]!r} not in signature")
        if stochastic and "generator" not in sig.parameters:
            raise TypeError(f"{fn.__name__}: stochastic methods take a `generator` argument")
        METHODS.register(name)(
            MergeMethod(
                name=name,
                fn=fn,
                base=base,
                per_model=per_model,
                global_params=globals_,
                stochastic=stochastic,
                doc=(fn.__doc__ or "").strip(),
                choices=choices,
                check=check,
                inputs=inputs,
                planner=planner,
            )
        )
        return fn

    return register


def _hints(fn: MethodFn) -> dict[str, Any]:
    """``fn``'s resolved annotations (none if they name what its module cannot resolve)."""
    try:
        return typing.get_type_hints(fn)
    except NameError:  # an annotation imported only for type checkers
        return {}


def cancels(weights: Sequence[float]) -> bool:
    """Whether ``weights`` sum to (about) 0, relative to their size: dividing by the sum would
    blow the result up (``|Σ w| <= 1e-6 Σ |w|``)."""
    return abs(sum(weights)) <= 1e-6 * sum(abs(w) for w in weights)


def shown(values: Sequence[float]) -> str:
    """``[1, -0.5]``: numbers as a recipe would write them."""
    return "[" + ", ".join(f"{v:g}" for v in values) + "]"
