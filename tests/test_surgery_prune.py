"""Pruning: the chosen layers against the metrics computed independently from
``output_hidden_states``, and the pruned model against the source's remaining layers."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from surgery_helpers import angle, cosine, hidden_states, load, logits, planned_logits, word_text

from splice.activations import calibration_text, token_windows
from splice.cli import main
from splice.errors import SpliceError
from splice.modeling import load_tokenizer
from splice.surgery import Calibration, plan_prune, prune

torch.set_num_threads(1)
CALIB = Calibration(seq_len=24, max_samples=8, batch_size=4)


def reference_metrics(model_dir, text_file):
    windows = token_windows(load_tokenizer(model_dir), calibration_text(text_file), 24, 8)
    # [L+1, N, T, H], the last through the final norm, as the analysis (PruneMe, ShortGPT) reads it
    hs = hidden_states(load(model_dir), windows, final_norm=True)
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
