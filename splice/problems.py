"""Problems found while planning an output, and opening the models a plan reads.

A planner (a merge, a surgery) checks everything before any tensor is read and reports every
problem at once, one line per *cause*: :class:`Problems` groups the tensors a cause affects
("shape mismatch for X and 62 more tensors: ..."), so a hidden-size mismatch is one line, not
sixty-three.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from splice.checkpoint import Checkpoint, open_checkpoint
from splice.errors import SpliceError
from splice.sliced_check import refuse_sliced


class Problems:
    """Collects validation problems, grouped by cause; raises them together.

    ``add(cause, tensor)`` records that ``cause`` affects ``tensor`` (a name, perhaps with a
    detail such as its shapes); one line per cause is reported, naming the first tensor and
    counting the others. A cause may place the tensors itself with ``{tensors}``. Causes with
    ``first=True`` (shape mismatches: the models do not fit together) are reported before the
    others, whose trouble they often explain.
    """

    LIMIT = 12

    def __init__(self) -> None:
        self._causes: dict[str, dict[str, None]] = {}  # cause -> its tensors (an ordered set)
        self._first: set[str] = set()

    def add(self, cause: str, tensor: str | None = None, *, first: bool = False) -> None:
        tensors = self._causes.setdefault(cause, {})
        if tensor is not None:
            tensors.setdefault(tensor)
        if first:
            self._first.add(cause)

    @property
    def lines(self) -> list[str]:
        order = sorted(self._causes, key=lambda c: c not in self._first)  # stable
        return [self._line(c, list(self._causes[c])) for c in order]

    @staticmethod
    def _line(cause: str, tensors: list[str]) -> str:
        if not tensors:
            return cause
        more = len(tensors) - 1
        where = tensors[0] + (f" and {more} more tensor{'s' if more > 1 else ''}" if more else "")
        if "{tensors}" in cause:
            return cause.replace("{tensors}", where)
        return f"{cause} ({where})"

    def raise_if_any(self) -> None:
        lines = self.lines
        if lines:
            shown = lines[: self.LIMIT]
            if len(lines) > self.LIMIT:
                shown.append(f"... and {len(lines) - self.LIMIT} more problems")
            raise SpliceError("\n".join(shown))


DIMENSIONS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "moe_intermediate_size",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "num_local_experts",
    "num_experts",
)


def dimension_diff(a: Checkpoint, b: Checkpoint) -> str:
    """``hidden_size 32 vs 64, ...``: the size settings two models' configs disagree on."""
    return ", ".join(
        f"{k} {a.config.get(k)} vs {b.config.get(k)}"
        for k in DIMENSIONS
        if a.config.get(k) != b.config.get(k)
        and a.config.get(k) is not None
        and b.config.get(k) is not None
    )


def shape_mismatch(models: Mapping[str, Checkpoint], a: str, b: str, donor: bool = False) -> str:
    """The cause line (with ``{tensors}``) for tensors whose shapes differ between ``a`` and
    ``b`` (``donor``: ``a`` gives the output config), naming the config settings behind it."""
    diff = dimension_diff(models[a], models[b])
    if donor:
        what = f"tensors from {b} do not fit the output config, which is {a}'s"
    else:
        what = f"{a} and {b} disagree on tensor shapes"
    return f"shape mismatch for {{tensors}}: {what}" + (f" ({diff})" if diff else "")


def open_models(
    refs: Iterable[str],
    *,
    allow_pickle: bool = False,
    models: Mapping[str, Checkpoint] | None = None,
) -> dict[str, Checkpoint]:
    """Open every model in ``refs`` (lazy: headers only), reusing those in ``models``, for a
    merge (the opener of ``splice merge``, its ``moe`` recipes and evolve's sources).

    All models that cannot be opened are reported together, one line each; so are per-layer
    sliced models, which no merge may read (:func:`splice.sliced_check.refuse_sliced`).
    """
    out: dict[str, Checkpoint] = {}
    problems = Problems()
    for ref in refs:
        if models is not None and ref in models:
            out[ref] = models[ref]
        else:
            try:
                out[ref] = open_checkpoint(ref, allow_pickle=allow_pickle)
            except SpliceError as e:
                problems.add(f"model {ref}: {e}" if ref not in str(e) else str(e))
                continue
        try:
            refuse_sliced(out[ref], "merge", name=ref)
        except SpliceError as e:
            problems.add(str(e))
    problems.raise_if_any()
    return out
