"""Activation analysis against a direct computation from ``output_hidden_states=True``."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from splice.analysis.activations import (
    activation_report,
    analyze_activations,
    duplicate_ranges,
    prune_blocks,
)
from splice.calib import calibration_text, layer_statistics, token_windows
from splice.cli import main
from splice.errors import SpliceError
from splice.modeling import load_causal_lm, load_tokenizer


def np_angle(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Angle / π between rows of ``u`` and ``v`` ``[N, H]`` -> ``[N]``."""
    cos = (u * v).sum(-1) / np.linalg.norm(u, axis=-1) / np.linalg.norm(v, axis=-1)
    return np.arccos(np.clip(cos, -1, 1)) / np.pi


def np_cos(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    return (u * v).sum(-1) / np.linalg.norm(u, axis=-1) / np.linalg.norm(v, axis=-1)


@pytest.fixture(scope="module")
def windows(analysis_zoo) -> torch.Tensor:
    tok = load_tokenizer(analysis_zoo / "base")
    text = calibration_text(analysis_zoo / "corpus.txt")
    return token_windows(tok, text, seq_len=12, max_samples=6)


def test_token_windows(analysis_zoo):
    tok = load_tokenizer(analysis_zoo / "base")
    text = " ".join(f"{a} plus {a + 1} makes {2 * a + 1} ." for a in range(5))
    ids = token_windows(tok, text, seq_len=8, max_samples=3)
    assert ids.shape == (3, 8) and (ids[:, 0] == tok.bos_token_id).all()
    flat = ids[:, 1:].reshape(-1).tolist()
    assert flat == tok(text, add_special_tokens=False)["input_ids"][:21]
    short_text = "1 plus"
    short = token_windows(tok, short_text, seq_len=8, max_samples=3)
    assert short.shape == (1, 1 + len(tok(short_text, add_special_tokens=False)["input_ids"]))


def test_angular_distance_matches_output_hidden_states(analysis_zoo, windows):
    model = load_causal_lm(analysis_zoo / "base")
    stats = layer_statistics(model, windows, batch_size=4)  # batches of 4 and 2
    report = activation_report(stats, "base")
    model.config.tie_last_hidden_states = False  # hidden_states[-1] before the final norm
    with torch.no_grad():
        out = model(windows, output_hidden_states=True)
    hs = np.stack([h.double().numpy() for h in out.hidden_states])  # [L+1, N, T, H]
    n_layers = hs.shape[0] - 1
    assert n_layers == stats.num_layers == model.config.num_hidden_layers
    last = hs[:, :, -1]  # [L+1, N, H]
    bounds = range(n_layers + 1)
    ref = np.array([[np_angle(last[a], last[b]).mean() for b in bounds] for a in bounds])
    np.testing.assert_allclose(report.matrices["angular_distance_pairs"].values, ref, atol=1e-6)
    by_n = report.matrices["angular_distance"].values  # rows n = 1..L, columns l
    for n in range(1, n_layers + 1):
        for lo in range(n_layers - n + 1):
            assert by_n[n - 1, lo] == pytest.approx(ref[lo, lo + n], abs=1e-6)
    for n, block in enumerate(report.recommendations["prune_blocks"], start=1):
        lo = int(np.argmin([ref[i, i + n] for i in range(n_layers - n + 1)]))
        assert block["n"] == n and block["layers"] == [lo, lo + n - 1]
    # Yi's criterion (first token excluded) and ShortGPT's block influence
    for layer in range(n_layers):
        cos = np_cos(hs[layer], hs[layer + 1])  # [N, T]
        io = report.values("io_cosine", layer=layer)[0]
        assert io["value"] == pytest.approx(cos[:, 1:].mean(), abs=1e-5)
        bi = report.values("block_influence", layer=layer)[0]
        assert bi["value"] == pytest.approx(1 - cos.mean(), abs=1e-5)
        nxt = report.values("angular_distance_next", layer=layer)[0]
        assert nxt["value"] == pytest.approx(ref[layer, layer + 1], abs=1e-6)
        assert nxt["baseline_other_sample"] is not None
        assert io["baseline_other_token"] < io["value"]


def test_recommendations_on_known_distances():
    # 4 layers: boundaries 0..4; block 1-2 is the most redundant pair, layer 0 the best single
    d = np.full((5, 5), 0.5)
    np.fill_diagonal(d, 0)
    for a, b, v in [(0, 1, 0.05), (1, 2, 0.1), (2, 3, 0.08), (3, 4, 0.3), (1, 3, 0.12)]:
        d[a, b] = d[b, a] = v
    prune = prune_blocks(d)
    assert [p["layers"] for p in prune] == [[0, 0], [1, 2], [0, 2]]
    assert prune[1]["angular_distance"] == 0.12
    dup = duplicate_ranges(d)  # first and last layer kept out
    assert [p["layers"] for p in dup] == [[2, 2], [1, 2]]


def test_cli_activations(analysis_zoo, tmp_path, capsys):
    out = tmp_path / "act"
    argv = ["analyze", "activations", str(analysis_zoo / "base")]
    argv += ["--calibration", str(analysis_zoo / "corpus.txt"), "--seq-len", "16"]
    argv += ["--max-samples", "4", "--out", str(out), "--device", "cpu"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    data = json.loads((out / "report.json").read_text())
    n_layers = data["meta"]["num_layers"]
    assert "io_cosine" in text and f"prune {max(1, n_layers // 4)} layers: layers" in text
    assert data["meta"]["samples"] == 4 and data["meta"]["seq_len"] == 16
    assert len(data["recommendations"]["prune_blocks"]) == n_layers - 1
    assert (out / "activations_angular_distance.png").is_file()
    assert (out / "activations_io_cosine.png").is_file()


def test_moe_activations(analysis_zoo):
    report = analyze_activations(
        analysis_zoo / "moe", analysis_zoo / "corpus.txt", seq_len=8, max_samples=2
    )
    n_layers = json.loads((analysis_zoo / "moe" / "config.json").read_text())["num_hidden_layers"]
    assert report.meta["num_layers"] == n_layers and len(report.records) == 3 * n_layers


def test_lm_eval_task_calibration(tmp_path):
    data = tmp_path / "docs.jsonl"
    data.write_text(
        "\n".join(json.dumps({"q": f"w{i} w{i + 1}", "a": f"w{i + 2}"}) for i in range(5))
    )
    (tmp_path / "calib.yaml").write_text(
        "task: splice_calib\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\n"
        "output_type: generate_until\n"
        "doc_to_text: '{{q}}'\n"
        "doc_to_target: '{{a}}'\n"
    )
    text = calibration_text("lm-eval:splice_calib", include_path=str(tmp_path))
    assert text.split("\n\n") == [f"w{i} w{i + 1} w{i + 2}" for i in range(5)]
    with pytest.raises(SpliceError, match="lm-eval task 'no_such_task_xyz' cannot be loaded"):
        calibration_text("lm-eval:no_such_task_xyz", include_path=str(tmp_path))
