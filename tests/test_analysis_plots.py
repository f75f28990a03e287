"""Figures that compare: colour scales, per-kind nulls, short titles, activation markers.

Every report here is built by hand (no checkpoint), so each expected number is known; the
figures are inspected through their matplotlib objects (images' colour limits, artists' gids).
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("matplotlib")

from splice.analysis.activations import prune_blocks
from splice.analysis.common import layers_by_kinds
from splice.analysis.report import (
    RANGES,
    SimilarityMatrix,
    SimilarityReport,
    null_per,
    shared_limits,
)
from splice.errors import SpliceError

LONG = "/very/long/path/that/would/not/fit/in/a/title/zoo"


def panels(fig) -> list:
    """The heatmap axes of a figure (colour bars hold no image)."""
    return [ax for ax in fig.axes if ax.images]


def colorbars(fig) -> list:
    return [ax for ax in fig.axes if not ax.images and ax.get_label() == "<colorbar>"]


def expert_report(low: float = 0.974, high: float = 0.994) -> SimilarityReport:
    """Two cosine panels whose values sit near ``low`` and near ``high``, plus one frobenius."""
    a = np.array([[low, low + 0.002], [low + 0.001, low + 0.003]])
    b = np.array([[high, high - 0.001], [high - 0.002, high + 0.001]])
    mats = {
        "w1/cosine": SimilarityMatrix("w1 vs dense", "cosine", a, ["0", "1"], ["e0", "e1"]),
        "w2/cosine": SimilarityMatrix("w2 vs dense", "cosine", b, ["0", "1"], ["e0", "e1"]),
        "w1/frobenius": SimilarityMatrix(
            "w1 vs dense", "frobenius", np.array([[0.5, 2.0]]), ["0"], ["e0", "e1"]
        ),
        # data only: must not widen the shared range
        "L0/w1/cosine": SimilarityMatrix(
            "layer 0", "cosine", np.array([[1.0, -0.5]]), ["0"], ["e0", "e1"], panel=False
        ),
    }
    records = [{"metric": "cosine", "layer": 0, "value": low}]
    return SimilarityReport("experts", [f"{LONG}/moe", f"{LONG}/base"], records, mats)


def test_shared_scale_is_one_range_and_one_colorbar_for_all_panels():
    report = expert_report()
    assert report.limits("cosine") == (0.974, 0.995)
    fig = report.plot("cosine")
    axes = panels(fig)
    assert len(axes) == 2
    clims = [ax.images[0].get_clim() for ax in axes]
    assert clims[0] == clims[1] == pytest.approx((0.974, 0.995))
    assert len(colorbars(fig)) == 1  # one bar for the figure: the panels share it
    # equal colours mean equal values: the low panel is darker than the high one
    norm = axes[0].images[0].norm
    assert norm(0.975) < 0.1 and norm(0.994) > 0.9


def test_auto_scale_gives_each_panel_its_own_range():
    fig = expert_report().plot("cosine", scale="auto")
    axes = panels(fig)
    assert axes[0].images[0].get_clim() == pytest.approx((0.974, 0.977))
    assert axes[1].images[0].get_clim() == pytest.approx((0.992, 0.995))
    assert len(colorbars(fig)) == 2  # one per panel: their colours do not compare


def test_fixed_scale_is_the_metrics_natural_range():
    report = expert_report()
    for ax in panels(report.plot("cosine", scale="fixed")):
        assert ax.images[0].get_clim() == (-1.0, 1.0)
    # an open upper end (a distance) takes the data's maximum, the lower end stays 0
    (ax,) = panels(report.plot("frobenius", scale="fixed"))
    assert ax.images[0].get_clim() == (0.0, 2.0)
    assert RANGES["svd_cosine"] == (0.0, 1.0) and RANGES["cka"] == (0.0, 1.0)
    spectra = SimilarityReport(
        "weights",
        ["a", "b"],
        matrices={"m": SimilarityMatrix("s", "svd_cosine", np.array([[0.9]]), ["0"], ["k"])},
    )
    (ax,) = panels(spectra.plot("svd_cosine", scale="fixed"))
    assert ax.images[0].get_clim() == (0.0, 1.0)
    # a metric the table does not list falls back to the shared range
    odd = SimilarityReport(
        "x",
        ["a"],
        matrices={"m": SimilarityMatrix("s", "odd", np.array([[3.0, 5.0]]), ["0"], ["a", "b"])},
    )
    assert odd.limits("odd", "fixed") == (3.0, 5.0)


def test_explicit_limits_override_and_compare_across_reports():
    report = expert_report()
    for ax in panels(report.plot("cosine", vmin=0.9)):
        assert ax.images[0].get_clim() == pytest.approx((0.9, 0.995))
    for ax in panels(report.plot("cosine", scale="auto", vmin=0.5, vmax=1.0)):
        assert ax.images[0].get_clim() == (0.5, 1.0)
    other = expert_report(0.90, 0.93)
    lo, hi = shared_limits([report, other], "cosine")
    assert (lo, hi) == pytest.approx((0.90, 0.995))
    clims = {
        ax.images[0].get_clim()
        for r in (report, other)
        for ax in panels(r.plot("cosine", vmin=lo, vmax=hi))
    }
    assert len(clims) == 1
    assert shared_limits([report, other], "cosine", "fixed") == (-1.0, 1.0)
    assert shared_limits([report, other], "cosine", "auto") == (None, None)
    # a value past an explicit end: the colour bar says so with an arrow
    fig = report.plot("cosine", vmax=0.99)
    assert colorbars(fig)[0]._colorbar.extend == "max"


def test_bad_scale_and_limits_are_errors():
    report = expert_report()
    with pytest.raises(SpliceError, match="scale 'wide'"):
        report.plot("cosine", scale="wide")
    with pytest.raises(SpliceError, match=r"vmin 1\.0 is above vmax 0\.5"):
        report.plot("cosine", vmin=1.0, vmax=0.5)


def test_matrix_plot_alone_takes_vmin_vmax():
    m = SimilarityMatrix("m", "cosine", np.array([[0.2, 0.4]]), ["0"], ["a", "b"])
    assert m.plot().axes[0].images[0].get_clim() == (0.2, 0.4)
    assert m.plot(vmin=-1, vmax=1).axes[0].images[0].get_clim() == (-1.0, 1.0)


def weight_records() -> list[dict]:
    """Two kinds over two layers with hand-picked Gaussian nulls (one missing)."""
    rows = [
        ("self_attn.q_proj.weight", 0, 0.90, 0.001),
        ("self_attn.q_proj.weight", 1, 0.80, -0.003),
        ("input_layernorm.weight", 0, 0.999, 0.30),
        ("input_layernorm.weight", 1, 0.998, 0.50),
        ("input_layernorm.weight", 2, 0.997, None),
        ("model.norm.weight", None, 0.99, 0.9),  # not per layer: no part of a kind's null
    ]
    return [
        {
            "tensor": f"{layer}.{k}",
            "kind": k,
            "layer": layer,
            "metric": "cosine",
            "value": v,
            "baseline_gaussian": g,
        }
        for k, layer, v, g in rows
    ] + [
        {
            "kind": "self_attn.q_proj.weight",
            "layer": 0,
            "metric": "frobenius",
            "value": 1.0,
            "baseline_gaussian": 7.0,
        }
    ]


def test_baselines_per_kind_against_a_hand_computation():
    records = weight_records()
    per = null_per(records, "cosine")
    assert per == pytest.approx(
        {"self_attn.q_proj.weight": (0.001 - 0.003) / 2, "input_layernorm.weight": 0.40}
    )
    by_kind = {
        "self_attn.q_proj.weight": {0: "a", 1: "b"},
        "input_layernorm.weight": {0: "c", 1: "d", 2: "e"},
    }
    m = layers_by_kinds(records, "cosine", by_kind)
    assert m.cols == ["self_attn.q_proj", "input_layernorm"]
    assert m.col_baselines == pytest.approx([-0.001, 0.40])
    back = SimilarityMatrix.from_dict(m.to_dict())
    assert back.col_baselines == pytest.approx([-0.001, 0.40])
    report = SimilarityReport("weights", [f"{LONG}/base", f"{LONG}/math"], records, {"cosine": m})
    (ax,) = panels(report.plot("cosine"))
    labels = [t.get_text() for t in ax.get_xticklabels()]
    assert labels == ["self_attn.q_proj (-0.001)", "input_layernorm (0.4)"]
    title = ax.get_title()
    assert "Gaussian baseline per kind" in title
    mixed = np.mean([0.001, -0.003, 0.30, 0.50])  # the one mean over kinds the title showed
    assert f"{mixed:.3g}" not in title
    # a matrix without per-kind nulls (one kind, or an older report) keeps its single null
    one = SimilarityMatrix("one", "cosine", np.ones((1, 1)), ["0"], ["k"], baseline_gaussian=0.25)
    assert "(Gaussian baseline 0.25)" in one.plot().axes[0].get_title()
    with pytest.raises(ValueError, match="column baselines"):
        SimilarityMatrix("bad", "cosine", np.ones((1, 2)), ["0"], ["a", "b"], col_baselines=[0.1])


def test_titles_use_short_names_not_full_paths():
    report = expert_report()
    title = report.plot("cosine")._suptitle.get_text()
    assert title == "experts: cosine — moe vs base"
    assert LONG not in title
    acts = activation_report_by_hand()
    line = acts.plot("io_cosine").axes[0].get_title()
    assert line == "activations: io_cosine — base" and "/" not in line
    clash = SimilarityReport(
        "weights", ["/x/run1/final", "/x/run2/final"], [], expert_report().matrices
    )
    assert "run1/final vs run2/final" in clash.plot("cosine")._suptitle.get_text()


# ---- activation plots ----------------------------------------------------------------------------
def activation_report_by_hand(se: bool = False) -> SimilarityReport:
    """Eight layers; d(l, l+n) grows with n and is smallest from layer 3 on, like the zoo's base."""
    n = 8
    pos = np.array([0.0, 0.4, 0.55, 0.65, 0.68, 0.72, 0.76, 0.82, 0.9])  # boundary positions
    dist = np.abs(pos[:, None] - pos[None, :])
    io = [0.4, 0.92, 0.96, 0.98, 0.97, 0.975, 0.974, 0.94]
    records = []
    for layer in range(n):
        records += [
            {
                "layer": layer,
                "metric": "io_cosine",
                "value": io[layer],
                "baseline_other_token": 0.08 + 0.002 * layer,
                "baseline_other_sample": None,
            },
            {
                "layer": layer,
                "metric": "angular_distance_next",
                "value": dist[layer, layer + 1],
                "baseline_other_token": None,
                "baseline_other_sample": 0.45,
            },
        ]
        if se:
            records[-2]["io_cosine_se"] = 0.01 * (layer + 1)
    by_n = np.full((n, n), np.nan)
    for k in range(1, n + 1):
        for lo in range(n - k + 1):
            by_n[k - 1, lo] = dist[lo, lo + k]
    mats = {
        "angular_distance": SimilarityMatrix(
            "angular distance d(l, l+n), last token",
            "angular_distance",
            by_n,
            [str(k) for k in range(1, n + 1)],
            [str(i) for i in range(n)],
            "n",
            "layer",
        )
    }
    order = [int(i) for i in np.argsort(-np.array(io), kind="stable")]
    recs = {"prune_blocks": prune_blocks(dist), "prune_order_io_cosine": order}
    return SimilarityReport(
        "activations", [f"{LONG}/base"], records, mats, recs, meta={"num_layers": n}
    )


