"""Healing: what changes (and what stays byte-identical), LoRA merged back (the change of every
adapted weight has rank <= R), determinism, MoE, and bad input."""

from __future__ import annotations

import json

import pytest
import torch
from surgery_helpers import logits, word_text

from splice.checkpoint import open_checkpoint
from splice.cli import main
from splice.errors import SpliceError
from splice.surgery import heal, read_record, upscale

pytest.importorskip("peft", reason="peft (the lora extra) is needed for --lora")
torch.set_num_threads(1)
FAST = dict(steps=3, lr=1e-3, batch_size=2, seq_len=16)


@pytest.fixture
def text(tmp_path):
    path = tmp_path / "heal.txt"
    path.write_text(word_text(words=2000, seed=4))
    return path


def tensors(folder):
    ckpt = open_checkpoint(folder)
    return {n: ckpt.load(n) for n in ckpt.tensors}


def test_full_heal_changes_every_tensor_and_is_deterministic(tiny_models, text, tmp_path):
    src = tiny_models["llama"]
    result = heal(src, tmp_path / "h", text=text, **FAST)
    before, after = tensors(src), tensors(tmp_path / "h")
    assert set(before) == set(after)
    assert all(not torch.equal(before[n], after[n]) for n in before)
    assert len(result.report.losses) == 3 and result.report.changed_tensors == len(before)
    assert json.loads((tmp_path / "h" / "config.json").read_text())["num_hidden_layers"] == 4
    again = heal(src, tmp_path / "h2", text=text, **FAST)
    assert again.report.losses == result.report.losses
    assert all(torch.equal(after[n], t) for n, t in tensors(tmp_path / "h2").items())
    assert torch.isfinite(logits(tmp_path / "h")).all()


def test_only_new_layers_after_expand(tiny_models, text, tmp_path):
    grown = upscale(tiny_models["mistral"], tmp_path / "x", expand=2).out
    healed = heal(grown, tmp_path / "h", text=text, only_new_layers=True, **FAST)
    assert healed.report.trained_layers == [2, 5]
    ckpt = open_checkpoint(grown)
    before, after = tensors(grown), tensors(tmp_path / "h")
    for name in before:
        layer = ckpt.arch.layer_of(name)
        if layer in (2, 5):
            assert not torch.equal(before[name], after[name]), name
        else:
            assert torch.equal(before[name], after[name]), name
    assert read_record(tmp_path / "h")["new_layers"] == [2, 5]  # carried to the healed model
    assert "--only-new-layers" in (tmp_path / "h" / "README.md").read_text()


@pytest.mark.parametrize("arch", ["llama", "phi3"])
def test_lora_is_merged_back_with_rank_r(arch, tiny_models, text, tmp_path):
    src = tiny_models[arch]
    result = heal(src, tmp_path / "l", text=text, lora=2, **FAST)
    before, after = tensors(src), tensors(tmp_path / "l")
    ckpt = open_checkpoint(src)
    adapted = [n for n in before if ckpt.arch.layer_of(n) is not None and n.endswith("proj.weight")]
    assert adapted and result.report.changed_tensors == len(adapted)
    for name in before:
        delta = after[name] - before[name]
        if name in adapted:
            assert 0 < torch.linalg.matrix_rank(delta, atol=1e-6).item() <= 2, name
        else:
            assert torch.equal(before[name], after[name]), name  # norms, embeddings, head


def test_moe_heals_full_and_lora(tiny_models, text, tmp_path):
    src = tiny_models["mixtral"]
    full = heal(src, tmp_path / "f", text=text, **FAST)
    before, after = tensors(src), tensors(tmp_path / "f")
    experts = [n for n in before if ".experts." in n]
    assert experts and all(not torch.equal(before[n], after[n]) for n in experts)
    assert full.report.changed_tensors == len(before)
    lora = heal(src, tmp_path / "l", text=text, lora=2, **FAST)
    assert lora.report.changed_tensors > 0
    for folder in ("f", "l"):
        assert torch.isfinite(logits(tmp_path / folder)).all()


def test_cli_heal_with_scores(tiny_models, text, tmp_path, capsys):
    src = tiny_models["gemma"]
    args = ["heal", str(src), str(tmp_path / "h"), "--calibration", str(text), "--steps", "2"]
    opts = ["--seq-len", "16", "--batch-size", "2", "--device", "cpu", "--ppl", str(text)]
    assert main([*args, *opts, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["steps"] == 2 and set(data["scores"]) == {"source", "output"}
    assert data["scores"]["output"]["ppl"] > 1


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--only-new-layers"], "has no splice_surgery.json"),
        (["--train-layers", "7"], "--train-layers: layer 7 is out of range"),
        (["--lora-alpha", "4"], "--lora-alpha needs --lora R"),
        (["--seq-len", "5000"], "is too short: 2001 tokens, fewer than one window of 5000"),
        (["--steps", "0"], "'0' must be 1 or more"),
        (["--calibration", "MISSING"], "no such text file"),
    ],
)
def test_bad_input_one_line_exit_2(args, message, tiny_models, text, tmp_path, capsys):
    args = [str(tmp_path / a) if a == "MISSING" else a for a in args]
    base = ["heal", str(tiny_models["llama"]), str(tmp_path / "o"), "--calibration", str(text)]
    rest = ["--steps", "1"] if "--steps" not in args else []
    code = main([*base, *rest, *args, "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2 and message in err, err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_library_checks(tiny_models, text, tmp_path):
    with pytest.raises(SpliceError, match="lr must be a positive finite number"):
        heal(tiny_models["llama"], tmp_path / "o", text=text, steps=1, lr=0.0)
    with pytest.raises(SpliceError, match="not both"):
        heal(
            tiny_models["llama"],
            tmp_path / "o",
            text=text,
            steps=1,
            only_new_layers=True,
            train_layers=[1],
        )
