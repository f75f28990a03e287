"""The splice command line: output, --json, and one-line errors with exit code 2."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from test_checkpoint import corrupt

from splice.cli import main

SPLICE = str(Path(sys.executable).with_name("splice"))


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([SPLICE, *args], capture_output=True, text=True)


def test_inspect_text(tiny_models, capsys):
    assert main(["inspect", str(tiny_models["mixtral"])]) == 0
    out = capsys.readouterr().out
    assert "mixtral (MixtralForCausalLM)" in out
    assert "layers       4" in out and "experts 4 (top-2)" in out
    assert "block_sparse_moe.experts.{e}.w1.weight" in out and "x4" in out
    assert "layers 0-3 (4 layers, identical)" in out


def test_inspect_json(tiny_models, capsys):
    from test_checkpoint import reference_tensors

    assert main(["inspect", "--json", str(tiny_models["llama"])]) == 0
    data = json.loads(capsys.readouterr().out)
    ref = reference_tensors(tiny_models["llama"])
    assert data["num_layers"] == 4 and data["model_type"] == "llama"
    assert data["num_params"] == sum(t.numel() for t in ref.values())
    assert data["tied_embeddings"] is False and len(data["files"]) > 1
    assert data["layer_blocks"][0]["layers"] == [0, 1, 2, 3]
    assert sum(len(f) > 0 for f in data["files"]) == len(data["files"])


def test_inspect_tied_gemma(tiny_models, capsys):
    assert main(["inspect", "--json", str(tiny_models["gemma"])]) == 0
    assert json.loads(capsys.readouterr().out)["tied_embeddings"] is True


def bad_inputs(tiny_models, tmp_path) -> dict[str, tuple[list[str], str]]:
    not_model = tmp_path / "not_model"
    not_model.mkdir()
    unknown = tmp_path / "unknown"
    unknown.mkdir()
    (unknown / "config.json").write_text('{"model_type": "zzz"}')
    import torch
    from safetensors.torch import save_file

    save_file({"encoder.weight": torch.zeros(2)}, unknown / "model.safetensors")
    mismatched = tmp_path / "mismatched"
    shutil.copytree(tiny_models["mistral"], mismatched)
    cfg = json.loads((mismatched / "config.json").read_text())
    cfg["hidden_size"] = 48
    (mismatched / "config.json").write_text(json.dumps(cfg))
    return {
        "missing folder": (["inspect", str(tmp_path / "nope")], "no such folder"),
        "not a model": (["inspect", str(not_model)], "not a model folder (no config.json)"),
        "unknown architecture": (["inspect", str(unknown)], "unknown architecture 'zzz'"),
        "corrupt header": (
            ["inspect", str(corrupt(tiny_models["qwen2"], tmp_path, "bad_json"))],
            "corrupt safetensors header",
        ),
        "mismatched shapes": (["inspect", str(mismatched)], "hidden_size=48"),
        "convert into existing": (
            ["convert", str(tiny_models["qwen2"]), str(not_model)],
            "already exists",
        ),
        "bad dtype": (
            ["convert", str(tiny_models["qwen2"]), str(tmp_path / "o"), "--dtype", "int3"],
            "unknown dtype",
        ),
        "bad shard size": (
            ["convert", str(tiny_models["qwen2"]), str(tmp_path / "o"), "--max-shard-size", "lots"],
            "cannot read size",
        ),
    }


CASES = [
    "missing folder",
    "not a model",
    "unknown architecture",
    "corrupt header",
    "mismatched shapes",
    "convert into existing",
    "bad dtype",
    "bad shard size",
]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_line_exit_2(tiny_models, tmp_path, capsys, case):
    args, message = bad_inputs(tiny_models, tmp_path)[case]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and err.startswith("splice: error: ")
    assert not (tmp_path / "o").exists()


def test_real_script_exit_codes(tiny_models, tmp_path):
    r = run("inspect", str(tmp_path / "nope"))
    assert r.returncode == 2 and r.stderr.strip().startswith("splice: error:")
    assert "Traceback" not in r.stderr and r.stderr.count("\n") == 1
    r = run("inspect")
    assert r.returncode == 2 and r.stderr.count("\n") == 1
    r = run("frobnicate")
    assert r.returncode == 2 and "invalid choice" in r.stderr
    out = tmp_path / "conv"
    r = run("convert", str(tiny_models["llama"]), str(out), "--dtype", "bf16", "--no-progress")
    assert r.returncode == 0, r.stderr
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    r = run("inspect", str(out))
    assert r.returncode == 0 and "bfloat16" in r.stdout