def by_gid(ax, gid: str) -> list:
    return [a for a in ax.get_children() if a.get_gid() == gid]


def test_activation_line_marks_the_block_the_pick_and_the_null():
    report = activation_report_by_hand()
    blocks = report.recommendations["prune_blocks"]
    assert blocks[1] == {
        "n": 2,
        "start": 3,
        "layers": [3, 4],
        "angular_distance": pytest.approx(0.07),
    }
    ax = report.plot("io_cosine").axes[0]
    (span,) = by_gid(ax, "recommended_block")  # the block of L // 4 = 2 layers, 3-4
    xs = [span.get_x(), span.get_x() + span.get_width()]  # a Rectangle in data x
    assert min(xs) == pytest.approx(2.5) and max(xs) == pytest.approx(4.5)
    (star,) = by_gid(ax, "recommended")  # the layer of highest input/output cosine
    assert list(star.get_xdata()) == [3] and list(star.get_ydata()) == [0.98]
    (null,) = by_gid(ax, "null:baseline_other_token")
    assert null.get_ydata()[0] == pytest.approx(np.mean([0.08 + 0.002 * i for i in range(8)]))
    assert by_gid(ax, "null_band:baseline_other_token")  # the band from its min to its max
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert any("prune 2: layers 3-4" in t for t in legend)
    assert any(t.startswith("null, other token") for t in legend)
    assert not ax.containers  # no standard errors in these records: no error bars
    # angular distance to the next layer: its pick is the block of one layer
    ax = report.plot("angular_distance_next").axes[0]
    (star,) = by_gid(ax, "recommended")
    assert list(star.get_xdata()) == [3]
    (null,) = by_gid(ax, "null:baseline_other_sample")
    assert null.get_ydata()[0] == pytest.approx(0.45)
    assert not by_gid(ax, "null_band:baseline_other_sample")  # constant: a line, no band


