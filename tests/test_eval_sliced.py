"""A per-layer sliced model (``splice slice --basis per-layer``, model type ``splice_sliced``)
is scored by ``splice eval`` through ``load_sliced``: its perplexity and task accuracy against
the in-memory sliced model the slicing returns (the source at full width with the stream
projected at every block input, stock transformers modules: an independent computation of
the same function). Every other verb that runs a model refuses it in one line naming
``--basis shared``: analyze activations (its hidden states change basis at every block, so
layer-to-layer similarities would compare different coordinates) and heal (it writes
weights)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from splice.cli import main
from splice.execute import ExecOptions
from splice.scoring import evaluate, perplexity, read_text
from splice.surgery import Calibration, load_sliced, slice_model

SEQ = ["--seq-len", "64", "--device", "cpu"]


@pytest.fixture(scope="module")
def sliced(zoo, tmp_path_factory):
    """The zoo's base sliced 25% per layer on 8 windows of its calibration text, written in
    float32 (the in-memory model's dtype: the two compare to rounding)."""
    out = tmp_path_factory.mktemp("sliced") / "base-per-layer"
    res = slice_model(
        zoo / "base", out, sparsity=0.25, calibration="zoo", basis="per-layer", dtype="float32",
        calib=Calibration(seq_len=64, max_samples=8, batch_size=8),
        options=ExecOptions(show_progress=False),
    )  # fmt: skip
    assert json.loads((out / "config.json").read_text())["model_type"] == "splice_sliced"
    return res


def test_eval_scores_a_per_layer_sliced_model(sliced, zoo, capsys):
    out = str(sliced.out)
    assert main(["eval", out, "--ppl", "zoo", *SEQ, "--json"]) == 0
    got = json.loads(capsys.readouterr().out)[out]["ppl"]
    text = read_text("zoo")
    from splice.modeling import load_tokenizer

    tok = load_tokenizer(zoo / "base")
    mem = perplexity(sliced.model.eval(), text, tokenizer=tok, seq_len=64).ppl
    assert got == pytest.approx(mem, rel=1e-5)
    live = perplexity(load_sliced(out), text, tokenizer=tok, seq_len=64).ppl
    assert got == pytest.approx(live, rel=1e-6)
    source = evaluate([str(zoo / "base")], text=text, seq_len=64)[str(zoo / "base")]["ppl"]
    assert got != source and got == pytest.approx(source, rel=0.05)  # 25% of the width: close


def test_eval_runs_tasks_on_a_per_layer_sliced_model(sliced, zoo, capsys):
    out = str(sliced.out)
    assert main(["eval", out, "--tasks", "zoo_math,zoo_lang", "--limit", "40", *SEQ, "--json"]) == 0
    got = json.loads(capsys.readouterr().out)[out]
    ref = evaluate(
        {"mem": sliced.model.eval()},
        tasks="zoo_math,zoo_lang",
        tokenizer=str(zoo / "base"),
        limit=40,
    )["mem"]
    assert got == ref and set(got) == {"zoo_math", "zoo_lang"}


@pytest.mark.parametrize(
    "verb",
    [
        ["analyze", "activations", "MODEL", "--calibration", "zoo", "--seq-len", "32"],
        ["heal", "MODEL", "OUT", "--calibration", "zoo", "--steps", "1", "--seq-len", "32"],
        ["zoo", "eval", "MODEL", "--limit", "4"],
    ],
    ids=["analyze-activations", "heal", "zoo-eval"],
)
def test_other_verbs_refuse_it_in_one_line(verb, sliced, tmp_path, capsys):
    args = [{"MODEL": str(sliced.out), "OUT": str(tmp_path / "out")}.get(a, a) for a in verb]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "per-layer sliced model" in err and "--basis shared" in err, err
    assert not (tmp_path / "out").exists()


def test_non_finite_shortcut_is_refused(sliced, tmp_path, capsys):
    bad = tmp_path / "bad"
    shutil.copytree(sliced.out, bad)
    (file,) = bad.glob("*.safetensors")
    tensors = load_file(file)
    name = "model.layers.3.mlp_shortcut_Q"
    tensors[name] = torch.full_like(tensors[name], float("nan"))
    save_file(tensors, file, metadata={"format": "pt"})
    assert main(["eval", str(bad), "--ppl", "zoo", *SEQ]) == 2
    err = capsys.readouterr().err
    assert "model.layers.3.blocks.1.shortcut" in err and "cannot be scored" in err, err
