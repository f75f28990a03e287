"""What a surgery did, declared once: the :class:`Report` protocol, the record file, and
:class:`SurgeryReport` (a depth operation: the layer map, the chosen layers, every candidate's
metric, and scores).

Every surgery verb returns a report that satisfies :class:`Report` (``SurgeryReport`` for
upscale / prune, ``HealReport``, ``CollapseReport``, ``SliceReport``): the CLI prints its
:meth:`~Report.summary` (or its :meth:`~Report.to_dict` with ``--json``), the model card holds
its :meth:`~Report.card_details`, and :func:`splice.surgery.depth.surgery_plan` writes its
:meth:`~Report.record` into the output folder as ``splice_surgery.json`` — one file name for
every verb, the JSON object with a ``kind`` field naming the report (``depth``, ``heal``,
``collapse``, ``slice``). :func:`read_record` reads it back (``splice heal --only-new-layers``
finds the layers up-scaling added there), and also the records older splice versions wrote:
without ``kind``, and a slicing's under ``splice_slicing.json``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol, runtime_checkable

from splice.errors import SpliceError
from splice.surgery.layermaps import format_ranges
from splice.text import plural

#: the record beside the weights of every surgery output (every verb, every kind)
RECORD = "splice_surgery.json"
#: record files older splice versions wrote, still read by :func:`read_record`, with the kind
#: each held
OLD_RECORDS = {"splice_slicing.json": "slice"}


@runtime_checkable
class Report(Protocol):
    """What every surgery report has.

    ``kind`` names the report in its record (``depth``, ``heal``, ``collapse``, ``slice``);
    ``operation`` is the command line that made it (``"prune --n 2 --by angular"``),
    ``source`` the input model, ``scores`` the evaluation numbers once scored
    (:meth:`splice.surgery.SurgeryResult.score` fills it)."""

    kind: ClassVar[str]
    operation: str
    source: str
    scores: dict[str, dict[str, float]]

    @property
    def title(self) -> str:
        """One line: the operation and what it changed (the card's title)."""
        ...

    def to_dict(self) -> dict[str, Any]:
        """The report's fields as plain JSON data (``--json`` prints it)."""
        ...

    def summary(self) -> str:
        """Plain text for the terminal."""
        ...

    def card_details(self) -> str:
        """Markdown for the model card."""
        ...

    def record(self) -> str:
        """The record file's text: :meth:`to_dict` with ``kind``, as JSON."""
        ...


class Recorded:
    """The part of :class:`Report` every report dataclass shares: :meth:`to_dict`,
    :meth:`record`, the score lines of a summary and the card's pointer to the record."""

    kind: ClassVar[str]
    scores: dict[str, dict[str, float]]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)  # type: ignore[call-overload]

    def record(self) -> str:
        data = {"kind": self.kind, **self.to_dict()}
        return json.dumps(data, indent=2, default=float) + "\n"

    def score_lines(self) -> list[str]:
        """``  name: metric value, ...`` per scored model (the end of a summary)."""
        return [
            f"  {name}: " + ", ".join(f"{k} {v:.4g}" for k, v in row.items())
            for name, row in self.scores.items()
        ]

    @staticmethod
    def record_line() -> str:
        """The card's last line."""
        return f"The full record is in `{RECORD}`."


