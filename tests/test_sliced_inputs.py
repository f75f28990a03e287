"""Per-layer sliced models (issue 22) are refused, in one line and before anything is written,
by every verb that reorders, drops, repeats or merges layers: their shortcut matrices only fit
the neighbours each layer had when it was sliced. Verbs that only read keep working, and a
``--basis shared`` output (a standard checkpoint) is an ordinary input. Also: a ``moe``
recipe whose base tokenizer is its own code is one line naming ``--trust-remote-code``."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from conftest import make_tiny
from evolve_helpers import config_dict, write_tasks

from splice.checkpoint import open_checkpoint
from splice.cli import main
from splice.errors import SpliceError
from splice.execute import ExecOptions
from splice.sliced_check import SLICED_TYPE
from splice.surgery import Calibration, slice_model

torch.set_num_threads(1)
CALIB = Calibration(seq_len=24, max_samples=8, batch_size=4)
OPTS = ExecOptions(show_progress=False)
SAYS = "a per-layer sliced model (splice slice --basis per-layer) cannot be"


def windows(n: int = 8, t: int = 24) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(4, 96, (n, t), generator=g)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """A tiny Mixtral and Llama, the Mixtral sliced per layer and the Llama with a shared
    basis (both at 25%)."""
    root = tmp_path_factory.mktemp("sliced")
    out = {
        "mixtral": make_tiny(root / "mixtral", "mixtral", num_local_experts=4,
                             num_experts_per_tok=2, seed=3),
        "llama": make_tiny(root / "llama", "llama", seed=4),
    }  # fmt: skip
    for key, src, basis in (("per_layer", "mixtral", "per-layer"), ("shared", "llama", "shared")):
        slice_model(
            out[src], root / key, sparsity=0.25, calibration=windows(), basis=basis,
            calib=CALIB, options=OPTS,
        )  # fmt: skip
        out[key] = root / key
    assert json.loads((out["per_layer"] / "config.json").read_text())["model_type"] == SLICED_TYPE
    return out


def refused(capsys, argv: list[str], out: Path, *needles: str) -> str:
    """``splice ARGV`` exits 2 with one line on stderr holding ``needles``, and writes nothing
    at ``out`` (nor a lock or staging folder beside it)."""
    before = set(out.parent.iterdir()) if out.parent.exists() else set()
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    for needle in needles:
        assert needle in err[0], err[0]
    assert not out.exists()
    after = set(out.parent.iterdir()) if out.parent.exists() else set()
    assert after == before, after - before
    return err[0]


def write_recipe(path: Path, *docs: dict) -> Path:
    path.write_text("---\n".join(yaml.safe_dump(d, sort_keys=False) for d in docs))
    return path


def test_prune_and_upscale_refuse_a_per_layer_sliced_model(models, tmp_path, capsys):
    sl = str(models["per_layer"])
    line = refused(capsys, ["prune", sl, str(tmp_path / "pr"), "--drop", "1"], tmp_path / "pr",
                   sl, SAYS + " pruned", "--basis shared", "prune before slicing")  # fmt: skip
    assert "shortcut matrices" in line
    refused(capsys, ["upscale", sl, str(tmp_path / "up"), "--duplicate", "1:3"], tmp_path / "up",
            sl, SAYS + " up-scaled", "upscale before slicing")  # fmt: skip
    refused(capsys, ["upscale", sl, str(tmp_path / "up"), "--solar", "2"], tmp_path / "up",
            SAYS + " up-scaled")  # fmt: skip
    refused(capsys, ["prune", sl, "--drop", "1", "--dry-run"], tmp_path / "none", SAYS)


def test_collapse_and_slice_refuse_a_per_layer_sliced_model(models, tmp_path, capsys):
    sl = str(models["per_layer"])
    refused(capsys, ["collapse", sl, str(tmp_path / "c")], tmp_path / "c", SAYS + " collapsed")
    text = tmp_path / "calib.txt"
    text.write_text(" ".join(f"w{i % 90 + 4}" for i in range(400)))
    refused(capsys, ["slice", sl, str(tmp_path / "s"), "--calibration", str(text)],
            tmp_path / "s", SAYS + " sliced again")  # fmt: skip


def test_merges_refuse_a_per_layer_sliced_model(models, tmp_path, capsys):
    sl, plain = str(models["per_layer"]), str(models["mixtral"])
    passthrough = {
        "merge_method": "passthrough",
        "slices": [
            {"sources": [{"model": sl, "layer_range": [0, 3]}]},
            {"sources": [{"model": sl, "layer_range": [2, 4]}]},
        ],
    }
    linear = {
        "merge_method": "linear",
        "models": [{"model": sl}, {"model": plain}],
        "parameters": {"weight": 0.5},
    }
    moe = {
        "merge_method": "moe",
        "base_model": sl,
        "gate_mode": "random",
        "experts_per_token": 1,
        "experts": [{"source_model": plain}, {"source_model": sl}],
    }
    for name, recipe in (("passthrough", passthrough), ("linear", linear), ("moe", moe)):
        path = write_recipe(tmp_path / f"{name}.yml", recipe)
        out = tmp_path / "out" / name  # the missing parent is not left behind either
        refused(capsys, ["merge", str(path), str(out)], out, sl, SAYS + " merged",
                "merge before slicing")  # fmt: skip
        refused(capsys, ["merge", str(path), "--dry-run"], out, SAYS + " merged")
    # mergekit-multi: a later document reads the sliced model; no intermediate is made first
    first = {"name": "mid", "merge_method": "passthrough",
             "slices": [{"sources": [{"model": plain, "layer_range": [0, 4]}]}]}  # fmt: skip
    final = {"merge_method": "linear", "models": [{"model": "mid"}, {"model": sl}],
             "parameters": {"weight": 0.5}}  # fmt: skip
    path = write_recipe(tmp_path / "multi.yml", final, first)
    line = refused(capsys, ["merge", str(path), str(tmp_path / "m")], tmp_path / "m",
                   SAYS + " merged")  # fmt: skip
    assert sl in line


def test_open_models_and_evolve_refuse_a_per_layer_sliced_model(models, tmp_path, capsys):
    from splice.evolve import EvolveConfig
    from splice.evolve.search import prepare
    from splice.problems import open_models

    sl, plain = str(models["per_layer"]), str(models["mixtral"])
    with pytest.raises(SpliceError) as e:
        open_models([plain, sl])
    assert str(e.value).splitlines() == [str(e.value)]
    assert str(e.value).startswith(f"{sl}: {SAYS} merged")
    with pytest.raises(SpliceError, match="cannot be merged"):  # a model handed in, too
        open_models([sl], models={sl: open_checkpoint(sl)})
    assert set(open_models([plain])) == {plain}
    trio = {"base": models["mixtral"], "ft1": models["per_layer"], "ft2": models["mixtral"]}
    data = config_dict(trio, write_tasks(tmp_path / "tasks"))
    with pytest.raises(SpliceError) as e:
        prepare(EvolveConfig.from_dict(data))
    assert len(str(e.value).splitlines()) == 1
    assert str(e.value).startswith(f"{sl}: {SAYS} merged")
    config = write_recipe(tmp_path / "evolve.yml", data)
    refused(capsys, ["evolve", str(config), "--out", str(tmp_path / "run")], tmp_path / "run",
            f"{sl}: {SAYS} merged")  # fmt: skip


def test_reading_verbs_accept_a_per_layer_sliced_model(models, capsys):
    sl = str(models["per_layer"])
    capsys.readouterr()
    assert main(["inspect", sl]) == 0
    assert main(["inspect", sl, "--json"]) == 0
    assert "splice_sliced" in capsys.readouterr().out


def test_a_shared_basis_slice_prunes_and_upscales(models, tmp_path, capsys):
    sh = str(models["shared"])
    assert main(["prune", sh, str(tmp_path / "pr"), "--drop", "1", "--no-progress"]) == 0
    assert open_checkpoint(tmp_path / "pr").num_layers == 3
    assert main(["upscale", sh, str(tmp_path / "up"), "--duplicate", "1:3", "--no-progress"]) == 0
    assert open_checkpoint(tmp_path / "up").num_layers == 6


# ---- a moe recipe whose base tokenizer needs its own code -----------------------------------
CUSTOM = """from transformers import PreTrainedTokenizerFast


