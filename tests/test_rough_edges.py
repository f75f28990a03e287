"""Issue 26's small rough edges: ``prune --drop`` ranges, the depth dry run's layer map,
``inspect``'s attention / MLP / RoPE fields, counts and articles in messages, the ``zoo``
calibration keyword beside a ``./zoo`` folder, transformers' warnings in ``splice slice``, and
hub ids in model cards."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from splice.cli import main
from splice.errors import SpliceError, SpliceWarning
from splice.surgery import layermaps

ZOO = Path(__file__).resolve().parent.parent / "assets" / "zoo"
SPLICE = str(Path(sys.executable).with_name("splice"))


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


# ---- 1. prune --drop takes upscale's layer lists ------------------------------------------------
def test_drop_takes_half_open_ranges_as_layers_does():
    assert layermaps.parse_indices("3:5", 8) == [3, 4]  # B not included, as --layers
    assert layermaps.parse_indices("3:5,7", 8) == [3, 4, 7]
    assert layermaps.parse_indices("7, 0:2", 8) == [0, 1, 7]
    # one parser: what --layers reads is what --drop reads, as a set
    for spec in ("0:3", "1,4:6", "0:8", "6,2:4"):
        assert layermaps.parse_indices(spec, 8) == sorted(layermaps.parse_ranges(spec, 8))
    for spec, message in [
        ("3:9", "3:9 is out of range (need 0 <= A < B <= 8"),
        ("5:3", "5:3 is out of range"),
        ("3:5,4", "layer 4 is given twice"),
        ("3-5", "is not A:B (a half-open range) or a layer index"),
        ("3,,4", "an empty item between commas"),
    ]:
        with pytest.raises(SpliceError, match=re.escape(message)):
            layermaps.parse_indices(spec, 8)


@pytest.mark.parametrize("layers", [[0, 1, 2, 5, 2], [3], [0, 1, 2, 3], [4, 3, 2], [1, 1, 2]])
def test_format_spec_reads_back(layers):
    assert layermaps.parse_ranges(layermaps.format_spec(layers), 8) == layers


def test_prune_drop_range_writes_the_kept_layers(tiny_models, tmp_path, capsys):
    src, out = tiny_models["llama"], tmp_path / "o"
    assert main(["prune", str(src), str(out), "--drop", "1:3", "--no-progress"]) == 0
    record = json.loads((out / "splice_surgery.json").read_text())
    assert record["layers"] == [0, 3] and record["removed"] == [1, 2]
    assert record["operation"] == "prune --drop 1:3"
    a, b = tensors(src), tensors(out)
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 2
    for j, i in enumerate([0, 3]):
        name = "model.layers.{}.mlp.down_proj.weight"
        assert torch.equal(b[name.format(j)], a[name.format(i)])


def test_help_says_ranges_are_half_open(capsys):
    for verb, option in (("prune", "--drop"), ("upscale", "--layers")):
        assert main([verb, "--help"]) == 0
        text = " ".join(capsys.readouterr().out.split())
        assert option in text and "half-open ranges A:B" in text and "B not included" in text


# ---- 2. the depth dry run prints the layer map, not every tensor -------------------------------
def test_format_map():
    assert layermaps.format_map([0, 1, 2, 1, 2, 3]) == "out 0-2 <- 0-2; out 3-5 <- 1-3"
    assert layermaps.format_map([3, 3, 0]) == "out 0 <- 3; out 1 <- 3; out 2 <- 0"
    assert layermaps.format_map([]) == "(none)"


def test_upscale_dry_run_prints_the_layer_map(capsys):
    assert main(["upscale", str(ZOO / "base"), "--solar", "2", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "layer map (output <- source): out 0-5 <- 0-5; out 6-11 <- 2-7" in out
    assert "12 output layers from 8 source layers (4 added copies)" in out
    assert "111 tensors to write (108 in layers, 3 outside them)" in out and "all copied" in out
    assert "self_attn.q_proj" not in out and len(out.splitlines()) < 10


def test_expand_dry_run_lists_only_the_zeroed_tensors(capsys):
    assert main(["upscale", str(ZOO / "base"), "--expand", "2", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "out 0-3 <- 0-3; out 4-8 <- 3-7; out 9 <- 7" in out
    assert "4 computed, the rest copied:" in out and out.count("zeroed (new block)") == 4
    listed = [line.split()[0] for line in out.splitlines() if "zeroed (new block)" in line]
    assert listed == [
        f"model.layers.{i}.{kind}.weight"
        for i in (4, 9)
        for kind in ("self_attn.o_proj", "mlp.down_proj")
    ]


def test_prune_dry_run_and_json(capsys):
    args = ["prune", str(ZOO / "base"), "--drop", "3:5", "--dry-run"]
    assert main([*args, "--dtype", "float16"]) == 0
    out = capsys.readouterr().out
    assert "out 0-2 <- 0-2; out 3-5 <- 5-7" in out and "(2 removed)" in out
    assert "all copied (57 cast to float16)" in out and "model.layers" not in out
    assert main([*args, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["layers"] == [0, 1, 2, 5, 6, 7] and data["out"] is None


# ---- 3. inspect: heads, head dim, intermediate size, RoPE, context -------------------------------
def test_inspect_zoo_shape(capsys):
    assert main(["inspect", str(ZOO / "base"), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    want = dict(num_heads=4, num_kv_heads=4, head_dim=24, intermediate_size=192,
                moe_intermediate_size=None, rope_theta=10000.0, rope_type="default",
                max_position_embeddings=128)  # fmt: skip
    assert {k: data[k] for k in want} == want
    assert main(["inspect", str(ZOO / "base")]) == 0
    out = capsys.readouterr().out
    assert "attention    heads 4   kv heads 4   head dim 24\n" in out
    assert "mlp          intermediate 192\n" in out
    assert "position     rope theta 10000   rope type default   context 128\n" in out


def test_inspect_shows_only_what_the_config_has(tiny_models, capsys):
    src = tiny_models["qwen2"]
    cfg = json.loads((src / "config.json").read_text())
    assert main(["inspect", str(src), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["num_heads"] == cfg["num_attention_heads"] == 4
    assert data["num_kv_heads"] == cfg["num_key_value_heads"] == 2
    assert data["intermediate_size"] == cfg["intermediate_size"] == 72
    assert data["max_position_embeddings"] == cfg["max_position_embeddings"] == 64
    assert data["head_dim"] == cfg.get("head_dim")  # None where the config has none
    main(["inspect", str(src)])
    out = capsys.readouterr().out
    assert ("head dim" in out) == (cfg.get("head_dim") is not None)
    assert "experts' intermediate" not in out


def test_inspect_rope_per_layer_type(tmp_path, capsys):
    from conftest import make_tokenizer
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        "gemma3_text", vocab_size=96, hidden_size=32, intermediate_size=72, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
    )  # fmt: skip
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "g")
    make_tokenizer(96).save_pretrained(tmp_path / "g")
    saved = json.loads((tmp_path / "g" / "config.json").read_text())["rope_parameters"]
    assert main(["inspect", str(tmp_path / "g"), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["rope_theta"] == {k: v["rope_theta"] for k, v in saved.items()}
    assert data["head_dim"] == 8 and data["num_kv_heads"] == 2
    main(["inspect", str(tmp_path / "g")])
    assert "rope theta 1e+06 (full_attention)" in capsys.readouterr().out


def test_rope_of_older_configs():
    from splice.summary import _rope

    assert _rope({"rope_theta": 5e5, "rope_scaling": None}) == (5e5, "default")
    scaled = {"rope_theta": 1e6, "rope_scaling": {"type": "yarn", "factor": 4.0}}
    assert _rope(scaled) == (1e6, "yarn")
    assert _rope({"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5}}) == (5e5, "llama3")
    assert _rope({"max_position_embeddings": 1024}) == (None, None)  # no RoPE fields: nothing


# ---- 4. counts and articles ---------------------------------------------------------------------
def test_counts_and_articles():
    assert [layermaps.an(n) for n in (1, 8, 11, 18, 80, 86, 110, 180, 800, 8000, 11000, 12)] == [
        "a", "an", "an", "an", "an", "an", "a", "a", "an", "an", "an", "a",
    ]  # fmt: skip
    assert layermaps.plural(1, "layer") == "1 layer" and layermaps.plural(2, "layer") == "2 layers"
    for call, message in [
        (lambda: layermaps.without(8, range(8)), "removing 8 layers of an 8-layer model"),
        (lambda: layermaps.without(1, [0]), "removing 1 layer of a 1-layer model"),
        (lambda: layermaps.solar(1, 1), "(the model has 1 layer)"),
        (lambda: layermaps.parse_indices("1", 1), "(the model has 1 layer, 0)"),
        (lambda: layermaps.expand(1, 2), "the model has 1 layer)"),
    ]:
        with pytest.raises(SpliceError) as e:
            call()
        assert message in str(e.value)


# ---- 5. --calibration zoo beside a ./zoo folder --------------------------------------------------
def test_the_zoo_keyword_wins_over_a_zoo_folder(tmp_path, monkeypatch):
    from splice.calib import SOURCES, calibration_text

    monkeypatch.chdir(tmp_path)
    (tmp_path / "zoo").mkdir()
    with pytest.warns(SpliceWarning, match=r"give \./zoo for that"):
        text = calibration_text("zoo")
    assert text == calibration_text("zoo:en") == SOURCES.get("zoo")()
    with pytest.raises(SpliceError, match=r"\./zoo: a folder, not a calibration text file"):
        calibration_text("./zoo")
    shutil.rmtree(tmp_path / "zoo")
    (tmp_path / "zoo").write_text("w5 w6 w7\n")
    assert calibration_text("./zoo") == "w5 w6 w7\n"  # ./zoo reaches the file
    assert calibration_text(Path("zoo")) == "w5 w6 w7\n"  # a Path is a path
    with pytest.warns(SpliceWarning):
        assert calibration_text("zoo") == text
    shutil.rmtree(tmp_path / "zoo", ignore_errors=True)
    (tmp_path / "zoo").unlink()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no file of that name: no warning
        assert calibration_text("zoo") == text


def test_cli_calibration_zoo_beside_a_zoo_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "zoo").mkdir()
    args = ["prune", str(ZOO / "base"), "--n", "1", "--dry-run", "--no-progress",
            "--max-samples", "8", "--seq-len", "32"]  # fmt: skip
    assert main([*args, "--calibration", "zoo"]) == 0
    captured = capsys.readouterr()
    assert "8 -> 7 layers" in captured.out
    assert "read as the calibration source 'zoo'" in captured.err
    assert main([*args, "--calibration", "./zoo"]) == 2
    assert "./zoo: a folder, not a calibration text file" in capsys.readouterr().err


# ---- 6. no transformers warning in splice slice's output -----------------------------------------
def test_slice_stderr_has_no_transformers_warning(tmp_path):
    out = tmp_path / "sl"
    args = [SPLICE, "slice", str(ZOO / "base"), str(out), "--sparsity", "0.25",
            "--calibration", "zoo", "--ppl", str(ZOO / "text" / "heldout.txt"), "--no-progress",
            "--max-samples", "16", "--seq-len", "64"]  # fmt: skip
    run = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stderr == "", run.stderr  # was: "[transformers] You are using a model of type
    # `splice_sliced` to instantiate a model of type ``..." and a "Loading weights" bar
    assert "ppl" in run.stdout and (out / "config.json").is_file()


def test_quiet_transformers_restores_the_settings():
    from transformers.utils import logging as hf_logging

    from splice.surgery.slicing import _quiet_transformers

    before = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    with _quiet_transformers():
        assert hf_logging.get_verbosity() == hf_logging.ERROR
        assert not hf_logging.is_progress_bar_enabled()
    assert (hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()) == before


# ---- 7. model cards name a hub source by its id, a local one as typed ----------------------------
def test_shown_source():
    from splice.card import shown_source

    snap = "/home/u/.cache/huggingface/hub/models--Qwen--Qwen3-0.6B/snapshots/0123abc"
    assert shown_source(snap) == "Qwen/Qwen3-0.6B"
    assert shown_source("/c/hub/models--gpt2/snapshots/e7da7f") == "gpt2"
    for local in ("models/base", "./x", "/data/models--a--b", "/d/models--a--b/other/c"):
        assert shown_source(local) == local


def test_card_names_the_hub_id(tiny_models, tmp_path, monkeypatch):
    import huggingface_hub.constants

    from splice.surgery import upscale

    cache = tmp_path / "hub"
    repo = cache / "models--acme--tiny-llama"
    shutil.copytree(tiny_models["llama"], repo / "snapshots" / "abc123")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    out = tmp_path / "o"
    upscale("acme/tiny-llama", out, solar=1)
    card = (out / "README.md").read_text()
    assert "- acme/tiny-llama\n" in card and "- `acme/tiny-llama`\n" in card
    assert "on `acme/tiny-llama`" in card and str(cache) not in card and "snapshots" not in card


def test_card_keeps_a_relative_path_as_typed(tiny_models, tmp_path, monkeypatch):
    shutil.copytree(tiny_models["llama"], tmp_path / "models" / "src")
    monkeypatch.chdir(tmp_path)
    assert main(["prune", "models/src", "out", "--drop", "0", "--no-progress"]) == 0
    card = (tmp_path / "out" / "README.md").read_text()
    assert "- models/src\n" in card and "on `models/src`" in card and str(tmp_path) not in card
