"""Weight comparisons (across models, within a model, MoE experts) against numpy references.

Reference tensors are read with ``safetensors`` directly (not splice's reader) and every
number is recomputed with numpy.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from analysis_helpers import edited_copy, noisy_copy, upcycle_moe
from test_analysis_metrics import np_cos

from splice.analysis import SimilarityReport, compare_experts, compare_layers, compare_models
from splice.analysis.report import short_names
from splice.cli import main

SPLICE = str(Path(sys.executable).with_name("splice"))


def reference(path: Path) -> dict[str, np.ndarray]:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update({k: v.float().numpy().astype(np.float64) for k, v in load_file(f).items()})
    return out


def np_svd_cos(a: np.ndarray, b: np.ndarray) -> float:
    return np_cos(np.linalg.svd(a, compute_uv=False), np.linalg.svd(b, compute_uv=False))


def np_metric(metric: str, x: np.ndarray, y: np.ndarray) -> float | None:
    """The numpy reference for ``metric`` (None for CKA, tested in test_analysis_metrics)."""
    if metric == "cosine":
        return np_cos(x, y)
    if metric == "frobenius":
        return float(np.linalg.norm(x - y))
    if metric == "frobenius_rel":
        return float(np.linalg.norm(x - y) / np.linalg.norm(x))
    if metric == "svd_cosine":
        return np_svd_cos(x, y)
    if metric == "eig_cosine":
        ex, ey = (np.sort(np.abs(np.linalg.eigvals(t)))[::-1] for t in (x, y))
        return np_cos(ex, ey)
    return None


@pytest.fixture(scope="module")
def pair(tiny_llama, tmp_path_factory) -> tuple[Path, Path]:
    return tiny_llama, noisy_copy(tiny_llama, tmp_path_factory.mktemp("ft") / "ft", 0.5, seed=3)


@pytest.fixture(scope="module")
def copied_layer(tiny_llama, tmp_path_factory) -> Path:
    """tiny llama (4 layers) whose layer 3 is an exact copy of layer 1."""

    def edit(name, ckpt):
        t = ckpt.arch.parse(name)
        if t.layer == 3:
            return ckpt.load(ckpt.arch.rename(name, layer=1))
        return None

    return edited_copy(tiny_llama, tmp_path_factory.mktemp("copy") / "m", edit)


@pytest.fixture(scope="module")
def moe(tiny_models, tmp_path_factory) -> Path:
    return upcycle_moe(tiny_models["mistral"], tmp_path_factory.mktemp("moe") / "moe", 4, 0.5)


def test_across_models_matches_numpy(pair):
    a, b = pair
    report = compare_models(a, b, metrics="all")
    ra, rb = reference(a), reference(b)
    assert {r["tensor"] for r in report.records} == set(ra)
    checked = 0
    for r in report.records:
        x, y = ra[r["tensor"]], rb[r["tensor"]]
        expected = np_metric(r["metric"], x, y)
        if expected is not None:
            tol = 1e-4 if r["metric"] == "eig_cosine" else 1e-9
            assert r["value"] == pytest.approx(expected, rel=tol, abs=tol), r
            checked += 1
        assert r["baseline_gaussian"] is not None
    assert checked > 100
    # other-layer baseline: A's layer i vs B's layer (i + 2) % 4
    r = report.values("cosine", kind="mlp.up_proj.weight", layer=1)[0]
    other = rb["model.layers.3.mlp.up_proj.weight"]
    assert r["baseline_other_layer"] == pytest.approx(np_cos(ra[r["tensor"]], other), rel=1e-9)
    r = report.values("svd_cosine", kind="self_attn.q_proj.weight", layer=2)[0]
    other = rb["model.layers.0.self_attn.q_proj.weight"]
    assert r["baseline_other_layer"] == pytest.approx(np_svd_cos(ra[r["tensor"]], other), rel=1e-9)
    # matrix layers × kinds holds the same values
    m = report.matrices["cosine"]
    assert m.rows == ["0", "1", "2", "3"] and "mlp.up_proj" in m.cols
    assert (
        m.to_frame().loc["1", "mlp.up_proj"]
        == report.values("cosine", kind="mlp.up_proj.weight", layer=1)[0]["value"]
    )


def test_identical_models(tiny_models):
    report = compare_models(tiny_models["qwen2"], tiny_models["qwen2"], metrics="all")
    for r in report.records:
        if r["metric"].startswith("frobenius"):
            assert r["value"] == 0.0, r
        else:
            tol = 1e-6 if r["metric"] == "cka" else 1e-9  # CKA's products run in float32
            assert r["value"] == pytest.approx(1.0, abs=tol), r
        # the baselines are far from it
        if r["metric"] in ("cosine", "frobenius_rel") and r["tensor"].endswith("weight"):
            assert abs(r["baseline_gaussian"] - (0 if r["metric"] == "cosine" else 1.41)) < 0.2


def test_within_model_finds_copied_layer(copied_layer):
    report = compare_layers(copied_layer, metrics="cosine,frobenius,svd_cosine")
    assert report.recommendations["duplicate_layers"] == [[1, 3]]
    ref = reference(copied_layer)
    for kind in ("self_attn.q_proj", "mlp.down_proj", "input_layernorm"):
        cos = report.matrices[f"{kind}/cosine"].values
        frob = report.matrices[f"{kind}/frobenius"].values
        assert cos[1, 3] == pytest.approx(1.0, abs=1e-12) and frob[1, 3] == 0.0
        assert cos[3, 1] == cos[1, 3] and np.allclose(np.diag(cos), 1)
        for i, j in [(0, 1), (2, 0), (1, 2)]:
            x = ref[f"model.layers.{i}.{kind}.weight"]
            y = ref[f"model.layers.{j}.{kind}.weight"]
            assert cos[i, j] == pytest.approx(np_cos(x, y), rel=1e-9)
            assert frob[i, j] == pytest.approx(np.linalg.norm(x - y), rel=1e-9)
    svd = report.matrices["self_attn.q_proj/svd_cosine"].values
    assert svd[1, 3] == pytest.approx(1.0, abs=1e-12)
    assert report.matrices["mlp.up_proj/cosine"].baseline_gaussian is not None
    adjacent = report.values("cosine", kind="self_attn.o_proj.weight", layer=2)[0]
    assert adjacent["other"] == 3 and adjacent["value"] == pytest.approx(
        report.matrices["self_attn.o_proj/cosine"].values[2, 3]
    )


def test_experts_vs_dense(moe, tiny_models):
    dense = tiny_models["mistral"]
    report = compare_experts(moe, dense, metrics="cosine,svd_cosine,frobenius_rel")
    rm, rd = reference(moe), reference(dense)
    recs = [r for r in report.records if r["against"] == "dense"]
    assert len(recs) == 4 * 4 * 3 * 3  # layers × experts × kinds × metrics
    for r in recs:
        e = rm[f"model.layers.{r['layer']}.block_sparse_moe.experts.{r['expert']}.{r['kind']}"]
        d = rd[f"model.layers.{r['layer']}.{r['dense_kind']}"]
        expected = {
            "cosine": np_cos(e, d),
            "svd_cosine": np_svd_cos(e, d),
            "frobenius_rel": np.linalg.norm(e - d) / np.linalg.norm(e),
        }[r["metric"]]
        assert r["value"] == pytest.approx(expected, rel=1e-9)
        other = rd[f"model.layers.{(r['layer'] + 2) % 4}.{r['dense_kind']}"]
        if r["metric"] == "cosine":
            assert r["value"] == pytest.approx(1 / np.sqrt(1 + 0.25), abs=0.08)  # noise 0.5·std
            assert r["baseline_other_layer"] == pytest.approx(np_cos(e, other), rel=1e-9)
            assert abs(r["baseline_gaussian"]) < 0.1
    assert {r["dense_kind"] for r in recs} == {
        "mlp.gate_proj.weight",
        "mlp.up_proj.weight",
        "mlp.down_proj.weight",
    }
    ee = report.matrices["L2/w1/cosine"].values
    e0 = rm["model.layers.2.block_sparse_moe.experts.0.w1.weight"]
    e3 = rm["model.layers.2.block_sparse_moe.experts.3.w1.weight"]
    assert ee[0, 3] == pytest.approx(np_cos(e0, e3), rel=1e-9)
    assert report.matrices["w1/cosine"].values.shape == (4, 4)  # layers × experts
    assert "w1/cosine/experts" in report.matrices
    # without the dense model: expert vs expert only
    alone = compare_experts(moe, metrics="cosine")
    assert {r["against"] for r in alone.records} == {"experts"}
    r = alone.values("cosine", layer=2, expert=0, kind="w1.weight")[0]
    assert r["value"] == pytest.approx(np.mean(ee[0, 1:]), rel=1e-9)


def test_report_roundtrip_and_outputs(pair, tmp_path):
    report = compare_models(*pair, metrics="cosine,svd_cosine", kinds=["mlp.up_proj"])
    written = report.save(tmp_path / "r")
    names = {p.name for p in written}
    assert {"report.json", "records.csv", "cosine.csv", "weights_cosine.png"} <= names
    back = SimilarityReport.load(tmp_path / "r")
    assert back.records == json.loads((tmp_path / "r" / "report.json").read_text())["records"]
    np.testing.assert_allclose(back.matrices["cosine"].values, report.matrices["cosine"].values)
    frame = report.to_frame()
    assert len(frame) == 4 * 2 and set(frame["kind"]) == {"mlp.up_proj.weight"}
    assert any("baseline" in c for c in frame.columns)
    fig = report.plot("svd_cosine")
    assert fig.axes and "Gaussian baseline" in fig.axes[0].get_title()
    assert "mlp.up_proj.weight" in report.summary()


def test_summary_columns_align_and_titles_name_models_briefly(pair):
    report = compare_models(*pair, metrics="cosine,svd_cosine,frobenius")
    table = [ln for ln in report.summary().splitlines()[1:] if not ln.startswith("time:")]
    assert len({len(ln) for ln in table}) == 1  # every row as wide as the header
    norm = next(ln for ln in table if ln.startswith("model.norm.weight"))
    assert "n/a" in norm and "nan" not in norm  # no spectrum for a vector
    title = report.plot("cosine")._suptitle.get_text()
    assert title == f"weights: cosine — {pair[0].name} vs {pair[1].name}"
    assert short_names(["/a/run1/final", "/a/run2/final/"]) == ["run1/final", "run2/final"]
    assert short_names(["/x/zoo/base", "/x/zoo/math"]) == ["base", "math"]


def test_cli_weights_and_experts(pair, moe, tiny_models, tmp_path, capsys):
    out = tmp_path / "w"
    assert main(["analyze", "weights", str(pair[0]), str(pair[1]), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "self_attn.q_proj.weight" in text and "null" in text and f"wrote {out}" in text
    data = json.loads((out / "report.json").read_text())
    assert data["meta"]["metrics"] == ["cosine", "svd_cosine", "frobenius", "frobenius_rel"]
    assert (out / "records.csv").is_file() and list(out.glob("*.png"))
    assert (
        main(["analyze", "weights", str(pair[0]), "--no-figures", "--out", str(tmp_path / "x")])
        == 0
    )
    assert "within" in capsys.readouterr().out
    args = ["analyze", "experts", str(moe), str(tiny_models["mistral"]), "--metrics", "cosine"]
    assert main([*args, "--device", "cpu"]) == 0
    assert "w1.weight vs dense" in capsys.readouterr().out


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([SPLICE, *args], capture_output=True, text=True)


def test_bad_inputs_one_line_exit_2(tiny_models, moe, tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    text = tmp_path / "text.txt"
    text.write_text("w1 w2 w3\n")
    act = ["analyze", "activations", str(tiny_models["llama"])]
    cases = {
        "different architectures": (
            ["analyze", "weights", str(tiny_models["llama"]), str(tiny_models["qwen2"])],
            "needs one architecture",
        ),
        "dense model to expert analysis": (
            ["analyze", "experts", str(tiny_models["llama"])],
            "no experts",
        ),
        "MoE given as the dense model": (
            ["analyze", "experts", str(moe), str(tiny_models["mixtral"])],
            "is itself a MoE",
        ),
        "empty calibration file": (
            ["analyze", "activations", str(tiny_models["llama"]), "--calibration", str(empty)],
            "calibration text is empty",
        ),
        "missing calibration file": (
            ["analyze", "activations", str(tiny_models["llama"]), "--calibration", "nope.txt"],
            "no such calibration file",
        ),
        "window longer than the model's positions": (
            [*act, "--seq-len", "100", "--calibration", str(text)],
            "exceeds the model's 64 positions",
        ),
        "unknown metric": (
            ["analyze", "weights", str(tiny_models["llama"]), "--metrics", "cosine,bogus"],
            "unknown similarity metric 'bogus'",
        ),
        "no such model": (["analyze", "weights", str(tmp_path / "none")], "no such folder"),
    }
    for name, (argv, message) in cases.items():
        assert main(argv) == 2, name
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("splice: error: "), (name, err)
        assert message in err, (name, err)


def test_different_depth_same_arch(tiny_llama, tmp_path, capsys):
    from conftest import make_tiny

    deeper = make_tiny(tmp_path / "deep", "llama", layers=5)
    assert main(["analyze", "weights", str(tiny_llama), str(deeper)]) == 2
    assert "differ in their tensors" in capsys.readouterr().err


def test_import_is_light():
    code = (
        "import sys, splice.analysis, splice.analysis.cli; "
        "print([m for m in ('pandas', 'matplotlib', 'torch') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.strip() == "[]", out.stderr
