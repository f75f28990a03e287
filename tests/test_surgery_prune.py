"""Pruning: the chosen layers against the metrics computed independently from
``output_hidden_states``, and the pruned model against the source's remaining layers."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from surgery_helpers import angle, cosine, hidden_states, load, logits, planned_logits, word_text

from splice.calib import calibration_text, token_windows
from splice.cli import main
from splice.errors import SpliceError
from splice.modeling import load_tokenizer
from splice.surgery import Calibration, plan_prune, prune

torch.set_num_threads(1)
CALIB = Calibration(seq_len=24, max_samples=8, batch_size=4)


def reference_metrics(model_dir, text_file, final_norm=True):
    windows = token_windows(load_tokenizer(model_dir), calibration_text(text_file), 24, 8)
    # [L+1, N, T, H], the last through the final norm, as the analysis (PruneMe, ShortGPT) reads it
    hs = hidden_states(load(model_dir), windows, final_norm=final_norm)
    last = hs[:, :, -1]
    n_layers = hs.shape[0] - 1
    dist = np.array(
        [[angle(last[a], last[b]).mean() for b in range(n_layers + 1)] for a in range(n_layers + 1)]
    )
    influence = np.array([1 - cosine(hs[i], hs[i + 1]).mean() for i in range(n_layers)])
    return dist, influence


@pytest.mark.parametrize("model", ["base", "moe"])
def test_chosen_layers_match_hidden_state_metrics(model, analysis_zoo, tmp_path):
    src, text = analysis_zoo / model, analysis_zoo / "corpus.txt"
    dist, influence = reference_metrics(src, text)
    n_layers = len(influence)
    for n in (1, 2, 3):
        ang = prune(src, tmp_path / f"a{n}", n=n, by="angular", calibration=text, calib=CALIB)
        d = [dist[lo, lo + n] for lo in range(n_layers - n + 1)]
        lo = int(np.argmin(d))
        assert ang.report.chosen == list(range(lo, lo + n))
        np.testing.assert_allclose([c["value"] for c in ang.report.candidates], d, atol=1e-6)
        inf = prune(src, tmp_path / f"i{n}", n=n, by="influence", calibration=text, calib=CALIB)
        assert inf.report.chosen == sorted(np.argsort(influence, kind="stable")[:n].tolist())
        np.testing.assert_allclose(
            [c["value"] for c in inf.report.candidates], influence, atol=1e-5
        )
        for res in (ang, inf):
            keep = [i for i in range(n_layers) if i not in res.report.chosen]
            assert res.report.layers == keep
            cfg = json.loads((res.out / "config.json").read_text())
            assert cfg["num_hidden_layers"] == n_layers - n
            torch.testing.assert_close(
                logits(res.out), planned_logits(src, keep), atol=1e-4, rtol=1e-4
            )


@pytest.mark.parametrize("model", ["base", "moe"])
def test_angular_prune_warns_on_its_own_near_tie(model, analysis_zoo):
    """The warning follows the chosen block's margin over the runner-up against the standard
    error of their per-window difference (paired; per-window distances from
    ``output_hidden_states``, std / √N); the analysis' own headline warnings (other block sizes,
    duplication) are not repeated."""
    import warnings

    src, text = analysis_zoo / model, analysis_zoo / "corpus.txt"
    windows = token_windows(load_tokenizer(src), calibration_text(text), 24, 8)
    last = hidden_states(load(src), windows, final_norm=True)[:, :, -1]
    n_layers, count = last.shape[0] - 1, last.shape[1]
    expected = {}
    for n in (1, 2, 3):
        per = np.array([angle(last[lo], last[lo + n]) for lo in range(n_layers - n + 1)])
        mean = per.mean(1)
        first, second = np.argsort(mean, kind="stable")[:2]
        diff = per[second] - per[first]
        expected[n] = diff.mean() <= diff.std(ddof=1) / np.sqrt(count)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            plan_prune(src, n=n, by="angular", calibration=text, calib=CALIB)
        msgs = [str(w.message) for w in caught if "layers" in str(w.message)]
        assert all(m.startswith(f"prune --n {n}: layers {first}-{first + n - 1} ") for m in msgs)
        assert len(msgs) == int(expected[n]), (n, msgs)


def test_angular_prune_is_quiet_on_a_clear_choice(analysis_zoo, tmp_path):
    """A layer whose residual writers are zeroed is the identity: d(3, 4) = 0 in every window,
    a margin no standard error reaches, so no warning."""
    import shutil
    import warnings

    from safetensors.torch import load_file, save_file

    src = tmp_path / "base"
    shutil.copytree(analysis_zoo / "base", src)
    weights = load_file(src / "model.safetensors")
    for name in ("self_attn.o_proj.weight", "mlp.down_proj.weight"):
        weights[f"model.layers.3.{name}"].zero_()
    save_file(weights, src / "model.safetensors", metadata={"format": "pt"})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = plan_prune(src, n=1, by="angular", calibration=analysis_zoo / "corpus.txt",
                         calib=CALIB)  # fmt: skip
    assert res.report.chosen == [3]
    assert not [w for w in caught if "layers" in str(w.message)]


def test_last_before_norm_flag(analysis_zoo, tmp_path, capsys):
    """``--last-before-norm`` measures the last layer's output before the final norm: the
    candidates that end at the last layer change, and equal the reference taken there."""
    src, text = analysis_zoo / "base", analysis_zoo / "corpus.txt"
    args = ["prune", str(src), "--n", "1", "--by", "angular", "--calibration", str(text)]
    opts = ["--seq-len", "24", "--max-samples", "8", "--batch-size", "4", "--device", "cpu"]
    values = {}
    for flag in ([], ["--last-before-norm"]):
        assert main([*args, *opts, *flag, "--dry-run", "--json"]) == 0
        report = json.loads(capsys.readouterr().out)
        values[bool(flag)] = [c["value"] for c in report["candidates"]]
    for before in (False, True):
        dist, _ = reference_metrics(src, text, final_norm=not before)
        n_layers = dist.shape[0] - 1
        want = [dist[lo, lo + 1] for lo in range(n_layers)]
        np.testing.assert_allclose(values[before], want, atol=1e-6)
    assert values[True][:-1] == pytest.approx(values[False][:-1], abs=1e-9)
    assert abs(values[True][-1] - values[False][-1]) > 1e-4


@pytest.mark.parametrize("arch", ["llama", "qwen2", "phi3", "mixtral"])
def test_drop_given_layers(arch, tiny_models, tmp_path):
    res = prune(tiny_models[arch], tmp_path / "o", drop="1,3")
    assert res.report.layers == [0, 2] and res.report.removed == [1, 3]
    torch.testing.assert_close(
        logits(tmp_path / "o"), planned_logits(tiny_models[arch], [0, 2]), atol=1e-5, rtol=0
    )
    card = (tmp_path / "o" / "README.md").read_text()
    assert "prune --drop 1,3" in card and "Removed source layers: 1, 3" in card


def test_dry_run_prints_every_candidate(tiny_models, tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text(word_text())
    args = ["prune", str(tiny_models["llama"]), str(tmp_path / "o"), "--n", "2"]
    opts = ["--calibration", str(text), "--seq-len", "16", "--device", "cpu", "--dry-run"]
    assert main([*args, "--by", "angular", *opts]) == 0
    out = capsys.readouterr().out
    assert out.count("layers ") >= 3 and "<- chosen" in out and "4 -> 2 layers" in out
    assert not (tmp_path / "o").exists()
    assert main([*args, "--by", "influence", *opts]) == 0
    assert capsys.readouterr().out.count("<- chosen") == 2


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--drop", "0,1,2,3"], "leaves none (remove at most 3)"),
        (["--drop", "4"], "layer 4 is out of range"),
        (["--drop", "1,1"], "given twice"),
        (["--n", "4", "--calibration", "TEXT"], "--n: removing 4 layers of a 4-layer model"),
        (["--n", "9", "--calibration", "TEXT"], "--n: removing 9 layers"),
        (["--n", "1"], "prune --n needs --calibration"),
        (["--n", "1", "--drop", "2", "--calibration", "TEXT"], "exactly one of"),
        ([], "exactly one of"),
        (["--drop", "1", "--by", "angular"], "takes no --by"),
        (["--n", "1", "--calibration", "SHORT", "--seq-len", "64"], "the text is too short"),
        (["--n", "1", "--calibration", "MISSING"], "no such calibration file"),
    ],
)
def test_bad_input_one_line_exit_2(args, message, tiny_models, tmp_path, capsys):
    (tmp_path / "TEXT").write_text(word_text())
    (tmp_path / "SHORT").write_text("w1 w2 w3")
    args = [str(tmp_path / a) if a in ("TEXT", "SHORT", "MISSING") else a for a in args]
    out = tmp_path / "o"
    code = main(["prune", str(tiny_models["llama"]), str(out), *args, "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2 and message in err, err
    assert len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_library_refuses_bad_metric(tiny_models):
    with pytest.raises(SpliceError, match="--by size: choose from angular, influence"):
        plan_prune(tiny_models["llama"], n=1, by="size", calibration="zoo")


def test_prune_picks_what_the_analysis_recommends(analysis_zoo):
    """One run, one choice: the verb (core ``splice.layer_metrics``) and ``analyze
    activations`` (its report) agree on every n, by angular distance and by influence."""
    import warnings

    from splice.analysis.activations import analyze_activations

    src, text = analysis_zoo / "base", analysis_zoo / "corpus.txt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # near-ties are the subject of other tests
        rec = analyze_activations(
            src, text, seq_len=CALIB.seq_len, max_samples=CALIB.max_samples, batch_size=4
        ).recommendations
        for n in (1, 2, 3):
            ang = plan_prune(src, n=n, by="angular", calibration=text, calib=CALIB)
            first, last = rec["prune_blocks"][n - 1]["layers"]
            assert ang.report.chosen == list(range(first, last + 1))
            inf = plan_prune(src, n=n, by="influence", calibration=text, calib=CALIB)
            assert inf.report.chosen == sorted(rec["prune_order_block_influence"][:n])
