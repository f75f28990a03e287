"""Results as data: :class:`SimilarityMatrix` and :class:`SimilarityReport`.

A report holds long-form ``records`` (one dict per tensor/layer and metric, with the null
baselines in fields whose names contain ``baseline``), labelled ``matrices`` (layers × layers,
layers × kinds, experts × experts, ...), ``recommendations`` and ``meta`` (models, device,
timings). ``.to_frame()`` gives pandas, ``.plot()`` a matplotlib Figure, ``.save(dir)`` writes
``report.json``, ``records.csv``, one CSV per matrix and PNG figures. pandas and matplotlib are
imported only inside those methods.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from splice.errors import SpliceError

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.figure import Figure

#: metrics where lower means more similar (distances); heatmaps flip their colour map
DISTANCES = ("frobenius", "frobenius_rel", "angular_distance", "block_influence")


def _clean(x: Any) -> Any:
    """JSON-safe value: NaN/inf become None, numpy scalars become Python numbers."""
    if isinstance(x, (np.floating, float)):
        x = float(x)
        return x if math.isfinite(x) else None
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_")


@dataclass
class SimilarityMatrix:
    """A labelled matrix ``values[rows, cols]`` of one metric, with its null baseline.

    ``baseline_gaussian`` is the mean of the metric between the row tensors and Gaussian
    matrices of their shapes and norms (None where not computed).
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

    def __post_init__(self) -> None:
        self.values = np.asarray(self.values, dtype=np.float64)
        if self.values.shape != (len(self.rows), len(self.cols)):
            raise ValueError(
                f"{self.title}: values {self.values.shape} vs {len(self.rows)}×{len(self.cols)} labels"
            )

    def to_frame(self) -> pd.DataFrame:
        """``DataFrame`` indexed by ``rows`` with one column per ``cols`` label."""
        import pandas as pd

        frame = pd.DataFrame(self.values, index=self.rows, columns=self.cols)
        frame.index.name, frame.columns.name = self.row_name, self.col_name
        return frame

    def to_dict(self) -> dict[str, Any]:
        return _clean(
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
        )

    def plot(self, ax: Any = None, *, annotate: bool | None = None) -> Figure:
        """Heatmap of the matrix (returns the Figure; draws on ``ax`` when given)."""
        if ax is None:
            size = (min(2 + 0.35 * len(self.cols), 14), min(1.5 + 0.3 * len(self.rows), 12))
            fig = _figure(size)
            ax = fig.subplots()
        else:
            fig = ax.figure
        cmap = "viridis_r" if self.metric in DISTANCES else "viridis"
        im = ax.imshow(np.ma.masked_invalid(self.values), cmap=cmap, aspect="auto")
        fig.colorbar(im, ax=ax, shrink=0.8)
        ax.set_xticks(range(len(self.cols)), self.cols, rotation=90 if len(self.cols) > 6 else 0)
        ax.set_yticks(range(len(self.rows)), self.rows)
        ax.set_xlabel(self.col_name)
        ax.set_ylabel(self.row_name)
        title = self.title
        if self.baseline_gaussian is not None:
            title += f"\n(Gaussian baseline {self.baseline_gaussian:.3g})"
        ax.set_title(title, fontsize=9)
        if annotate or (annotate is None and self.values.size <= 64):
            for (i, j), v in np.ndenumerate(self.values):
                if np.isfinite(v):
                    ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=6, color="w")
        return fig


