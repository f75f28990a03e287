"""Perplexity against the model's own loss and a per-token reference; splice eval's tasks against
``splice.zoo.evaluate`` (the path ``splice zoo eval`` takes)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from surgery_helpers import load, word_text

from splice.cli import main
from splice.errors import SpliceError
from splice.modeling import load_tokenizer
from splice.scoring import evaluate, perplexity, text_ids, windows

torch.set_num_threads(1)


def test_one_window_equals_the_models_loss(tiny_models):
    src = tiny_models["llama"]
    model, tok = load(src), load_tokenizer(src)
    ids = text_ids(tok, word_text())[:32]
    with torch.no_grad():
        loss = model(ids[None], labels=ids[None]).loss.item()
    p = perplexity(model, ids, seq_len=32, stride=32)
    assert p.windows == 1 and p.tokens == 31
    assert p.nll == pytest.approx(loss, abs=1e-6) and p.ppl == pytest.approx(math.exp(loss))


@pytest.mark.parametrize(("seq_len", "stride", "batch"), [(16, 8, 3), (16, 16, 2), (12, 5, 8)])
def test_sliding_windows_against_a_per_token_reference(tiny_models, seq_len, stride, batch):
    src = tiny_models["mistral"]
    model, tok = load(src), load_tokenizer(src)
    ids = text_ids(tok, word_text(), max_tokens=61)
    n = ids.numel()
    # reference: Hugging Face's loop, one window at a time, each token's own log-probability
    total, count, prev_end = 0.0, 0, 0
    for begin in range(0, n, stride):
        end = min(begin + seq_len, n)
        with torch.no_grad():
            logp = torch.log_softmax(model(ids[None, begin:end]).logits[0].double(), -1)
        for pos in range(max(prev_end, begin + 1), end):
            total -= logp[pos - 1 - begin, ids[pos]].item()
            count += 1
        prev_end = end
        if end == n:
            break
    p = perplexity(model, ids, seq_len=seq_len, stride=stride, batch_size=batch)
    assert p.tokens == count and p.nll == pytest.approx(total / count, abs=1e-6)
    if stride < seq_len:
        assert count == n - 1  # every token after the first is scored exactly once
    assert windows(n, seq_len, stride)[0] == (0, seq_len, 1)


def test_evaluate_tasks_take_the_zoo_eval_path(analysis_zoo, zoo):
    from splice.zoo import evaluate as zoo_evaluate

    text = (analysis_zoo / "corpus.txt").read_text()
    base = str(zoo / "base")
    got = evaluate([base], text=text, tasks="zoo_math", limit=40, seq_len=64)
    ref = zoo_evaluate([base], ["zoo_math"], zoo=zoo, limit=40, show_progress=False)
    assert got[base]["zoo_math"] == ref[base]["zoo_math"]
    tok = load_tokenizer(base)
    assert got[base]["ppl"] == pytest.approx(
        perplexity(load(zoo / "base"), text, tokenizer=tok, seq_len=64).ppl
    )
    # a live model scores the same as its folder
    live = evaluate({"live": load(zoo / "base")}, text=text, tokenizer=tok, seq_len=64)
    assert live["live"]["ppl"] == pytest.approx(got[base]["ppl"], rel=1e-6)


def test_cli_eval(tiny_models, tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text(word_text())
    models = [str(tiny_models["llama"]), str(tiny_models["gemma"])]
    args = ["eval", *models, "--ppl", str(text), "--seq-len", "16", "--device", "cpu"]
    assert main([*args, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert set(data) == set(models) and all(data[m]["ppl"] > 1 for m in models)
    assert main(args) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split() == ["model", "ppl"] and len(out.splitlines()) == 3


def test_cli_eval_threads(tiny_models, tmp_path, capsys, monkeypatch):
    """--threads runs the scoring on that many torch threads (restored after); without it a
    tiny model runs on one; the perplexity is the same."""
    import torch

    from splice import scoring

    text = tmp_path / "t.txt"
    text.write_text(word_text())
    args = ["eval", str(tiny_models["llama"]), "--ppl", str(text), "--seq-len", "16", "--json"]
    seen: list[int] = []
    real = scoring.perplexity
    monkeypatch.setattr(
        scoring,
        "perplexity",
        lambda *a, **k: (seen.append(torch.get_num_threads()), real(*a, **k))[1],
    )
    before = torch.get_num_threads()
    ppl = []
    for extra, want in ((["--threads", "3"], 3), ([], 1)):
        seen.clear()
        assert main([*args, "--device", "cpu", *extra]) == 0
        ppl.append(json.loads(capsys.readouterr().out)[str(tiny_models["llama"])]["ppl"])
        assert seen == [want] and torch.get_num_threads() == before
    assert ppl[0] == pytest.approx(ppl[1], rel=1e-5)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--ppl", "SHORT", "--seq-len", "16"], "the text is too short: 4 tokens"),
        (["--ppl", "TEXT", "--stride", "40", "--seq-len", "16"], "stride 40 is longer than"),
        (["--ppl", "TEXT", "--seq-len", "100"], "exceeds the model's 64 positions"),
        (["--ppl", "MISSING"], "no such text file"),
        ([], "nothing to score"),
        (["--tasks", "zoo_chess"], "unknown zoo task zoo_chess"),
    ],
)
def test_bad_input_one_line_exit_2(args, message, tiny_models, tmp_path, capsys):
    (tmp_path / "TEXT").write_text(word_text())
    (tmp_path / "SHORT").write_text("w1 w2 w3")
    args = [str(tmp_path / a) if a in ("TEXT", "SHORT", "MISSING") else a for a in args]
    code = main(["eval", str(tiny_models["llama"]), *args, "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2 and message in err, err
    assert len(err.strip().splitlines()) == 1


def test_live_model_needs_a_tokenizer(tiny_models):
    with pytest.raises(SpliceError, match="needs its tokenizer"):
        evaluate({"m": load(tiny_models["llama"])}, text=word_text())
