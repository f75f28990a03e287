"""Activation similarity across models (``splice analyze activations A --compare B``).

The CKA accumulator is checked on hand-built features against numpy's CKA of the full
matrices (and its invariances); the end-to-end function against numpy CKA and cosine of HF's
``output_hidden_states`` of two tiny models.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from analysis_helpers import noisy_copy
from conftest import make_tiny

from splice.analysis import compare_activations
from splice.analysis.compare import CKASums, activation_similarity, similarity_report
from splice.cli import main
from splice.modeling import load_causal_lm


def np_cka(x: np.ndarray, y: np.ndarray) -> float:
    """Linear CKA of [n, p] and [n, q] from the centred matrices (Kornblith et al., eq. 5)."""
    x, y = x - x.mean(0), y - y.mean(0)
    return float(np.linalg.norm(x.T @ y) ** 2 / (np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y)))


def np_cos(u: np.ndarray, v: np.ndarray) -> float:
    return float(((u * v).sum(-1) / np.linalg.norm(u, axis=-1) / np.linalg.norm(v, axis=-1)).mean())


def cka_in_blocks(x: torch.Tensor, y: torch.Tensor, block: int = 37) -> float:
    acc = CKASums()
    for i in range(0, x.shape[0], block):
        acc.update(x[i : i + block], y[i : i + block])
    return acc.cka()


def test_cka_accumulator_matches_numpy_and_invariances():
    g = torch.Generator().manual_seed(0)
    n, p = 500, 12
    x = torch.randn(n, p, generator=g, dtype=torch.float64) * torch.linspace(0.1, 3, p) + 5
    z = torch.randn(n, 7, generator=g, dtype=torch.float64)
    y = x[:, -7:] @ torch.randn(7, 7, generator=g, dtype=torch.float64) + 0.5 * z
    q, _ = torch.linalg.qr(torch.randn(p, p, generator=g, dtype=torch.float64))
    ref = np_cka(x.numpy(), y.numpy())
    assert 0.2 < ref < 0.95
    assert cka_in_blocks(x, y) == pytest.approx(ref, rel=1e-10)
    assert cka_in_blocks(x, x) == pytest.approx(1.0, rel=1e-12)
    # an orthogonal rotation, a scale and a shift of one side change nothing
    assert cka_in_blocks(x, 3 * x @ q + 2) == pytest.approx(1.0, rel=1e-10)
    assert cka_in_blocks(x @ q, y) == pytest.approx(ref, rel=1e-10)
    # independent features: near 0 (about p·q/n), far from the related pair
    assert cka_in_blocks(x, z) == pytest.approx(np_cka(x.numpy(), z.numpy()), rel=1e-10)
    assert cka_in_blocks(x, z) < 0.1


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("compare")
    a = make_tiny(root / "a", "llama", layers=3, hidden=32, vocab=60)
    return a, noisy_copy(a, root / "b", 0.3, seed=5)


@pytest.fixture(scope="module")
def windows() -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(4, 60, (5, 10), generator=g)
    ids[:, 0] = 1  # BOS
    return ids


def hidden_states(model, ids: torch.Tensor) -> np.ndarray:
    """[L+2, N, T, H]: emb, each layer's output, and the final norm's output."""
    with torch.no_grad():
        normed = model(ids, output_hidden_states=True).hidden_states
        model.config.tie_last_hidden_states = False
        raw = model(ids, output_hidden_states=True).hidden_states
        model.config.tie_last_hidden_states = True
    return np.stack([h.double().numpy() for h in [*raw, normed[-1]]])


def test_end_to_end_matches_output_hidden_states(pair, windows):
    ma, mb = (load_causal_lm(p) for p in pair)
    acc = activation_similarity(ma, mb, windows, batch_size=2)  # batches of 2, 2, 1
    report = similarity_report(acc, [str(p) for p in pair])
    ha, hb = hidden_states(ma, windows), hidden_states(mb, windows)
    labels = ["emb", "0", "1", "2", "norm"]
    assert report.meta["boundaries"] == labels and ha.shape[0] == len(labels)
    xs = [h[:, 1:].reshape(-1, h.shape[-1]) for h in ha]  # positions >= 1
    ys = [h[:, 1:].reshape(-1, h.shape[-1]) for h in hb]
    shift = [torch.roll(torch.from_numpy(h[:, 1:]), 4, dims=1).numpy() for h in hb]  # (10-1)//2
    for i, label in enumerate(labels):
        (cka,) = report.values("cka", kind=label)
        (cos,) = report.values("cosine", kind=label)
        assert cka["value"] == pytest.approx(np_cka(xs[i], ys[i]), abs=1e-6), label
        assert cos["value"] == pytest.approx(np_cos(xs[i], ys[i]), abs=1e-6), label
        other = shift[i].reshape(-1, shift[i].shape[-1])
        assert cka["baseline_other_token"] == pytest.approx(np_cka(xs[i], other), abs=1e-6)
        assert cos["baseline_other_token"] == pytest.approx(np_cos(xs[i], other), abs=1e-6)
    # the boundaries x boundaries matrix: its diagonal is the per-layer value
    m = report.matrices["cka"].values
    assert m[1, 3] == pytest.approx(np_cka(xs[1], ys[3]), abs=1e-6)
    assert np.allclose(np.diag(m), [r["value"] for r in report.values("cka")])
    # the fine-tune is close to its base but not equal, and above the null at every layer
    for r in report.values("cka")[1:]:
        assert 0.3 < r["value"] < 0.9999 and r["value"] > r["baseline_other_token"]
    # the model against itself: 1 everywhere
    same = similarity_report(activation_similarity(ma, ma, windows, batch_size=3), ["a", "a2"])
    for r in same.records:
        assert r["value"] == pytest.approx(1.0, abs=1e-9), r


def test_cli_compare(pair, tmp_path, capsys):
    text = tmp_path / "corpus.txt"
    text.write_text(" ".join(f"w{i % 50}" for i in range(400)))
    out = tmp_path / "out"
    argv = ["analyze", "activations", pair[0], "--compare", pair[1], "--calibration", text]
    argv += ["--seq-len", "16", "--max-samples", "6", "--out", out, "--no-progress"]
    assert main([str(a) for a in argv]) == 0
    printed = capsys.readouterr().out
    assert "cka (null)" in printed and "norm" in printed
    saved = json.loads((out / "report.json").read_text())
    assert saved["analysis"] == "activation_similarity" and saved["meta"]["samples"] == 6
    assert (out / "activation_similarity_cka.png").stat().st_size > 1000
    same = compare_activations(pair[0], pair[0], text, seq_len=16, max_samples=4)
    assert all(r["value"] == pytest.approx(1.0, abs=1e-9) for r in same.records)


@pytest.fixture(scope="module")
def others(tmp_path_factory, pair):
    root = tmp_path_factory.mktemp("others")
    return {
        "deep": make_tiny(root / "deep", "llama", layers=4, hidden=32, vocab=60),
        "wide": make_tiny(root / "wide", "llama", layers=3, hidden=48, vocab=60),
        "tok": shuffled_tokenizer(make_tiny(root / "tok", "llama", layers=3, hidden=32, vocab=60)),
    }


def shuffled_tokenizer(folder):
    """Replace the folder's tokenizer by one with the same words at other ids (same size)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    words.update({f"w{i}": 4 + (i + 7) % 56 for i in range(56)})
    t = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    special = dict(bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>")
    PreTrainedTokenizerFast(tokenizer_object=t, **special).save_pretrained(folder)
    return folder


@pytest.mark.parametrize(
    "case, needle",
    [("deep", "layers"), ("wide", "hidden size"), ("tok", "tokenize the calibration text")],
)
def test_cli_compare_bad_input(pair, others, tmp_path, capsys, case, needle):
    text = tmp_path / "corpus.txt"
    text.write_text(" ".join(f"w{i % 50}" for i in range(400)))
    out = tmp_path / "out"
    argv = ["analyze", "activations", pair[0], "--compare", others[case], "--calibration", text]
    rc = main([str(a) for a in [*argv, "--seq-len", "8", "--out", out, "--no-progress"]])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and err.startswith("splice: error: "), err
    assert needle in err, err
    assert not out.exists()