def test_activation_line_draws_standard_errors_when_records_have_them():
    ax = activation_report_by_hand(se=True).plot("io_cosine").axes[0]
    (bars,) = ax.containers
    segments = bars.lines[2][0].get_segments()
    half = [(s[1][1] - s[0][1]) / 2 for s in segments]
    assert half == pytest.approx([0.01 * (i + 1) for i in range(8)])
    assert "± 1 standard error" in [t.get_text() for t in ax.get_legend().get_texts()]


def test_angular_heatmap_frames_each_block_to_prune():
    report = activation_report_by_hand()
    fig = report.plot("angular_distance")
    (ax,) = panels(fig)
    frames = by_gid(ax, "recommended")
    (chosen,) = by_gid(ax, "recommended_block")
    cells = {(f.get_x() + 0.5, f.get_y() + 0.5) for f in [*frames, chosen]}
    expected = {(b["start"], b["n"] - 1) for b in report.recommendations["prune_blocks"]}
    assert cells == expected
    assert (chosen.get_x() + 0.5, chosen.get_y() + 0.5) == (3, 1)  # n = 2: layers 3-4
    assert "null (other sample, n = 1): 0.45" in ax.get_title()
    # distances: bright is similar, as for cosines
    assert ax.images[0].get_cmap().name == "viridis_r"