@dataclass
class SimilarityReport:
    """Results of one analysis (``weights``, ``within``, ``experts`` or ``activations``)."""

    analysis: str
    models: list[str]
    records: list[dict[str, Any]] = field(default_factory=list)
    matrices: dict[str, SimilarityMatrix] = field(default_factory=dict)
    recommendations: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    # ---- access ----------------------------------------------------------------------------------
    def to_frame(self) -> pd.DataFrame:
        """The long-form records as a ``DataFrame`` (one row per tensor/layer and metric)."""
        import pandas as pd

        return pd.DataFrame.from_records(self.records)

    def metrics(self) -> list[str]:
        return list(dict.fromkeys(r["metric"] for r in self.records))

    def values(self, metric: str, **where: Any) -> list[dict[str, Any]]:
        """Records of ``metric`` whose fields equal ``where`` (e.g. ``kind="mlp.up_proj.weight"``)."""
        return [
            r
            for r in self.records
            if r["metric"] == metric and all(r.get(k) == v for k, v in where.items())
        ]

    # ---- persistence -----------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return _clean(
            {
                "analysis": self.analysis,
                "models": self.models,
                "meta": self.meta,
                "recommendations": self.recommendations,
                "records": self.records,
                "matrices": {k: m.to_dict() for k, m in self.matrices.items()},
            }
        )

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SimilarityReport:
        return cls(
            d["analysis"],
            list(d["models"]),
            list(d.get("records", [])),
            {k: SimilarityMatrix.from_dict(m) for k, m in d.get("matrices", {}).items()},
            dict(d.get("recommendations", {})),
            dict(d.get("meta", {})),
        )

    @classmethod
    def load(cls, path: str | Path) -> SimilarityReport:
        """Read a report saved by :meth:`save` (its folder or its ``report.json``)."""
        path = Path(path)
        if path.is_dir():
            path = path / "report.json"
        return cls.from_dict(json.loads(path.read_text()))

    def save(self, out: str | Path, *, figures: bool = True, overwrite: bool = True) -> list[Path]:
        """Write ``report.json``, ``records.csv``, ``matrices/*.csv`` and ``*.png`` into ``out``.

        The folder is built beside ``out`` and renamed into place at the end, so ``out`` holds
        either the complete new report or what it held before. An existing ``out`` is replaced
        only with ``overwrite`` and only if it is empty or holds nothing but a report's files
        (:func:`check_out`); otherwise ``SpliceError`` and nothing is touched. Returns the
        written paths (under ``out``).
        """
        out = check_out(out, overwrite=overwrite)
        full = Path(os.path.abspath(out))
        try:
            full.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{full.name}.report-tmp-", dir=full.parent))
        except OSError as e:
            raise SpliceError(
                f"{out}: cannot write it: {e.strerror or e}, nothing written"
            ) from None
        try:
            tmp.chmod(0o777 & ~_umask())
            written = [p.relative_to(tmp) for p in self._write(tmp, figures)]
            _commit(tmp, full)
        except OSError as e:
            raise SpliceError(
                f"{out}: cannot write it: {e.strerror or e}, nothing written"
            ) from None
        finally:
            shutil.rmtree(tmp, ignore_errors=True)  # gone already after a successful rename
        return [out / p for p in written]

    def _write(self, out: Path, figures: bool) -> list[Path]:
        """The report's files into the (new, empty) folder ``out``."""
        written = [out / "report.json", out / "records.csv"]
        written[0].write_text(json.dumps(self.to_dict(), indent=1) + "\n")
        _write_csv(written[1], self.records)
        if self.matrices:
            (out / "matrices").mkdir(exist_ok=True)
        for key, m in self.matrices.items():
            path = out / "matrices" / f"{_slug(key)}.csv"
            header = [m.row_name + "\\" + m.col_name, *m.cols]
            rows = [
                [label, *(_fmt(v) for v in row)]
                for label, row in zip(m.rows, m.values, strict=True)
            ]
            path.write_text("\n".join(",".join(map(str, r)) for r in [header, *rows]) + "\n")
            written.append(path)
        if figures:
            try:
                import matplotlib  # noqa: F401
            except ImportError:
                raise SpliceError(
                    "figures need matplotlib (pip install 'splice[analysis]'); or pass --no-figures"
                ) from None
            for metric in self.plot_metrics():
                path = out / f"{_slug(self.analysis + '_' + metric)}.png"
                self.plot(metric).savefig(path, dpi=90)
                written.append(path)
        return written

    # ---- figures ---------------------------------------------------------------------------------
    def plot_metrics(self) -> list[str]:
        """Metrics :meth:`plot` can draw (one figure each)."""
        panels = [m.metric for m in self.matrices.values() if m.panel]
        lines = [
            m
            for m in self.metrics()
            if m not in panels and any(r.get("layer") is not None for r in self.values(m))
        ]
        return list(dict.fromkeys(panels + lines))

    def plot(self, metric: str | None = None, *, max_panels: int = 12) -> Figure:
        """A Figure for ``metric`` (default: the first): heatmaps of its matrices, or lines.

        Matrices of the metric are drawn as heatmaps side by side (at most ``max_panels``);
        activation reports add the per-layer lines (input/output cosine, block influence).
        """
        metric = metric or self.plot_metrics()[0]
        mats = [m for m in self.matrices.values() if m.metric == metric and m.panel]
        mats = mats[:max_panels]
        if not mats:
            return self._line_plot(metric)
        cols = min(len(mats), 3)
        rows = math.ceil(len(mats) / cols)
        fig = _figure((5.2 * cols, 4.2 * rows))
        axes = fig.subplots(rows, cols, squeeze=False)
        for ax, m in zip(axes.flat, mats, strict=False):
            m.plot(ax=ax)
        for ax in list(axes.flat)[len(mats) :]:
            ax.set_visible(False)
        fig.suptitle(self._title(metric), fontsize=10)
        return fig

    def _title(self, metric: str) -> str:
        """``analysis: metric — A vs B`` with models by their shortest distinct path tails."""
        return f"{self.analysis}: {metric} — {' vs '.join(short_names(self.models))}"

    def _line_plot(self, metric: str) -> Figure:
        """One line per ``kind`` (or a single line) of ``metric`` against the layer index."""
        fig = _figure((7, 4))
        ax = fig.subplots()
        groups: dict[str, list[dict[str, Any]]] = {}
        for r in self.values(metric):
            if r.get("layer") is not None:
                groups.setdefault(str(r.get("kind", metric)), []).append(r)
        for label, rs in groups.items():
            rs = sorted(rs, key=lambda r: r["layer"])
            ax.plot([r["layer"] for r in rs], [r["value"] for r in rs], marker=".", label=label)
            base = [r.get("baseline_gaussian") for r in rs]
            if all(b is not None for b in base):
                ax.plot([r["layer"] for r in rs], base, ls="--", lw=0.8, color="grey")
        ax.set_xlabel("layer")
        ax.set_ylabel(metric)
        ax.set_title(self._title(metric), fontsize=10)
        if len(groups) > 1:
            ax.legend(fontsize=7)
        return fig

    # ---- text ------------------------------------------------------------------------------------
    def summary(self, max_rows: int = 40) -> str:
        """A short plain-text table: mean of each metric per kind, with its Gaussian baseline."""
        lines = [f"{self.analysis}: {' vs '.join(self.models)}"]
        metrics = self.metrics()
        if self.records and "kind" in self.records[0]:
            groups = list(dict.fromkeys((r["kind"], r.get("against")) for r in self.records))
            label = {g: g[0] + (f" vs {g[1]}" if g[1] else "") for g in groups}
            width = max(len(k) for k in [*label.values(), "kind"])
            table: list[list[tuple[str, str] | None]] = []  # (value, null); None: n/a
            for kind, against in groups[:max_rows]:
                row: list[tuple[str, str] | None] = []
                for m in metrics:
                    rs = self.values(m, kind=kind, against=against)
                    v = _mean(r["value"] for r in rs)
                    b = _mean(r.get("baseline_gaussian") for r in rs)
                    row.append(None if math.isnan(v) else (_fmt(v), _fmt(b)))
                table.append(row)
            # widths from the cells, so long nulls (-0.0004173) keep the columns aligned
            cols = [[r[j] for r in table if r[j]] or [("", "")] for j in range(len(metrics))]
            wv = [max(len(v) for v, _ in c) for c in cols]
            wb = [max(len(b) for _, b in c) for c in cols]
            wc = [max(len(m), v + b + 8) for m, v, b in zip(metrics, wv, wb, strict=True)]
            lines.append(
                f"{'kind':<{width}}  "
                + "  ".join(f"{m:>{w}}" for m, w in zip(metrics, wc, strict=True))
            )
            for (kind, against), row in zip(groups[:max_rows], table, strict=True):
                cells = [
                    (f"{c[0]:>{wv[j]}} (null {c[1]:>{wb[j]}})" if c else "n/a").rjust(wc[j])
                    for j, c in enumerate(row)
                ]
                lines.append(f"{label[kind, against]:<{width}}  " + "  ".join(cells))
            if len(groups) > max_rows:
                lines.append(f"... {len(groups) - max_rows} more kinds in records.csv")
        elif self.records:
            lines.append("layer  " + "  ".join(f"{m:>18}" for m in metrics))
            layers = sorted({r["layer"] for r in self.records if r.get("layer") is not None})
            for layer in layers[:max_rows]:
                cells = [
                    _fmt(_mean(r["value"] for r in self.values(m, layer=layer))) for m in metrics
                ]
                lines.append(f"{layer:>5}  " + "  ".join(f"{c:>18}" for c in cells))
        for key, value in self.recommendations.items():
            short_list = isinstance(value, list) and 0 < len(value) <= 8
            if isinstance(value, (str, int, float)) or (
                short_list and all(isinstance(v, (int, list)) for v in value)
            ):
                lines.append(f"{key}: {value}")
        if "seconds" in self.meta:
            lines.append(f"time: {self.meta['seconds']:.1f} s")
        return "\n".join(lines)


