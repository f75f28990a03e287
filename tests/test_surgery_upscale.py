"""Up-scaling against independent references: the source's own layers run in the planned order
(its modules in a new ModuleList), the source's logits for LLaMA-Pro expansion, and the
input/output cosines computed from ``output_hidden_states`` for Yi."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import make_tiny
from surgery_helpers import cosine, hidden_states, load, logits, planned_logits, word_text

from splice.calib import token_windows
from splice.checkpoint import open_checkpoint
from splice.cli import main
from splice.errors import SpliceError
from splice.modeling import load_tokenizer
from splice.surgery import RECORD, plan_upscale, read_record, upscale

torch.set_num_threads(1)
DENSE = ["llama", "mistral", "qwen2", "gemma", "phi3"]


@pytest.mark.parametrize("arch", [*DENSE, "mixtral"])
def test_solar_and_duplicate_run_the_source_layers_in_order(arch, tiny_models, tmp_path):
    src = tiny_models[arch]
    expected = {"solar": [0, 1, 2, 1, 2, 3], "dup": [0, 1, 0, 1, 2, 3]}
    for name, kwargs in {"solar": {"solar": 1}, "dup": {"duplicate": "0:2"}}.items():
        result = upscale(src, tmp_path / name, **kwargs)
        order = result.report.layers
        assert order == expected[name]
        out = logits(tmp_path / name)
        ref = planned_logits(src, order)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
        cfg = json.loads((tmp_path / name / "config.json").read_text())
        assert cfg["num_hidden_layers"] == 6


@pytest.mark.parametrize("arch", ["llama", "gemma", "mixtral"])
def test_explicit_layers_plan(arch, tiny_models, tmp_path):
    src = tiny_models[arch]
    result = upscale(src, tmp_path / "o", layers="0:2,3,1:4")
    assert result.report.layers == [0, 1, 3, 1, 2, 3]
    assert result.report.new_layers == [3, 5]  # second occurrences of layers 1 and 3
    torch.testing.assert_close(
        logits(tmp_path / "o"), planned_logits(src, [0, 1, 3, 1, 2, 3]), atol=1e-5, rtol=0
    )


@pytest.mark.parametrize("arch", [*DENSE, "mixtral"])
def test_expand_computes_the_source_function(arch, tiny_models, tmp_path):
    src = tiny_models[arch]
    result = upscale(src, tmp_path / "x", expand=2)
    assert result.report.layers == [0, 1, 1, 2, 3, 3] and result.report.zeroed == [2, 5]
    out, ref = logits(tmp_path / "x"), logits(src)
    assert (out - ref).abs().max().item() <= 1e-5
    # the new blocks are real, non-trivial copies except their residual writers
    ckpt = open_checkpoint(tmp_path / "x")
    spec = ckpt.arch
    for j in result.report.zeroed:
        names = ckpt.layer_index[j]
        writers = [n for n in names if spec.is_residual_writer(n)]
        assert writers and all(ckpt.load(n).abs().max() == 0 for n in writers)
        others = [n for n in names if not spec.is_residual_writer(n)]
        for n in others:
            twin = spec.rename(n, layer=j - 1)
            assert torch.equal(ckpt.load(n), ckpt.load(twin))
    assert read_record(tmp_path / "x")["new_layers"] == [2, 5]


def test_output_folder_is_standard(tiny_models, tmp_path):
    src = tiny_models["llama"]
    upscale(src, tmp_path / "o", solar=1)
    out = tmp_path / "o"
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "README.md", RECORD, "tokenizer.json"} <= names
    card = (out / "README.md").read_text()
    assert "upscale --solar 1" in card and "0-2, 1-3" in card
    # duplicated tensors are real copies in the file, not aliases
    ckpt = open_checkpoint(out)
    a, b = "model.layers.0.self_attn.q_proj.weight", "model.layers.2.self_attn.q_proj.weight"
    assert ckpt[a].offset != ckpt[b].offset or ckpt[a].file != ckpt[b].file
    assert torch.equal(
        ckpt.load(a), open_checkpoint(src).load("model.layers.0.self_attn.q_proj.weight")
    )
    assert load_tokenizer(out)("w1 w2")["input_ids"] == load_tokenizer(src)("w1 w2")["input_ids"]


def test_per_layer_config_lists_follow_the_plan(tmp_path):
    src = make_tiny(
        tmp_path / "qwen",
        "qwen2",
        use_sliding_window=True,
        sliding_window=4,
        max_window_layers=2,
        seed=3,
    )
    types = json.loads((src / "config.json").read_text())["layer_types"]
    assert types == ["full_attention"] * 2 + ["sliding_attention"] * 2
    upscale(src, tmp_path / "o", solar=1)
    cfg = json.loads((tmp_path / "o" / "config.json").read_text())
    assert cfg["layer_types"] == [types[i] for i in [0, 1, 2, 1, 2, 3]]
    torch.testing.assert_close(
        logits(tmp_path / "o"), planned_logits(src, [0, 1, 2, 1, 2, 3]), atol=1e-5, rtol=0
    )


@pytest.fixture(scope="module")
def deep(tmp_path_factory):
    """A 32-layer tiny Llama (hidden 16) and a text of its tokenizer's words."""
    root = tmp_path_factory.mktemp("deep")
    model = make_tiny(root / "llama32", "llama", layers=32, hidden=16, seed=5)
    (root / "text.txt").write_text(word_text(seed=1))
    return model, root / "text.txt"


