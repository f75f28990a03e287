"""A labelled matrix of one metric (:class:`SimilarityMatrix`), the metrics' natural ranges and
null names, and the drawing helpers it shares with ``splice.analysis.report``.
"""

from __future__ import annotations

import math
import re
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.figure import Figure

#: metrics where lower means more similar (distances); heatmaps flip their colour map
DISTANCES = ("frobenius", "frobenius_rel", "angular_distance", "block_influence")

#: the natural range of each metric, used by ``scale="fixed"``; None: no bound (the data's
#: shared minimum or maximum is used). Unlisted metrics get the shared range.
RANGES: dict[str, tuple[float | None, float | None]] = {
    "cosine": (-1.0, 1.0),  # flattened weights: either sign
    "svd_cosine": (0.0, 1.0),  # singular values are >= 0
    "eig_cosine": (0.0, 1.0),  # eigenvalue moduli are >= 0
    "cka": (0.0, 1.0),
    "frobenius": (0.0, None),
    "frobenius_rel": (0.0, None),
    "angular_distance": (0.0, 1.0),  # arccos(cos) / pi
    "angular_distance_next": (0.0, 1.0),
    "io_cosine": (-1.0, 1.0),
    "block_influence": (0.0, 2.0),  # 1 - cosine
    "task_cosine": (-1.0, 1.0),  # analysis/tasks.py
    "sign_conflict": (0.0, 1.0),  # a fraction of entries
    "sign_conflict_elected": (0.0, 1.0),
    "topk_overlap": (0.0, 1.0),
    "delta_norm": (0.0, None),
    "delta_norm_rel": (0.0, None),
}

#: colour scales of :meth:`SimilarityReport.plot`: ``shared`` one range for all panels of the
#: figure (the default), ``fixed`` the metric's natural range (:data:`RANGES`), ``auto`` each
#: panel its own data's range
SCALES = ("shared", "fixed", "auto")

#: the null fields a record may carry, and how a legend names them
NULLS = {
    "baseline_gaussian": "Gaussian",
    "baseline_other_layer": "other layer",
    "baseline_other_token": "other token",
    "baseline_other_sample": "other sample",
}


