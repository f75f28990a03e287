"""Results as data: :class:`SimilarityReport` (its matrices: ``splice.analysis.matrix``).

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
import shutil
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from splice.analysis.matrix import (
    NULLS,
    RANGES,
    SCALES,
    SimilarityMatrix,
    clean,
    colorbar_extend,
    new_figure,
    slug,
)
from splice.errors import SpliceError
from splice.target import check_target, clean_stale, commit, lock_target, os_error, staging_dir

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.figure import Figure


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
        return clean(
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

    def save(
        self,
        out: str | Path,
        *,
        figures: bool = True,
        overwrite: bool = True,
        scale: str = "shared",
    ) -> list[Path]:
        """Write ``report.json``, ``records.csv``, ``matrices/*.csv`` and ``*.png`` into ``out``.

        ``scale`` is the figures' colour scale (:data:`SCALES`, see :meth:`plot`).

        The folder is built beside ``out`` and swapped into place at the end
        (:func:`splice.target.commit`), so ``out`` holds either the complete new report or what
        it held before; a second writer into ``out`` is refused while this one holds it. An
        existing ``out`` is replaced only with ``overwrite`` and only if it is empty or holds
        nothing but a report's files (:func:`check_out`); otherwise ``SpliceError`` and nothing
        is touched. Returns the written paths (under ``out``).
        """
        check_scale(scale)
        with lock_target(out):
            clean_stale(Path(out))  # first: it may put back a report a killed run set aside
            out = check_out(out, overwrite=overwrite)
            tmp = staging_dir(out, "report")
            try:
                written = [p.relative_to(tmp) for p in self._write(tmp, figures, scale)]
                commit(tmp, out, tag="report")
            except OSError as e:
                raise os_error(out, e, "write") from None
            finally:
                shutil.rmtree(tmp, ignore_errors=True)  # gone already after a successful swap
        return [out / p for p in written]

    def _write(self, out: Path, figures: bool, scale: str = "shared") -> list[Path]:
        """The report's files into the (new, empty) folder ``out``."""
        written = [out / "report.json", out / "records.csv"]
        written[0].write_text(json.dumps(self.to_dict(), indent=1) + "\n")
        _write_csv(written[1], self.records)
        if self.matrices:
            (out / "matrices").mkdir(exist_ok=True)
        for key, m in self.matrices.items():
            path = out / "matrices" / f"{slug(key)}.csv"
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
                path = out / f"{slug(self.analysis + '_' + metric)}.png"
                self.plot(metric, scale=scale).savefig(path, dpi=90)
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

    def limits(self, metric: str, scale: str = "shared") -> tuple[float | None, float | None]:
        """The colour range ``(vmin, vmax)`` of ``metric``'s figure under ``scale``.

        ``shared``: the minimum and maximum over every panel of the metric (or over its
        records' values where it has no panel); ``fixed``: the metric's natural range
        (:data:`RANGES`; an open end, or an unlisted metric, takes the shared value);
        ``auto``: ``(None, None)``, each panel its own range.
        """
        check_scale(scale)
        if scale == "auto":
            return None, None
        mats = [m for m in self.matrices.values() if m.metric == metric and m.panel]
        if mats:
            finite = np.concatenate([m.values[np.isfinite(m.values)] for m in mats])
        else:
            vs = [r.get("value") for r in self.values(metric)]
            finite = np.array([v for v in vs if v is not None and math.isfinite(v)], dtype=float)
        lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (None, None)
        if scale == "fixed":
            fixed_lo, fixed_hi = RANGES.get(metric, (None, None))
            lo = fixed_lo if fixed_lo is not None else lo
            hi = fixed_hi if fixed_hi is not None else hi
        return lo, hi

    def plot(
        self,
        metric: str | None = None,
        *,
        scale: str = "shared",
        vmin: float | None = None,
        vmax: float | None = None,
        max_panels: int = 12,
    ) -> Figure:
        """A Figure for ``metric`` (default: the first): heatmaps of its matrices, or lines.

        Matrices of the metric are drawn as heatmaps side by side (at most ``max_panels``);
        activation reports add the per-layer lines (input/output cosine, block influence) with
        their nulls, standard errors (where the records carry them) and the recommended
        block. ``scale`` (:meth:`limits`) sets the colours: ``shared`` (default) one range and
        one colour bar for every panel, so panels compare; ``fixed`` the metric's natural
        range; ``auto`` each panel its own. ``vmin`` / ``vmax`` override either end (pass
        :func:`shared_limits` of several reports to compare them). On line plots they set the
        y range, and ``fixed`` the metric's range.
        """
        metric = metric or self.plot_metrics()[0]
        lo, hi = self.limits(metric, scale)
        lo, hi = (vmin if vmin is not None else lo), (vmax if vmax is not None else hi)
        if lo is not None and hi is not None and lo > hi:
            raise SpliceError(f"vmin {lo} is above vmax {hi}")
        all_mats = [m for m in self.matrices.values() if m.metric == metric and m.panel]
        mats = all_mats[:max_panels]
        if not mats:
            fixed = scale == "fixed" or vmin is not None or vmax is not None
            return self._line_plot(metric, (lo, hi) if fixed else (None, None))
        cols = min(len(mats), 3)
        rows = math.ceil(len(mats) / cols)
        w, h = (max(s) for s in zip(*(m.size() for m in mats), strict=True))
        fig = new_figure((w * cols, h * rows + 0.4))
        axes = fig.subplots(rows, cols, squeeze=False)
        one_bar = lo is not None and hi is not None
        for ax, m in zip(axes.flat, mats, strict=False):
            m.plot(ax=ax, vmin=lo, vmax=hi, colorbar=not one_bar, note=self._panel_note(m))
            self._mark_matrix(ax, m)
        used = list(axes.flat)[: len(mats)]
        for ax in list(axes.flat)[len(mats) :]:
            ax.set_visible(False)
        if one_bar:
            fig.colorbar(
                used[0].images[0],
                ax=used,
                shrink=0.8 if rows > 1 else 0.95,
                extend=colorbar_extend(all_mats, lo, hi),
                label=f"{metric} ({'shared' if scale == 'shared' else scale} scale)"
                if vmin is None and vmax is None
                else metric,
            )
        fig.suptitle(self._title(metric), fontsize=10)
        return fig

    def _title(self, metric: str) -> str:
        """``analysis: metric — A vs B`` with models by their shortest distinct path tails."""
        names = " vs ".join(short_names(self.models))
        return textwrap.fill(f"{self.analysis}: {metric} — {names}", 90)

    def _panel_note(self, m: SimilarityMatrix) -> str | None:
        """The null of an activation heatmap (no Gaussian there): another sample's distance."""
        if m.metric == "angular_distance" and m.row_name == "n":
            b = _mean(r.get("baseline_other_sample") for r in self.values("angular_distance_next"))
            if math.isfinite(b):
                return f"null (other sample, n = 1): {b:.3g}; framed: the block to prune per n"
        return None

    def _mark_matrix(self, ax: Any, m: SimilarityMatrix) -> None:
        """On the d(l, l+n) heatmap: a frame on each n's block to prune, a thick one on the chosen."""
        from matplotlib.patches import Rectangle

        blocks = self.recommendations.get("prune_blocks")
        if not (m.metric == "angular_distance" and m.row_name == "n" and blocks):
            return
        chosen = self._chosen_block()
        for b in blocks:
            if str(b["n"]) in m.rows and str(b["start"]) in m.cols:
                y, x = m.rows.index(str(b["n"])), m.cols.index(str(b["start"]))
                thick = chosen is not None and b["n"] == chosen["n"]
                frame = Rectangle(
                    (x - 0.5, y - 0.5),
                    1,
                    1,
                    fill=False,
                    ec="red",
                    lw=3 if thick else 1.2,
                    clip_on=False,  # a frame on the first row stays whole
                    gid="recommended_block" if thick else "recommended",
                )
                ax.add_patch(frame)

    def _chosen_block(self) -> dict[str, Any] | None:
        """The block of L // 4 layers to prune (the one the summary prints), or None."""
        blocks = self.recommendations.get("prune_blocks") or []
        n_layers = self.meta.get("num_layers") or len(blocks) + 1
        quarter = max(1, n_layers // 4)
        return next((b for b in blocks if b.get("n") == quarter), None)

    def _line_plot(self, metric: str, ylim: tuple[float | None, float | None]) -> Figure:
        """One line per ``kind`` (or a single line) of ``metric`` against the layer index.

        Standard errors (a record's ``se``, ``value_se`` or ``<metric>_se``) are error bars;
        each null is a grey band from its lowest to its highest value over the layers, with a
        dashed line at its mean; on activation reports the block to prune is a shaded span and
        the layer this metric would drop first a star.
        """
        fig = new_figure((7.5, 4.2))
        ax = fig.subplots()
        groups: dict[str, list[dict[str, Any]]] = {}
        for r in self.values(metric):
            if r.get("layer") is not None and r.get("value") is not None:
                groups.setdefault(str(r.get("kind", metric)), []).append(r)
        with_se = False
        for label, rs in groups.items():
            rs = sorted(rs, key=lambda r: r["layer"])
            xs, ys = [r["layer"] for r in rs], [r["value"] for r in rs]
            (line,) = ax.plot(xs, ys, marker=".", label=label)
            se = [_stderr(r, metric) for r in rs]
            if any(e is not None for e in se):
                ax.errorbar(
                    xs,
                    ys,
                    yerr=[0.0 if e is None else e for e in se],
                    fmt="none",
                    ecolor=line.get_color(),
                    elinewidth=1,
                    capsize=3,
                    label=None if with_se else "± 1 standard error",
                )
                with_se = True
        self._draw_nulls(ax, metric)
        self._mark_line(ax, metric, groups)
        ax.set_xlabel("layer")
        ax.set_ylabel(metric)
        if ylim != (None, None):
            ax.set_ylim(*ylim)
        ax.set_title(self._title(metric), fontsize=10)
        ax.legend(fontsize=7, loc="best")
        return fig

    def _draw_nulls(self, ax: Any, metric: str) -> None:
        """Each null of ``metric`` (over its layers and kinds): a band from min to max, its mean."""
        shades = iter([("0.55", "--"), ("tab:brown", ":"), ("0.3", "-.")])
        for key, name in NULLS.items():
            vs = [r.get(key) for r in self.values(metric) if r.get("layer") is not None]
            vs = [v for v in vs if v is not None and math.isfinite(v)]
            if not vs:
                continue
            colour, style = next(shades, ("0.55", "--"))
            lo, hi, mean = min(vs), max(vs), sum(vs) / len(vs)
            span = (
                f" (layers {lo:.2g} to {hi:.2g})" if hi - lo > 1e-3 * max(abs(mean), 1e-9) else ""
            )
            if hi > lo:
                ax.axhspan(lo, hi, color=colour, alpha=0.15, lw=0, gid=f"null_band:{key}")
            ax.axhline(
                mean,
                color=colour,
                ls=style,
                lw=1,
                gid=f"null:{key}",
                label=f"null, {name}: {mean:.3g}{span}",
            )

    def _mark_line(self, ax: Any, metric: str, groups: dict[str, list[dict[str, Any]]]) -> None:
        """The block to prune (span) and the layer ``metric`` itself would drop first (star)."""
        chosen = self._chosen_block()
        if chosen is not None:
            a, b = chosen["layers"]
            ax.axvspan(
                a - 0.5,
                b + 0.5,
                color="tab:orange",
                alpha=0.18,
                lw=0,
                gid="recommended_block",
                label=f"prune {chosen['n']}: layers {a}-{b} (min angular distance)",
            )
        first = _first_pick(self.recommendations, metric)
        rs = next(iter(groups.values()), []) if len(groups) == 1 else []
        y = next((r["value"] for r in rs if r["layer"] == first), None)
        if first is not None and y is not None:
            ax.plot(
                [first],
                [y],
                "*",
                ms=13,
                color="tab:red",
                ls="none",
                gid="recommended",
                label=f"first to drop by {metric}: layer {first}",
            )

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


def null_per(
    records: Sequence[dict[str, Any]],
    metric: str,
    by: str = "kind",
    null: str = "baseline_gaussian",
) -> dict[Any, float | None]:
    """Mean of the ``null`` field of ``metric``'s per-layer records, per value of ``by``.

    None for a group with no finite null (e.g. a spectrum metric on norm vectors). One mean
    per kind, not over all kinds: norm vectors and projections have different nulls.
    """
    out: dict[Any, list[float]] = {}
    for r in records:
        if r.get("metric") == metric and r.get("layer") is not None:
            v = r.get(null)
            vs = out.setdefault(r.get(by), [])
            if v is not None and math.isfinite(v):
                vs.append(float(v))
    return {k: (sum(vs) / len(vs) if vs else None) for k, vs in out.items()}


def check_scale(scale: str) -> str:
    if scale not in SCALES:
        raise SpliceError(f"scale {scale!r}: choose from {', '.join(SCALES)}")
    return scale


def shared_limits(
    reports: Sequence[SimilarityReport], metric: str, scale: str = "shared"
) -> tuple[float | None, float | None]:
    """One colour range for ``metric`` across ``reports``, to pass as ``plot(vmin=, vmax=)``.

    ``lo, hi = shared_limits([math, lang], "cosine")`` then ``math.plot("cosine", vmin=lo,
    vmax=hi)`` and the same for ``lang``: equal colours mean equal values in both figures.
    """
    ends = [r.limits(metric, scale) for r in reports if metric in r.metrics()]
    los = [lo for lo, _ in ends if lo is not None]
    his = [hi for _, hi in ends if hi is not None]
    return (min(los) if los else None), (max(his) if his else None)


def _first_pick(recommendations: dict[str, Any], metric: str) -> int | None:
    """The layer ``metric`` would prune first on an activation report (None if it names none)."""
    if metric == "angular_distance_next":
        blocks = recommendations.get("prune_blocks") or []
        return next((b["start"] for b in blocks if b.get("n") == 1), None)
    order = recommendations.get(f"prune_order_{metric}")
    return int(order[0]) if order else None


def _stderr(r: dict[str, Any], metric: str) -> float | None:
    """A record's standard error, under whichever name it carries, or None."""
    for key in ("se", "value_se", f"{metric}_se"):
        v = r.get(key)
        if v is not None and math.isfinite(v):
            return float(v)
    return None


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

    :func:`splice.target.check_target`, with a report's rule for ``overwrite``: the folder may
    hold nothing but a report's files (``report.json``, ``records.csv``, ``*.png``,
    ``matrices/*.csv``).
    """
    return check_target(out, overwrite, replaceable=_not_a_report)