def test_solar_on_32_layers(deep, tmp_path):
    src, _ = deep
    result = upscale(src, tmp_path / "s", solar=8)
    order = list(range(24)) + list(range(8, 32))
    assert result.report.layers == order
    assert json.loads((tmp_path / "s" / "config.json").read_text())["num_hidden_layers"] == 48
    torch.testing.assert_close(
        logits(tmp_path / "s"), planned_logits(src, order), atol=1e-5, rtol=0
    )


def test_yi_on_32_layers_picks_the_highest_cosine_block(deep, tmp_path):
    from splice.surgery import Calibration

    src, text = deep
    calib = Calibration(seq_len=16, max_samples=6, batch_size=4)
    result = upscale(src, tmp_path / "y", yi=16, calibration=text, calib=calib)
    # independent: per-layer io cosine (first token excluded) from output_hidden_states
    windows = token_windows(load_tokenizer(src), text.read_text(), 16, 6)
    hs = hidden_states(load(src), windows)
    io = np.array([cosine(hs[i], hs[i + 1])[:, 1:].mean() for i in range(32)])
    starts = range(1, 32 - 16)  # the first and last layer kept out
    scores = [io[a : a + 16].mean() for a in starts]
    best = list(starts)[int(np.argmax(scores))]
    assert result.report.chosen == list(range(best, best + 16))
    np.testing.assert_allclose([c["value"] for c in result.report.candidates], scores, atol=1e-5)
    order = list(range(best + 16)) + list(range(best, 32))
    assert result.report.layers == order and len(order) == 48
    torch.testing.assert_close(
        logits(tmp_path / "y"), planned_logits(src, order), atol=1e-5, rtol=0
    )


def test_dry_run_writes_nothing(tiny_models, tmp_path, capsys):
    src = tiny_models["llama"]
    assert main(["upscale", str(src), str(tmp_path / "o"), "--expand", "2", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "4 -> 6 layers" in out and "zeroed" in out and "model.layers.5.mlp.down_proj" in out
    assert not (tmp_path / "o").exists()
    r = plan_upscale(src, duplicate="0:2")
    assert r.report.layers == [0, 1, 0, 1, 2, 3] and r.out is None


def test_cli_json_and_overwrite(tiny_models, tmp_path, capsys):
    src, out = tiny_models["mistral"], tmp_path / "o"
    assert main(["upscale", str(src), str(out), "--solar", "2", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["layers"] == [0, 1, 2, 3] and data["out"] == str(out)
    assert main(["upscale", str(src), str(out), "--solar", "1"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["upscale", str(src), str(out), "--solar", "1", "--overwrite"]) == 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--solar", "0"], "--solar 0: M must be between 1 and 3"),
        (["--solar", "4"], "--solar 4: M must be between 1 and 3"),
        (["--solar", "2", "--expand", "2"], "give exactly one of"),
        ([], "give exactly one of"),
        (["--duplicate", "2:9"], "need 0 <= A < B <= 4"),
        (["--duplicate", "3:1"], "need 0 <= A < B <= 4"),
        (["--layers", "0:5"], "0:5 is out of range"),
        (["--expand", "5"], "--expand 5: N must be between 1 and 4"),
        (["--yi", "2"], "--yi needs --calibration"),
        (["--yi", "3", "--calibration", "TEXT"], "--yi 3: K must be between 1 and 2"),
        (["--solar", "1", "--calibration", "TEXT"], "--calibration is only used by --yi"),
        (["--yi", "2", "--calibration", "SHORT", "--seq-len", "32"], "the text is too short"),
    ],
)
def test_bad_input_one_line_exit_2(args, message, tiny_models, tmp_path, capsys):
    (tmp_path / "TEXT").write_text(word_text())
    (tmp_path / "SHORT").write_text("w1 w2 w3")
    args = [str(tmp_path / a) if a in ("TEXT", "SHORT") else a for a in args]
    out = tmp_path / "o"
    code = main(["upscale", str(tiny_models["llama"]), str(out), *args, "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2 and message in err, err
    assert len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_library_checks_options_too(tiny_models):
    with pytest.raises(SpliceError, match="exactly one of"):
        plan_upscale(tiny_models["llama"], solar=1, yi=2)
    with pytest.raises(SpliceError, match="not a whole number"):
        plan_upscale(tiny_models["llama"], solar=1.5)  # type: ignore[arg-type]


@pytest.mark.parametrize("arch", ["mixtral", "phi3"])
def test_yi_from_the_cli(arch, tiny_models, tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text(word_text())
    out = tmp_path / "y"
    args = ["upscale", str(tiny_models[arch]), str(out), "--yi", "2", "--calibration", str(text)]
    assert main([*args, "--seq-len", "16", "--max-samples", "4", "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert printed.count("<- chosen") == 1 and "mean io cosine" in printed
    order = read_record(out)["layers"]
    assert order in ([0, 1, 2, 1, 2, 3],)  # 4 layers: only block 1-2 keeps layers 0 and 3 out
    torch.testing.assert_close(
        logits(out), planned_logits(tiny_models[arch], order), atol=1e-5, rtol=0
    )


def test_solar_copies_without_torch(tiny_models, tmp_path):
    """The plain-copy path (the benchmark's) never imports torch: file-to-file copies only
    (the output check, which builds the model on the meta device, is what needs torch)."""
    import subprocess
    import sys

    code = (
        "import sys; from splice.cli import main; "
        f"rc = main(['upscale', {str(tiny_models['llama'])!r}, {str(tmp_path / 'o')!r}, "
        "'--solar', '1', '--no-progress', '--no-verify']); "
        "print(rc, 'torch' in sys.modules)"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert run.stdout.strip().splitlines()[-1] == "0 False"
    assert open_checkpoint(tmp_path / "o").num_layers == 6
