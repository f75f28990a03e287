"""What a surgery did: the layer map, the chosen layers, every candidate's metric, and scores.

A :class:`SurgeryReport` is returned by every surgery function, printed by the CLI, written into
the output folder as ``splice_surgery.json`` (so ``splice heal --only-new-layers`` knows which
layers up-scaling added) and summarised in the model card.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from splice.errors import SpliceError
from splice.surgery.layermaps import format_ranges

#: the record beside the weights of every surgery output
RECORD = "splice_surgery.json"


@dataclass
class SurgeryReport:
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

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SurgeryReport:
        names = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in names})

    @property
    def title(self) -> str:
        return f"{self.operation}: {self.num_layers} -> {len(self.layers)} layers"

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
        for name, row in self.scores.items():
            shown = ", ".join(f"{k} {v:.4g}" for k, v in row.items())
            lines.append(f"  {name}: {shown}")
        return "\n".join(lines)

    def card_details(self) -> str:
        """Markdown for the model card."""
        lines = [
            f"Operation: `{self.operation}` on `{self.source}` ({self.num_layers} layers -> "
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
        lines += ["", f"The full record is in `{RECORD}`."]
        return "\n".join(lines)

    def record(self) -> str:
        return json.dumps(self.to_dict(), indent=2, default=float) + "\n"


def read_record(folder: str | Path) -> dict[str, Any] | None:
    """The ``splice_surgery.json`` of a model folder (None if it has none)."""
    path = Path(folder) / RECORD
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise SpliceError(f"{path}: cannot read it ({e})") from None
    if not isinstance(data, dict):
        raise SpliceError(f"{path}: not a JSON object")
    return data