def test_line_plot_fixed_scale_sets_the_y_range():
    report = activation_report_by_hand()
    assert report.plot("io_cosine", scale="fixed").axes[0].get_ylim() == (-1.0, 1.0)
    assert report.plot("io_cosine", vmin=0.0, vmax=1.0).axes[0].get_ylim() == (0.0, 1.0)


def test_save_and_cli_pass_the_scale(tmp_path, monkeypatch):
    from splice.cli import build_parser

    seen = []
    plot = SimilarityReport.plot

    def spy(self, metric=None, **kw):
        seen.append(kw.get("scale"))
        return plot(self, metric, **kw)

    monkeypatch.setattr(SimilarityReport, "plot", spy)
    written = expert_report().save(tmp_path / "r", scale="fixed")
    assert {p.name for p in written} >= {"experts_cosine.png", "experts_frobenius.png"}
    assert seen == ["fixed", "fixed"]
    with pytest.raises(SpliceError, match="scale"):
        expert_report().save(tmp_path / "s", scale="wide")
    assert not (tmp_path / "s").exists()
    parser = build_parser()
    for verb in (["weights", "a"], ["experts", "m"], ["activations", "m", "--calibration", "zoo"]):
        assert parser.parse_args(["analyze", *verb]).scale == "shared"
        assert parser.parse_args(["analyze", *verb, "--scale", "auto"]).scale == "auto"
    with pytest.raises(SystemExit):
        parser.parse_args(["analyze", "weights", "a", "--scale", "wide"])