def clean(x: Any) -> Any:
    """JSON-safe value: NaN/inf become None, numpy scalars become Python numbers."""
    if isinstance(x, (np.floating, float)):
        x = float(x)
        return x if math.isfinite(x) else None
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, dict):
        return {k: clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [clean(v) for v in x]
    return x


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_")


@dataclass
class SimilarityMatrix:
    """A labelled matrix ``values[rows, cols]`` of one metric, with its null baseline.

    ``baseline_gaussian`` is the mean of the metric between the row tensors and Gaussian
    matrices of their shapes and norms (None where not computed). ``col_baselines`` holds that
    null per column where the columns are different tensor kinds (a layers × kinds matrix):
    one mean over kinds would mix, say, norm vectors into the projections' null.
    """

    title: str
    metric: str
    values: np.ndarray
    rows: list[str]
    cols: list[str]
    row_name: str = "layer"
    col_name: str = "layer"
    baseline_gaussian: float | None = None
    panel: bool = True  # drawn by SimilarityReport.plot (False: data only, e.g. one per layer)
    col_baselines: list[float | None] | None = None  # Gaussian null per column (kinds)

    def __post_init__(self) -> None:
        self.values = np.asarray(self.values, dtype=np.float64)
        if self.values.shape != (len(self.rows), len(self.cols)):
            raise ValueError(
                f"{self.title}: values {self.values.shape} vs {len(self.rows)}×{len(self.cols)} labels"
            )
        if self.col_baselines is not None and len(self.col_baselines) != len(self.cols):
            raise ValueError(
                f"{self.title}: {len(self.col_baselines)} column baselines for {len(self.cols)} columns"
            )

    def to_frame(self) -> pd.DataFrame:
        """``DataFrame`` indexed by ``rows`` with one column per ``cols`` label."""
        import pandas as pd

        frame = pd.DataFrame(self.values, index=self.rows, columns=self.cols)
        frame.index.name, frame.columns.name = self.row_name, self.col_name
        return frame

    def to_dict(self) -> dict[str, Any]:
        return clean(
            {
                "title": self.title,
                "metric": self.metric,
                "rows": self.rows,
                "cols": self.cols,
                "row_name": self.row_name,
                "col_name": self.col_name,
                "values": self.values.tolist(),
                "baseline_gaussian": self.baseline_gaussian,
                "panel": self.panel,
                "col_baselines": self.col_baselines,
            }
        )

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SimilarityMatrix:
        values = np.array(
            [[np.nan if v is None else v for v in row] for row in d["values"]], dtype=np.float64
        ).reshape(len(d["rows"]), len(d["cols"]))
        return cls(
            d["title"],
            d["metric"],
            values,
            list(d["rows"]),
            list(d["cols"]),
            d.get("row_name", "layer"),
            d.get("col_name", "layer"),
            d.get("baseline_gaussian"),
            d.get("panel", True),
            d.get("col_baselines"),
        )

    def plot(
        self,
        ax: Any = None,
        *,
        annotate: bool | None = None,
        vmin: float | None = None,
        vmax: float | None = None,
        colorbar: bool = True,
        note: str | None = None,
    ) -> Figure:
        """Heatmap of the matrix (returns the Figure; draws on ``ax`` when given).

        ``vmin`` / ``vmax`` fix the colour range (default: this matrix's own minimum and
        maximum); values outside it take the end colours and the colour bar shows an arrow.
        ``note`` is a line added under the title.
        """
        if ax is None:
            fig = new_figure(self.size())
            ax = fig.subplots()
        else:
            fig = ax.figure
        cmap = "viridis_r" if self.metric in DISTANCES else "viridis"
        data = np.ma.masked_invalid(self.values)
        im = ax.imshow(data, cmap=cmap, aspect="auto", vmin=vmin, vmax=vmax)
        if colorbar:
            fig.colorbar(im, ax=ax, shrink=0.8, extend=colorbar_extend([self], *im.get_clim()))
        cols = self.cols
        if self.col_baselines is not None:
            cols = [
                f"{c} ({fmt_null(b)})" for c, b in zip(self.cols, self.col_baselines, strict=True)
            ]
        ax.set_xticks(range(len(cols)), cols, rotation=90 if len(self.cols) > 6 else 0)
        ax.set_yticks(range(len(self.rows)), self.rows)
        ax.set_xlabel(self.col_name)
        ax.set_ylabel(self.row_name)
        title = textwrap.fill(self.title, 64)
        if self.col_baselines is not None:
            title += f"\n(Gaussian baseline per {self.col_name} in brackets)"
        elif self.baseline_gaussian is not None:
            title += f"\n(Gaussian baseline {self.baseline_gaussian:.3g})"
        if note:
            title += f"\n{note}"
        ax.set_title(title, fontsize=9)
        if annotate or (annotate is None and self.values.size <= 64):
            finite = self.values[np.isfinite(self.values)]
            digits = 3 if finite.size and np.ptp(finite) < 0.1 else 2
            for (i, j), v in np.ndenumerate(self.values):
                if np.isfinite(v):
                    r, g, b, _ = im.cmap(im.norm(v))
                    ink = "k" if 0.299 * r + 0.587 * g + 0.114 * b > 0.5 else "w"
                    ax.text(
                        j, i, f"{v:.{digits}f}", ha="center", va="center", fontsize=6, color=ink
                    )
        return fig

    def size(self) -> tuple[float, float]:
        """A figure size (inches) that fits the matrix, its labels and its colour bar."""
        label = max((len(c) for c in self.cols), default=1) if len(self.cols) > 6 else 1
        return (
            min(2.5 + 0.4 * len(self.cols), 14),
            min(2.2 + 0.3 * len(self.rows) + 0.07 * label, 12),
        )


def colorbar_extend(mats: Sequence[SimilarityMatrix], lo: float | None, hi: float | None) -> str:
    """``extend`` for a colour bar: an arrow at each end some value lies beyond."""
    vs = [m.values[np.isfinite(m.values)] for m in mats]
    finite = np.concatenate(vs) if vs else np.array([])
    if not finite.size or lo is None or hi is None:
        return "neither"
    below, above = bool(finite.min() < lo), bool(finite.max() > hi)
    return {(True, True): "both", (True, False): "min", (False, True): "max"}.get(
        (below, above), "neither"
    )


def fmt_null(v: float | None) -> str:
    return "n/a" if v is None or not math.isfinite(v) else f"{v:.2g}"


def new_figure(size: tuple[float, float]) -> Figure:
    """A matplotlib Figure outside pyplot: no global state, no GUI backend, shown once in Jupyter."""
    from matplotlib.figure import Figure

    return Figure(figsize=size, layout="constrained")
