"""Standard errors of the activation metrics over windows, the margin of a recommendation over
its runner-up (and the warning on a near-tie), the last layer's output through the final norm
(HF's ``hidden_states[-1]``), and calibration windows equal to the whole text's tokens.

References: numpy's ``std(ddof=1) / √n`` of per-window values computed here from hand-built
hidden states, transformers' ``output_hidden_states``, and tokenizing the whole text at once.
"""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
import torch
from surgery_helpers import word_text

from splice.analysis.activations import activation_report, analyze_activations, prune_blocks
from splice.calib import (
    Capture,
    LayerIO,
    LayerStats,
    WindowMoments,
    layer_statistics,
    text_tokens,
    token_windows,
)
from splice.cli import main
from splice.modeling import load_tokenizer
from splice.scoring import text_ids

F = torch.nn.functional


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def np_cos(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    return (u * v).sum(-1) / np.linalg.norm(u, axis=-1) / np.linalg.norm(v, axis=-1)


def np_angle(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    return np.arccos(np.clip(np_cos(u, v), -1, 1)) / np.pi


def se_ref(v: np.ndarray) -> np.ndarray:
    """Standard error over axis 0: the sample std (ddof 1) / √n."""
    return np.std(v, axis=0, ddof=1) / np.sqrt(v.shape[0])


# ---- WindowMoments ------------------------------------------------------------------------------
def test_moments_of_known_values():
    rng = np.random.default_rng(0)
    v = 0.9 + 0.01 * rng.standard_normal((37, 3, 3))
    m = WindowMoments((3, 3))
    for chunk in np.array_split(v, 5):  # folded in batches of uneven size
        m.add(chunk)
    np.testing.assert_allclose(m.mean(), v.mean(0), rtol=1e-12)
    np.testing.assert_allclose(m.std(), np.std(v, axis=0, ddof=1), rtol=1e-9)
    np.testing.assert_allclose(m.stderr(), se_ref(v), rtol=1e-9)
    per_entry = WindowMoments((2,))  # one entry at a time, as LayerIO folds layer by layer
    per_entry.add(v[:, 0, 0], 0)
    per_entry.add(v[:, 1, 2], 1)
    np.testing.assert_allclose(per_entry.stderr(), se_ref(v[:, [0, 1], [0, 2]]), rtol=1e-9)


def test_moments_identical_windows_and_one_window():
    m = WindowMoments((4,))
    for _ in range(3):
        m.add(np.full((5, 4), 0.123456789))
    assert (m.stderr() == 0).all() and (m.mean() == 0.123456789).all()
    one = WindowMoments((2,))
    one.add(np.ones((1, 2)))
    assert np.isnan(one.stderr()).all()


# ---- LayerIO on hand-built hidden states --------------------------------------------------------
def feed(states: torch.Tensor, batch_size: int) -> LayerStats:
    """Run LayerIO on boundary states ``[N, L+1, T, H]``: layer l gets x = states[:, l] and
    y = states[:, l+1], batch by batch, as the runner's hooks would."""
    n, k, t, _ = states.shape
    io = LayerIO()
    io.start(None, k - 1)
    for b, lo in enumerate(range(0, n, batch_size)):
        s = states[lo : lo + batch_size]
        mask = torch.ones(s.shape[0], t, dtype=torch.bool)
        for layer in range(k - 1):
            io.update(Capture(layer, b, s[:, layer], s[:, layer + 1], mask))
        io.finish_batch(b)
    return io.result()


def per_window_refs(states: torch.Tensor) -> dict[str, np.ndarray]:
    """Per-window io cosine (positions ≥ 1), all-position cosine and last-token angles."""
    h = states.double().numpy()  # [N, L+1, T, H]
    cos = np_cos(h[:, :-1], h[:, 1:])  # [N, L, T]
    last = h[:, :, -1]  # [N, L+1, H]
    ang = np_angle(last[:, :, None], last[:, None, :])  # [N, L+1, L+1]
    return {"io": cos[:, :, 1:].mean(-1), "all": cos.mean(-1), "angles": ang}


def test_layer_io_standard_errors_against_numpy():
    g = torch.Generator().manual_seed(0)
    n, layers, t, h = 10, 3, 6, 8
    base = torch.randn(1, layers + 1, t, h, generator=g)
    states = base + 0.3 * torch.randn(n, layers + 1, t, h, generator=g)  # windows vary
    stats = feed(states, batch_size=4)  # batches of 4, 4, 2
    ref = per_window_refs(states)
    np.testing.assert_allclose(stats.io_cosine_se(), se_ref(ref["io"]), rtol=1e-5)
    np.testing.assert_allclose(stats.io_cosine_se(True), se_ref(ref["all"]), rtol=1e-5)
    np.testing.assert_allclose(stats.angular_distance_se(), se_ref(ref["angles"]), atol=1e-9)
    assert (stats.io_cosine_se() > 1e-3).all()
    # the per-window values kept for paired differences are the windows' own, in order
    np.testing.assert_allclose(stats.io_cosine_windows(), ref["io"], rtol=1e-5)
    np.testing.assert_allclose(stats.io_cosine_windows(True), ref["all"], rtol=1e-5)
    np.testing.assert_allclose(stats.angular_distance_windows(), ref["angles"], atol=1e-7)
    report = activation_report(stats, "hand-built")
    for layer in range(layers):
        io = report.values("io_cosine", layer=layer)[0]
        assert io["value"] == pytest.approx(ref["io"][:, layer].mean(), abs=1e-6)
        assert io["se"] == pytest.approx(se_ref(ref["io"])[layer], rel=1e-5)
        bi = report.values("block_influence", layer=layer)[0]
        assert bi["se"] == pytest.approx(se_ref(ref["all"])[layer], rel=1e-5)
        nxt = report.values("angular_distance_next", layer=layer)[0]
        assert nxt["se"] == pytest.approx(se_ref(ref["angles"])[layer, layer + 1], rel=1e-6)
    by_n = report.matrices["angular_distance_se"].values
    ang_se = se_ref(ref["angles"])
    assert by_n[1, 0] == pytest.approx(ang_se[0, 2], rel=1e-6)  # n = 2, l = 0: d(0, 2)


def test_identical_windows_have_zero_error():
    g = torch.Generator().manual_seed(1)
    one = torch.randn(1, 4, 5, 8, generator=g)
    stats = feed(one.expand(6, -1, -1, -1).contiguous(), batch_size=4)
    assert (stats.io_cosine_se() == 0).all() and (stats.io_cosine_se(True) == 0).all()
    assert (stats.angular_distance_se() == 0).all()
    report = activation_report(stats, "identical")
    assert all(r["se"] == 0 for r in report.records)
    assert all(b["margin_se"] == 0 for b in report.recommendations["prune_blocks"])


# ---- margins and the near-tie warning -----------------------------------------------------------
def stats_from_angles(per_window: np.ndarray) -> LayerStats:
    """LayerStats whose last-token angles (radians) are ``per_window`` ``[N, L+1, L+1]`` and
    whose io cosines are 0.5 in every window."""
    n, k, _ = per_window.shape
    s = LayerStats.zeros(k - 1)
    s.samples, s.tokens, s.tokens_all = n, n, 2 * n
    s.angles = per_window.sum(0)
    s.angles_w.add(per_window)
    s.angles_windows.append(per_window)
    s.io_cos[:] = s.io_cos_all[:] = 0.5 * n
    for layer in range(k - 1):
        s.io_cos_w.add(np.full(n, 0.5), layer)
        s.io_cos_all_w.add(np.full(n, 0.5), layer)
    return s


def distances(d_next: list[float], n: int, noise: float, seed: int = 0) -> np.ndarray:
    """Per-window angles ``[n, L+1, L+1]``: d(l, l+1) with mean exactly d_next[l] and sample
    std exactly ``noise`` (×π), and 0.9 (×π) between any boundaries further apart."""
    rng = np.random.default_rng(seed)
    k = len(d_next) + 1
    a = np.full((n, k, k), 0.9 * np.pi)
    for lo, v in enumerate(d_next):
        z = rng.standard_normal(n)
        z = (z - z.mean()) / z.std(ddof=1) if noise else z * 0
        w = np.pi * (v + noise * z)
        a[:, lo, lo + 1] = a[:, lo + 1, lo] = w
    a[:, np.arange(k), np.arange(k)] = 0
    return a


def test_margin_over_the_runner_up():
    per_window = distances([0.30, 0.078, 0.076, 0.40], n=16, noise=0.02)
    stats = stats_from_angles(per_window)
    d = per_window / np.pi
    with pytest.warns(UserWarning) as rec:
        report = activation_report(stats, "near-tie")
    msgs = [str(w.message) for w in rec]
    assert len(msgs) == 2 and not any("\n" in m for m in msgs)  # duplicating 1 layer: same tie
    assert msgs[0].startswith("prune 1 layers: layers 2-2 (d = 0.0760) beat layers 1-1 (0.0780)")
    assert msgs[1].startswith("duplicate 1 layers: layers 2-2")
    best = report.recommendations["prune_blocks"][0]  # n = 1
    means, errs = d.mean(0), se_ref(d)
    lo, ru = int(np.argmin([means[i, i + 1] for i in range(4)])), 1
    assert best["start"] == lo == 2 and best["runner_up"]["start"] == ru
    assert best["margin"] == pytest.approx(means[ru, ru + 1] - means[lo, lo + 1], abs=1e-12)
    paired = (d[:, ru, ru + 1] - d[:, lo, lo + 1]).std(ddof=1) / 4  # std / √16 windows
    assert best["margin_se"] == pytest.approx(paired, rel=1e-9) and best["paired"] is True
    assert best["within_error"] is True and best["margin"] < paired
    assert best["margin"] == pytest.approx(0.002, abs=1e-12)
    # the two blocks' windows are drawn independently here, so pairing changes little
    combined = math.hypot(errs[lo, lo + 1], errs[ru, ru + 1])
    assert combined == pytest.approx(math.hypot(0.02, 0.02) / 4, rel=1e-9)
    assert 0.5 * combined < paired < 1.5 * combined
    assert "± " in report.recommendations["prune 1 layers"]
    assert "next best layers 1-1" in report.recommendations["prune 1 layers"]


def test_blocks_that_move_together_are_told_apart_by_pairing():
    """Each window shifts every distance by the same amount (its text is easier or harder):
    the unpaired error sees two noisy means 0.002 apart and calls it a tie; the per-window
    difference is exactly 0.002 in every window, so the paired error is 0 and there is no tie."""
    n = 16
    base = distances([0.30, 0.078, 0.076, 0.40], n=n, noise=0.0)
    shift = np.pi * 0.02 * np.random.default_rng(1).standard_normal(n)
    per_window = base + shift[:, None, None] * (1 - np.eye(5))[None]
    stats = stats_from_angles(per_window)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no near-tie warning
        report = activation_report(stats, "paired")
    best = report.recommendations["prune_blocks"][0]
    assert best["start"] == 2 and best["runner_up"]["start"] == 1
    assert best["margin"] == pytest.approx(0.002, abs=1e-12)
    assert best["margin_se"] == pytest.approx(0, abs=1e-12) and best["within_error"] is False
    unpaired = prune_blocks(stats.angular_distance(), stats.angular_distance_se())[
        0
    ]  # no windows: the independent formula
    assert unpaired["within_error"] is True and unpaired["margin_se"] > 0.002
    assert "paired" not in unpaired or unpaired["paired"] is False


def test_order_ties_are_paired_over_windows():
    """Two layers whose per-window values differ by exactly 0.01 while every window shifts both
    by a lot: unpaired, a tie; paired, the difference has no error at all."""
    from splice.layer_metrics import order_ties

    rng = np.random.default_rng(2)
    common = 0.1 * rng.standard_normal(20)
    w = np.stack([0.30 + common, 0.31 + common, 0.90 + 0 * common], axis=1)  # [N, L]
    values, se = w.mean(0), w.std(0, ddof=1) / np.sqrt(len(w))
    assert order_ties(values, se) == [1]  # independent errors: layers 0 and 1 tie
    assert order_ties(values, se, w) == []


def test_tied_n_are_listed_as_ranges():
    from splice.layer_metrics import ranges_text

    assert ranges_text([1, 2, 3, 5, 7, 8]) == "1-3, 5, 7-8" and ranges_text([4]) == "4"


def test_a_clear_winner_does_not_warn():
    stats = stats_from_angles(distances([0.30, 0.20, 0.05, 0.40], n=16, noise=0.002))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report = activation_report(stats, "clear")
    best = report.recommendations["prune_blocks"][0]
    assert best["within_error"] is False and best["margin"] > 10 * best["margin_se"]


def test_prune_blocks_without_errors_keeps_its_old_fields():
    d = np.full((4, 4), 0.5)
    d[0, 1], d[1, 2], d[2, 3] = 0.2, 0.1, 0.3
    assert prune_blocks(d)[0] == {"n": 1, "start": 1, "layers": [1, 1], "angular_distance": 0.1}


def test_order_ties_for_block_influence():
    # layers' io cosine means 0.9, 0.89, 0.5 with se 0.01: pruning 1 layer (0 or 1) is a tie
    s = LayerStats.zeros(3)
    rng = np.random.default_rng(0)
    n = 25
    for layer, mean in enumerate([0.9, 0.89, 0.5]):
        v = mean + 0.05 * rng.standard_normal(n)
        v = mean + (v - v.mean())  # exact mean
        s.io_cos_all_w.add(v, layer)
        s.io_cos_w.add(v, layer)
        s.io_cos_all[layer] = s.io_cos[layer] = v.sum()
    s.samples, s.tokens, s.tokens_all = n, n, n
    a = distances([0.1, 0.2, 0.3], n=n, noise=0.0)
    s.angles, _ = a.sum(0), s.angles_w.add(a)
    s.angles_windows.append(a)
    report = activation_report(s, "orders")
    assert report.recommendations["prune_order_block_influence"][:2] == [0, 1]
    assert report.recommendations["prune_order_block_influence_ties"] == [1]


# ---- the final norm (HF's hidden_states[-1]) ------------------------------------------------------
@pytest.fixture(scope="module")
def llama(tiny_models):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_models["llama"], dtype=torch.float32).eval()


@pytest.mark.parametrize("final_norm", [True, False])
def test_last_output_against_output_hidden_states(llama, final_norm):
    ids = torch.randint(4, 96, (5, 9), generator=torch.Generator().manual_seed(0))
    stats = layer_statistics(
        llama, ids, batch_size=2, final_norm="model.norm" if final_norm else None
    )
    assert stats.final_norm is final_norm
    config = llama.config
    old = getattr(config, "tie_last_hidden_states", None)
    config.tie_last_hidden_states = final_norm  # True: hidden_states[-1] after the final norm
    try:
        with torch.no_grad():
            hs = llama(ids, output_hidden_states=True).hidden_states
    finally:
        config.tie_last_hidden_states = old
    with torch.no_grad():
        normed = llama.model.norm(hs[-1]) if not final_norm else None
    h = torch.stack(hs).double().numpy()  # [L+1, N, T, H]
    n_layers = h.shape[0] - 1
    last = h[:, :, -1]
    ref = np.array(
        [
            [np_angle(last[a], last[b]).mean() for b in range(n_layers + 1)]
            for a in range(n_layers + 1)
        ]
    )
    np.testing.assert_allclose(stats.angular_distance(), ref, atol=1e-6)
    cos = np_cos(h[-2], h[-1])  # the last layer's input and output, [N, T]
    assert stats.io_cos_all[-1] / stats.tokens_all == pytest.approx(cos.mean(), abs=1e-5)
    if normed is not None:  # before the norm differs from after it: the option matters
        after = normed.double().numpy()[:, -1]
        assert not np.allclose(np_angle(last[0], after), np_angle(last[0], last[-1]), atol=1e-3)


def test_analyze_activations_defaults_to_after_the_norm(tiny_models, tmp_path, capsys):
    src = tiny_models["llama"]
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(word_text())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        after = analyze_activations(src, corpus, seq_len=8, max_samples=6)
        before = analyze_activations(src, corpus, seq_len=8, max_samples=6, final_norm=False)
    assert after.meta["final_norm"] is True and before.meta["final_norm"] is False
    last = after.meta["num_layers"] - 1
    a = after.matrices["angular_distance_pairs"].values
    b = before.matrices["angular_distance_pairs"].values
    np.testing.assert_array_equal(a[: last + 1, : last + 1], b[: last + 1, : last + 1])
    assert abs(a[0, -1] - b[0, -1]) > 1e-3
    out = tmp_path / "cli"
    argv = ["analyze", "activations", str(src), "--calibration", str(corpus), "--seq-len", "8"]
    argv += ["--max-samples", "6", "--device", "cpu", "--last-before-norm", "--out", str(out)]
    assert main(argv) == 0
    data = json.loads((out / "report.json").read_text())
    assert data["meta"]["final_norm"] is False
    np.testing.assert_allclose(
        np.array(data["matrices"]["angular_distance_pairs"]["values"], dtype=float), b, atol=1e-12
    )
    assert all("se" in r for r in data["records"])
    # a near-tie warns on one line of stderr
    err = capsys.readouterr().err
    tied = [x["n"] for x in data["recommendations"]["prune_blocks"] if x["within_error"]]
    quarter = max(1, data["meta"]["num_layers"] // 4)
    lines = [ln for ln in err.splitlines() if "standard error of the difference" in ln]
    assert len(lines) == (quarter in tied) + any(
        x["within_error"] for x in data["recommendations"]["duplicate_ranges"] if x["n"] == quarter
    )
    assert lines and all(ln.startswith("splice: warning: prune 1 layers") for ln in lines)


# ---- calibration windows: the whole text's tokens -----------------------------------------------
def metaspace_tokenizer(vocab: int = 96):
    """Like the zoo's: word level behind a Metaspace pre-tokenizer that prepends ▁ to the text,
    so tokenizing pieces separately adds a token at each piece's start."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<s>", "</s>", "<unk>"] + [f"▁w{i}" for i in range(vocab - 4)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def old_chunked(tok, text: str) -> list[int]:
    """The tokens the old token_windows read: the text in pieces of 256 lines."""
    lines = text.splitlines(keepends=True)
    ids: list[int] = []
    for k in range(0, len(lines), 256):
        ids += tok("".join(lines[k : k + 256]), add_special_tokens=False)["input_ids"]
    return ids


@pytest.mark.parametrize("docs", [False, True])
def test_windows_are_the_whole_texts_tokens(docs):
    tok = metaspace_tokenizer()
    rng = np.random.default_rng(0)
    lines = [" ".join(f"w{i}" for i in rng.integers(0, 92, 3)) for _ in range(1200)]
    text = ("\n\n" if docs else "\n").join(lines)
    whole = tok(text, add_special_tokens=False)["input_ids"]
    assert old_chunked(tok, text) != whole  # the bug this guards against
    for seq_len, samples in [(16, 1), (16, 4), (33, 64), (16, 10_000)]:
        got = token_windows(tok, text, seq_len, samples)
        body = seq_len - 1
        count = min(samples, len(whole) // body)
        want = torch.tensor([whole[i * body : (i + 1) * body] for i in range(count)])
        assert got.shape == (count, seq_len) and (got[:, 0] == tok.bos_token_id).all()
        assert torch.equal(got[:, 1:], want)
    assert text_tokens(tok, text, 50)[:50] == whole[:50]
    assert text_ids(tok, text, max_tokens=700).tolist() == [tok.bos_token_id, *whole[:699]]


def test_windows_of_the_conftest_tokenizer(tiny_models):
    tok = load_tokenizer(tiny_models["llama"])
    text = word_text(words=8000)
    whole = tok(text, add_special_tokens=False)["input_ids"]
    got = token_windows(tok, text, 12, 500)
    assert got[:, 1:].reshape(-1).tolist() == whole[: 11 * got.shape[0]]