class CustomTokenizer(PreTrainedTokenizerFast):
    pass
"""


def test_moe_with_a_remote_code_tokenizer_is_one_line(models, tmp_path, capsys, monkeypatch):
    base = tmp_path / "base"
    shutil.copytree(models["llama"], base)
    cfg = base / "tokenizer_config.json"
    data = json.loads(cfg.read_text())
    data["tokenizer_class"] = "CustomTokenizer"
    data["auto_map"] = {"AutoTokenizer": ["tokenization_custom.CustomTokenizer", None]}
    cfg.write_text(json.dumps(data))
    (base / "tokenization_custom.py").write_text(CUSTOM)
    recipe = write_recipe(
        tmp_path / "moe.yml",
        {
            "merge_method": "moe",
            "base_model": str(base),
            "gate_mode": "cheap_embed",
            "experts_per_token": 1,
            "experts": [
                {"source_model": str(models["llama"]), "positive_prompts": ["w1 w2"]},
                {"source_model": str(base), "positive_prompts": ["w3 w4"]},
            ],
        },
    )
    out = tmp_path / "out"
    line = refused(capsys, ["merge", str(recipe), str(out), "--no-progress"], out,
                   f"base model {base}", "--trust-remote-code")  # fmt: skip
    assert "tokenizer" in line
    refused(capsys, ["merge", str(recipe), "--dry-run"], out, "--trust-remote-code")
    # the flag is honoured: the tokenizer's own code runs (its module cached under tmp_path)
    import transformers.dynamic_module_utils as dmu

    monkeypatch.setattr(dmu, "HF_MODULES_CACHE", str(tmp_path / "modules"))
    assert main(["merge", str(recipe), str(out), "--no-progress", "--trust-remote-code"]) == 0
    assert open_checkpoint(out).config["model_type"] == "mixtral"