def short_names(paths: Sequence[str]) -> list[str]:
    """The last path component of each model, or more components where two would clash.

    ``["/x/zoo/base", "/x/zoo/math"]`` -> ``["base", "math"]``;
    ``["/a/run1/final", "/a/run2/final"]`` -> ``["run1/final", "run2/final"]``.
    """
    parts = [Path(str(p).rstrip("/")).parts or (str(p),) for p in paths]
    for n in range(1, max((len(p) for p in parts), default=1) + 1):
        names = ["/".join(p[-n:]) for p in parts]
        if len(set(names)) == len(names):
            return names
    return [str(p) for p in paths]


def _figure(size: tuple[float, float]) -> Figure:
    """A matplotlib Figure outside pyplot: no global state, no GUI backend, shown once in Jupyter."""
    from matplotlib.figure import Figure

    return Figure(figsize=size, layout="constrained")


def _mean(values: Any) -> float:
    vs = [v for v in values if v is not None and math.isfinite(v)]
    return sum(vs) / len(vs) if vs else float("nan")


def _fmt(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        if not math.isfinite(v):
            return "nan" if math.isnan(v) else str(v)
        return f"{v:.4g}"
    return str(v)


def _write_csv(path: Path, records: list[dict[str, Any]]) -> None:
    import csv

    keys = list(dict.fromkeys(k for r in records for k in r))
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        for r in records:
            w.writerow({k: "" if r.get(k) is None else r.get(k) for k in keys})


# ---- the output folder ---------------------------------------------------------------------------
def _report_file(name: str) -> bool:
    return name in ("report.json", "records.csv") or name.endswith(".png")


def _not_a_report(folder: Path) -> str | None:
    """Why ``folder`` may not be replaced by a report, or ``None`` (empty, or a report)."""
    try:
        entries = list(os.scandir(folder))
        for e in entries:
            if e.name == "matrices" and e.is_dir(follow_symlinks=False):
                bad = [m.name for m in os.scandir(e.path) if not m.name.endswith(".csv")]
                if bad:
                    return f"it holds matrices/{bad[0]}, which is not part of a report"
            elif not (_report_file(e.name) and e.is_file(follow_symlinks=False)):
                return f"it holds {e.name!r}, which is not part of a report"
    except OSError as e:
        return f"cannot list it ({e.strerror or e})"
    return None


def check_out(out: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
    """Validate a report folder before any work; ``SpliceError`` (one line) if it may not be used.

    Refused: an empty path; a path under something that is not a folder; an existing file;
    an existing folder without ``overwrite``; with ``overwrite``, a folder holding anything but
    a report's files (``report.json``, ``records.csv``, ``*.png``, ``matrices/*.csv``).
    """
    if str(out).strip() == "":
        raise SpliceError("--out is empty: give a folder name")
    out = Path(out)
    full = Path(os.path.abspath(out))
    for up in full.parents:
        if up.exists():
            if not up.is_dir():
                raise SpliceError(f"{out}: cannot be created: {up} is not a folder")
            if not os.access(up, os.W_OK | os.X_OK):
                raise SpliceError(f"{out}: cannot be created: {up} is not writable")
            break
    if out.is_symlink() and not out.exists():
        raise SpliceError(f"{out}: is a broken symbolic link")
    if out.exists():
        if not out.is_dir():
            raise SpliceError(f"{out}: exists and is not a folder (--out names a folder)")
        if not overwrite:
            raise SpliceError(f"{out}: already exists (pass --overwrite to replace it)")
        reason = _not_a_report(out)
        if reason is not None:
            raise SpliceError(f"{out}: --overwrite refused: {reason}; nothing was deleted")
    return out


def _commit(tmp: Path, target: Path) -> None:
    """Rename the finished folder ``tmp`` to ``target``; an old ``target`` goes only after."""
    if not target.exists():
        os.replace(tmp, target)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{target.name}.report-old-", dir=target.parent))
    os.replace(target, old)  # onto the empty folder mkdtemp made
    try:
        os.replace(tmp, target)
    except OSError:
        os.replace(old, target)  # put the old report back
        raise
    shutil.rmtree(old, ignore_errors=True)


def _umask() -> int:
    try:  # read, not set: setting it would race with threads creating files
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
