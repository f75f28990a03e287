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


# ---- one model at a time: A's states spill to a temporary file ---------------------------------
@pytest.fixture
def corpus(tmp_path):
    text = tmp_path / "corpus.txt"
    text.write_text(" ".join(f"w{(i * 7) % 50}" for i in range(400)))
    return text


def records_and_matrices(report):
    values = [
        (r["kind"], r["metric"], r["value"], r["baseline_other_token"]) for r in report.records
    ]
    return values, {k: m.values for k, m in report.matrices.items()}


@pytest.mark.parametrize("batch_size", [2, 8])
def test_spilled_equals_resident(pair, corpus, tmp_path, batch_size):
    """The two passes (A's states through a float32 memmap) give the one-pass figures of both
    models loaded at once (``resident=True``), to float64 rounding; the spill folder goes."""
    kw = dict(seq_len=12, max_samples=5, batch_size=batch_size)
    work = tmp_path / "work"
    work.mkdir()
    spilled = compare_activations(*pair, corpus, workdir=work, **kw)
    resident = compare_activations(*pair, corpus, resident=True, **kw)
    assert list(work.iterdir()) == []
    assert spilled.meta["spill_bytes"] == 5 * 5 * 11 * 32 * 4  # (L+2) x N x (T-1) x H x 4
    assert resident.meta["spill_bytes"] == 0 and not spilled.meta["resident"]
    (rs, ms), (rr, mr) = records_and_matrices(spilled), records_and_matrices(resident)
    assert [r[:2] for r in rs] == [r[:2] for r in rr] and ms.keys() == mr.keys()
    for a, b in zip(rs, rr, strict=True):
        assert a[2:] == pytest.approx(b[2:], rel=1e-12, abs=1e-14), a
    for key in ms:
        np.testing.assert_allclose(ms[key], mr[key], rtol=1e-12, atol=1e-14, err_msg=key)
    assert 0.3 < rs[2][2] < 0.9999  # layer 0's cka: a real comparison, not 1 or NaN


def test_spilled_equals_resident_in_half(pair, corpus):
    """bfloat16 states fit float32 exactly: the spilled figures are still the one-pass ones."""
    kw = dict(seq_len=12, max_samples=3, batch_size=2, dtype="bfloat16")
    spilled = compare_activations(*pair, corpus, **kw)
    resident = compare_activations(*pair, corpus, resident=True, **kw)
    for a, b in zip(spilled.records, resident.records, strict=True):
        assert a["value"] == pytest.approx(b["value"], rel=1e-12), a
    assert spilled.meta["spill_bytes"] == 5 * 3 * 11 * 32 * 4


def counting_loader(monkeypatch):
    """Patch the loader compare.py calls; returns the live models seen at each load."""
    import gc
    import weakref

    import splice.modeling

    real = splice.modeling.load_causal_lm
    refs: list[weakref.ref] = []
    alive_at_load: list[int] = []

    def load(*args, **kwargs):
        alive_at_load.append(sum(r() is not None for r in refs))
        model = real(*args, **kwargs)
        refs.append(weakref.ref(model))
        return model

    monkeypatch.setattr(splice.modeling, "load_causal_lm", load)
    gc.collect()
    return alive_at_load


def test_one_model_alive_at_a_time(pair, corpus, monkeypatch):
    alive = counting_loader(monkeypatch)
    compare_activations(*pair, corpus, seq_len=8, max_samples=3)
    assert alive == [0, 0]  # A was gone when B was loaded
    alive.clear()
    compare_activations(*pair, corpus, seq_len=8, max_samples=3, resident=True)
    assert alive == [0, 1]  # the counter sees two (the one-pass path)


def test_spill_removed_on_interrupt(pair, corpus, tmp_path, monkeypatch):
    import splice.modeling

    real = splice.modeling.load_causal_lm
    calls = []

    def load(*args, **kwargs):
        calls.append(args[0])
        if len(calls) == 2:  # A has spilled: Ctrl-C while B loads
            (folder,) = work.iterdir()
            assert (folder / "a.states").stat().st_size == 5 * 3 * 7 * 32 * 4
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.setattr(splice.modeling, "load_causal_lm", load)
    with pytest.raises(KeyboardInterrupt):
        compare_activations(*pair, corpus, seq_len=8, max_samples=3, workdir=work)
    assert len(calls) == 2 and list(work.iterdir()) == []


def test_spill_larger_than_free_disk(pair, corpus, tmp_path, monkeypatch, capsys):
    import shutil

    import splice.modeling
    from splice.analysis import compare

    loads = []
    monkeypatch.setattr(splice.modeling, "load_causal_lm", lambda *a, **k: loads.append(a))
    usage = shutil.disk_usage(tmp_path)._replace(free=1000)
    monkeypatch.setattr(compare.shutil, "disk_usage", lambda path: usage)
    out = tmp_path / "out"
    argv = ["analyze", "activations", pair[0], "--compare", pair[1], "--calibration", corpus]
    argv += ["--seq-len", "8", "--max-samples", "6", "--out", out, "--no-progress"]
    rc = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and err.startswith("splice: error: "), err
    assert "--max-samples" in err and "--seq-len" in err and "1000 bytes free" in err, err
    # (L+2) x N x (T-1) x H x 4 = 26880 bytes
    assert "26.2 KiB (5 states x 6 windows x 7 positions x 32 x 4 bytes)" in err, err
    assert loads == [] and not out.exists()