@dataclass
class SurgeryReport(Recorded):
    """One depth operation on ``source`` (``num_layers`` layers).

    ``layers[j]`` is the source layer that output layer ``j`` copies; ``new_layers`` are the
    output positions that are added copies (a source layer's second occurrence, LLaMA-Pro's
    blocks), ``zeroed`` those whose residual writers are zero, ``removed`` the source layers that
    are gone. ``metric`` names what ``candidates`` hold (one dict per candidate: ``layers`` the
    first and last source layer of a block, or one layer, and ``value``) and ``chosen`` the
    source layers it selected. ``scores`` holds evaluation numbers once scored.
    """

    operation: str
    source: str
    num_layers: int
    layers: list[int]
    new_layers: list[int] = field(default_factory=list)
    zeroed: list[int] = field(default_factory=list)
    removed: list[int] = field(default_factory=list)
    metric: str | None = None
    better: str | None = None  # how the choice follows from the values: "the lowest is removed"
    candidates: list[dict[str, Any]] = field(default_factory=list)
    chosen: list[int] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)
    scores: dict[str, dict[str, float]] = field(default_factory=dict)

    kind: ClassVar[str] = "depth"

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SurgeryReport:
        names = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in names})

    @property
    def title(self) -> str:
        return f"{self.operation}: {self.num_layers} -> {plural(len(self.layers), 'layer')}"

    def _candidate_rows(self) -> list[tuple[str, float, bool]]:
        chosen = set(self.chosen)
        rows = []
        for c in self.candidates:
            a, b = c["layers"][0], c["layers"][-1]
            span = f"{a}" if a == b else f"{a}-{b}"
            hit = set(range(a, b + 1)) <= chosen if chosen else False
            rows.append((span, float(c["value"]), hit))
        return rows

    def summary(self) -> str:
        """Plain text for the terminal."""
        lines = [self.title, f"  output layers (source indices): {format_ranges(self.layers)}"]
        if self.new_layers:
            lines.append(f"  added copies at output positions: {format_ranges(self.new_layers)}")
        if self.zeroed:
            lines.append(
                f"  residual writers zeroed (output = source function): "
                f"{format_ranges(self.zeroed)}"
            )
        if self.removed:
            lines.append(f"  removed source layers: {format_ranges(self.removed)}")
        if self.candidates:
            lines.append(f"  {self.metric} of every candidate ({self.better}):")
            for span, value, hit in self._candidate_rows():
                lines.append(f"    layers {span:<9} {value:.6f}" + ("  <- chosen" if hit else ""))
        lines += self.score_lines()
        return "\n".join(lines)

    def card_details(self) -> str:
        """Markdown for the model card."""
        lines = [
            f"Operation: `{self.operation}` on `{self.source}` ({plural(self.num_layers, 'layer')} -> "
            f"{len(self.layers)}).",
            "",
            f"Output layers, as source layer indices: {format_ranges(self.layers)}.",
        ]
        if self.new_layers:
            lines.append(f"Added copies at output positions: {format_ranges(self.new_layers)}.")
        if self.zeroed:
            lines.append(
                "Residual writers (attention output and MLP down projections) zeroed at output "
                f"positions {format_ranges(self.zeroed)}: the model computes the source's function."
            )
        if self.removed:
            lines.append(f"Removed source layers: {format_ranges(self.removed)}.")
        if self.meta.get("calibration"):
            lines.append(
                f"Calibration: `{self.meta['calibration']}`, {self.meta.get('samples')} windows "
                f"of {self.meta.get('seq_len')} tokens."
            )
        if self.candidates:
            lines += ["", f"| layers | {self.metric} | chosen |", "|---|---:|---|"]
            for span, value, hit in self._candidate_rows():
                lines.append(f"| {span} | {value:.6f} | {'yes' if hit else ''} |")
        lines += ["", self.record_line()]
        return "\n".join(lines)


def _legacy_kind(data: dict[str, Any]) -> str:
    """The kind of a record written before records had one, from its fields."""
    if "num_experts" in data:
        return "collapse"
    if "new_hidden_size" in data:
        return "slice"
    if "losses" in data:
        return "heal"
    return "depth"


def read_record(folder: str | Path) -> dict[str, Any] | None:
    """The surgery record of a model folder, always with its ``kind`` (None if it has none).

    Reads ``splice_surgery.json``, or a record an older splice wrote: one without ``kind``
    (the kind is told from its fields) or a slicing's ``splice_slicing.json``."""
    folder = Path(folder)
    names = {RECORD: None, **OLD_RECORDS}
    for name, kind in names.items():
        path = folder / name
        if not path.is_file():
            continue
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise SpliceError(f"{path}: cannot read it ({e})") from None
        if not isinstance(data, dict):
            raise SpliceError(f"{path}: not a JSON object")
        if "kind" not in data:
            data = {"kind": kind or _legacy_kind(data), **data}
        return data
    return None
