"""LoRA references ``BASE+ADAPTER`` (splice.lora): a base model with a PEFT adapter applied
tensor by tensor as it is read, in every field that names a model.

References: PEFT's own ``merge_and_unload`` (every tensor), the same recipe naming the folder
PEFT's merged model was saved to (the fine-tune the adapter stands for), ``mergekit-yaml`` with
``--lora-merge-cache``, and ``W + s·(B·A)ᵀ`` on hand-built tensors for ``fan_in_fan_out``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import make_tokenizer
from families import build
from safetensors.torch import load_file, save_file

from splice import open_checkpoint
from splice.cli import main
from splice.errors import SpliceError
from splice.evolve import EvolveConfig
from splice.lora import AdaptedInfo, LoraCheckpoint
from splice.merge import MergeOptions, Recipe, run
from splice.paths import lora_parts, resolve_path
from splice.resident import ResidentCheckpoint, ResidentLora

peft = pytest.importorskip("peft")

#: adapter name -> LoraConfig arguments (every A and B is then drawn at random, nonzero)
ADAPTERS = {
    "plain": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]),
    "rslora": dict(
        r=4,
        lora_alpha=6,
        use_rslora=True,
        lora_bias=True,  # the base's linears carry biases: b of lora_B moves them
        target_modules=["q_proj", "v_proj", "down_proj"],
        rank_pattern={"v_proj": 2},
        alpha_pattern={r"layers\.1\.self_attn\.q_proj": 3},
    ),
    "saved": dict(
        r=2, lora_alpha=4, target_modules=["q_proj", "embed_tokens"], modules_to_save=["lm_head"]
    ),
}


def _make_adapter(base: Path, folder: Path, seed: int, **config) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base), LoraConfig(**config))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name or "modules_to_save" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    model.save_pretrained(folder)


def _peft_merged(base: Path, adapter: Path) -> torch.nn.Module:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    return PeftModel.from_pretrained(model, adapter).merge_and_unload()


@pytest.fixture(scope="module")
def lora(tmp_path_factory) -> dict[str, Path]:
    """``base`` (tiny llama with attention biases and a tokenizer), the ``ADAPTERS`` made with
    PEFT, and ``NAME-merged``: PEFT's merge of each, saved."""
    root = tmp_path_factory.mktemp("lora")
    out = {"root": root, "base": build("llama", root / "base", attention_bias=True, mlp_bias=True)}
    make_tokenizer(96).save_pretrained(out["base"])
    for i, (name, config) in enumerate(ADAPTERS.items()):
        out[name] = root / name
        _make_adapter(out["base"], out[name], seed=i, **config)
        out[f"{name}-merged"] = root / f"{name}-merged"
        _peft_merged(out["base"], out[name]).save_pretrained(out[f"{name}-merged"])
    return out


def folder_tensors(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


# ---- 1. the checkpoint is PEFT's merge, tensor by tensor ---------------------------------------
@pytest.mark.parametrize("name", list(ADAPTERS))
def test_tensors_equal_peft_merge_and_unload(lora, name):
    ckpt = open_checkpoint(f"{lora['base']}+{lora[name]}")
    assert isinstance(ckpt, LoraCheckpoint)
    reference = _peft_merged(lora["base"], lora[name]).state_dict()
    base = open_checkpoint(lora["base"])
    assert sorted(ckpt) == sorted(base)
    changed = 0
    for n in ckpt:
        t = ckpt.load(n)
        assert t.dtype == torch.float32 and t.shape == reference[n].shape
        torch.testing.assert_close(t, reference[n], rtol=0, atol=1e-6)
        if not torch.equal(t, base.load(n)):
            changed += 1
            # a tensor the adapter changes is never a byte copy of the base's
            assert isinstance(ckpt[n], AdaptedInfo) and not ckpt[n].readable
        else:
            assert ckpt[n].readable
    expected = {"plain": 12, "rslora": 24, "saved": 6}[name]  # weights (+ q/v biases), embed, head
    assert changed == expected


def test_rank_and_alpha_patterns_and_rslora_scale(lora):
    """v_proj has rank 2 (rank_pattern), layer 1's q_proj alpha 3 (alpha_pattern), others
    alpha 6, all scaled by alpha/sqrt(r)."""
    ckpt = open_checkpoint(f"{lora['base']}+{lora['rslora']}")
    deltas = ckpt.adapter.deltas
    assert deltas["model.layers.0.self_attn.v_proj.weight"].scale == pytest.approx(6 / 2**0.5)
    assert deltas["model.layers.1.self_attn.q_proj.weight"].scale == pytest.approx(3 / 2)
    assert deltas["model.layers.2.self_attn.q_proj.weight"].scale == pytest.approx(6 / 2)
    assert deltas["model.layers.2.self_attn.q_proj.bias"].a is None


def test_dtype_device_and_the_live_module(lora):
    """load casts after the float32 arithmetic; apply_to makes a from_pretrained base module
    the merged model; a resident view adapts the same."""
    from transformers import AutoModelForCausalLM

    ref = f"{lora['base']}+{lora['plain']}"
    ckpt = open_checkpoint(ref)
    name = "model.layers.0.self_attn.q_proj.weight"
    assert ckpt.load(name, dtype="bfloat16").dtype == torch.bfloat16
    torch.testing.assert_close(ckpt.load(name, dtype="bfloat16"), ckpt.load(name).bfloat16())
    module = AutoModelForCausalLM.from_pretrained(ckpt.base_path, dtype=torch.float32)
    ckpt.apply_to(module)
    merged = folder_tensors(lora["plain-merged"])
    for n, p in module.state_dict().items():
        torch.testing.assert_close(p, merged[n], rtol=0, atol=1e-6)
    resident = ResidentCheckpoint.of(ckpt)
    assert isinstance(resident, ResidentLora)
    torch.testing.assert_close(resident.load(name), merged[name], rtol=0, atol=1e-6)
    assert resident.load(name).data_ptr() != resident.load(name).data_ptr()  # fresh copies


def test_fan_in_fan_out_on_hand_built_tensors(lora, tmp_path):
    """``fan_in_fan_out``: the base stores [in, out], the delta is s·(B·A)ᵀ."""
    g = torch.Generator().manual_seed(7)
    a, b = torch.randn(3, 32, generator=g), torch.randn(32, 3, generator=g)
    adapter = tmp_path / "fifo"
    adapter.mkdir()
    key = "base_model.model.model.layers.2.self_attn.o_proj"
    save_file(
        {f"{key}.lora_A.weight": a, f"{key}.lora_B.weight": b},
        adapter / "adapter_model.safetensors",
    )
    config = {"peft_type": "LORA", "r": 3, "lora_alpha": 5, "fan_in_fan_out": True}
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    ckpt = open_checkpoint(f"{lora['base']}+{adapter}")
    name = "model.layers.2.self_attn.o_proj.weight"
    w = open_checkpoint(lora["base"]).load(name)
    torch.testing.assert_close(ckpt.load(name), w + 5 / 3 * (b @ a).T, rtol=0, atol=1e-6)


# ---- 2. a recipe naming base+adapter = the recipe naming the merged fine-tune ------------------
def _recipe(first: object, second: object, base: object) -> dict:
    return {
        "merge_method": "task_arithmetic",
        "base_model": base,
        "dtype": "float32",
        "models": [
            {"model": first, "parameters": {"weight": [0.9, 0.3]}},
            {"model": second, "parameters": {"weight": 0.5}},
        ],
    }


def test_merge_recipe_equals_merging_the_fine_tunes(lora, tmp_path, monkeypatch):
    """String and dict forms, relative sides resolved from the recipe's folder (its models are
    not in the current folder), and the tokenizer of the base in the output."""
    root = lora["root"]
    path = root / "lora_recipe.yml"
    recipe = _recipe("base+plain", {"model": {"path": "base"}, "lora": "saved"}, "base")
    path.write_text(yaml.safe_dump(recipe))
    monkeypatch.chdir(tmp_path)
    loaded = Recipe.from_yaml(path)
    assert loaded.models[0].model == f"{lora['base']}+{lora['plain']}"
    assert loaded.models[1].model == f"{lora['base']}+{lora['saved']}"
    run(path, tmp_path / "ours", MergeOptions(show_progress=False))
    refs = _recipe(str(lora["plain-merged"]), str(lora["saved-merged"]), str(lora["base"]))
    run(refs, tmp_path / "theirs", MergeOptions(show_progress=False))
    ours, theirs = folder_tensors(tmp_path / "ours"), folder_tensors(tmp_path / "theirs")
    assert sorted(ours) == sorted(theirs)
    for n in ours:
        torch.testing.assert_close(ours[n], theirs[n], rtol=0, atol=1e-6)
    for f in ("tokenizer.json", "tokenizer_config.json"):  # 5. the base's tokenizer
        assert (tmp_path / "ours" / f).read_bytes() == (lora["base"] / f).read_bytes()


def test_a_plain_copy_writes_the_adapted_tensors(lora, tmp_path):
    """passthrough of base+adapter: no tensor the adapter changes is a byte copy of the base."""
    recipe = {
        "merge_method": "passthrough",
        "dtype": "float32",
        "slices": [
            {"sources": [{"model": f"{lora['base']}+{lora['saved']}", "layer_range": [0, 4]}]}
        ],
    }
    run(recipe, tmp_path / "out", MergeOptions(show_progress=False))
    ours, merged = folder_tensors(tmp_path / "out"), folder_tensors(lora["saved-merged"])
    assert sorted(ours) == sorted(merged)
    for n in ours:
        torch.testing.assert_close(ours[n], merged[n], rtol=0, atol=1e-6)


def test_adapter_tokenizer_wins_when_it_ships_one(lora, tmp_path):
    adapter = tmp_path / "with_tokenizer"
    shutil.copytree(lora["plain"], adapter)
    tok = make_tokenizer(96)
    tok.model_max_length = 77  # tells the two tokenizers apart
    tok.save_pretrained(adapter)
    ref = f"{lora['base']}+{adapter}"
    ckpt = open_checkpoint(ref)
    assert ckpt.path == adapter and ckpt.base_path == lora["base"]
    assert ckpt.folders == [lora["base"], adapter]
    recipe = {"merge_method": "linear", "models": [{"model": ref, "parameters": {"weight": 1}}]}
    run(recipe, tmp_path / "out", MergeOptions(show_progress=False))
    for f in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "out" / f).read_bytes() == (adapter / f).read_bytes()
    config = EvolveConfig.from_dict(
        {"genome": {"models": [ref, str(lora["base"])], "merge_method": "linear"}, "tasks": ["t"]}
    )
    assert config.tokenizer_ref() == str(adapter)


# ---- 3. the same tensors as mergekit (which merges into --lora-merge-cache first) --------------
MERGEKIT = """
import json, sys
from mergekit.scripts.run_yaml import main
config, out, cache = json.loads(sys.argv[1])
main.main([config, out, "--no-write-model-card", "--no-copy-tokenizer", "--quiet",
           "--lora-merge-cache", cache], standalone_mode=False)
"""


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("mergekit") is None, reason="mergekit is not installed"
)
def test_same_tensors_as_mergekit(lora, tmp_path):
    base = str(lora["base"])
    recipe = _recipe(
        f"{base}+{lora['plain']}",
        {"model": {"path": base}, "lora": {"path": str(lora["rslora"])}},
        base,
    )
    path = tmp_path / "r.yml"
    path.write_text(yaml.safe_dump(recipe))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    args = json.dumps([str(path), str(tmp_path / "mk"), str(tmp_path / "cache")])
    proc = subprocess.run(
        [sys.executable, "-c", MERGEKIT, args], capture_output=True, text=True, env=env, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert len(list((tmp_path / "cache").iterdir())) == 2  # mergekit's merged copies on disk
    run(path, tmp_path / "sp", MergeOptions(show_progress=False))
    ours, theirs = folder_tensors(tmp_path / "sp"), folder_tensors(tmp_path / "mk")
    # mergekit's llama architecture lists no biases: it leaves the linears' biases out
    assert set(theirs) <= set(ours) and all(n.endswith(".bias") for n in set(ours) - set(theirs))
    for n in theirs:
        torch.testing.assert_close(ours[n], theirs[n], rtol=0, atol=1e-6)
    assert (tmp_path / "sp" / "tokenizer.json").is_file()  # the base's


# ---- 4. bad adapters: one line, exit 2, nothing written ----------------------------------------
def _broken(lora: Path, tmp_path: Path, how: str) -> Path:
    adapter = tmp_path / how
    shutil.copytree(lora["plain"], adapter)
    config_path = adapter / "adapter_config.json"
    config = json.loads(config_path.read_text())
    weights = adapter / "adapter_model.safetensors"
    if how == "dora":
        config["use_dora"] = True
    elif how == "ia3":
        config["peft_type"] = "IA3"
    elif how == "no_config":
        config_path.unlink()
    elif how == "no_weights":
        weights.unlink()
    elif how == "missing_module":  # layer 9 of a 4-layer base
        sd = load_file(weights)
        sd = {k.replace("layers.3.", "layers.9."): v for k, v in sd.items()}
        save_file(sd, weights)
    elif how == "other_base":  # an adapter of a wider model
        sd = load_file(weights)
        key = "base_model.model.model.layers.0.mlp.down_proj.lora_A.weight"
        sd[key] = torch.zeros(4, 80)
        save_file(sd, weights)
    elif how == "rank":
        config["r"] = 8
    elif how == "dora_tensor":
        sd = load_file(weights)
        sd["base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector"] = torch.ones(
            32
        )
        save_file(sd, weights)
    elif how == "pickled":
        sd = load_file(weights)
        weights.unlink()
        torch.save(sd, adapter / "adapter_model.bin")
    if config_path.exists():
        config_path.write_text(json.dumps(config))
    return adapter


BAD = {
    "dora": "a DoRA adapter (use_dora: true) is not supported",
    "ia3": "PEFT type 'IA3' is not supported",
    "no_config": "not a PEFT adapter folder (no adapter_config.json)",
    "no_weights": "no adapter_model.safetensors",
    "missing_module": "adapts model.layers.9.mlp.down_proj.weight, which the base",
    "other_base": "adapts a [32, 80] matrix, but the base's model.layers.0.mlp.down_proj.weight",
    "rank": "has rank 4, but adapter_config.json says 8",
    "dora_tensor": "belongs to a LoRA variant splice does not apply",
    "pickled": "the adapter's weights are pickled",
}


@pytest.mark.parametrize("how", list(BAD))
def test_bad_adapters_are_one_line_exit_2(lora, tmp_path, capsys, how):
    adapter = _broken(lora, tmp_path, how)
    recipe = tmp_path / "r.yml"
    recipe.write_text(
        yaml.safe_dump(_recipe(f"{lora['base']}+{adapter}", str(lora["base"]), str(lora["base"])))
    )
    out = tmp_path / "out"
    assert main(["merge", str(recipe), str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and BAD[how] in err, err
    assert not out.exists()
    if how == "pickled":  # with --allow-pickle, as weights: the same merge as from safetensors
        assert main(["merge", str(recipe), str(out), "--allow-pickle"]) == 0
        base = str(lora["base"])
        run(
            _recipe(f"{base}+{lora['plain']}", base, base),
            tmp_path / "ref",
            MergeOptions(show_progress=False),
        )
        ours, ref = folder_tensors(out), folder_tensors(tmp_path / "ref")
        assert sorted(ours) == sorted(ref) and all(torch.equal(ours[n], ref[n]) for n in ours)


def test_missing_adapter_folder_and_unresolvable_refs(lora, tmp_path):
    with pytest.raises(SpliceError, match=r"gone: no such folder \(the LoRA adapter"):
        open_checkpoint(f"{lora['base']}+{tmp_path / 'gone'}")
    with pytest.raises(SpliceError, match=r"gone: no such folder"):
        open_checkpoint(f"{tmp_path / 'gone'}+{lora['plain']}")
    with pytest.raises(SpliceError):  # an adapter is no base model
        open_checkpoint(f"{lora['plain']}+{lora['plain']}")


# ---- references: splitting, paths, recipes -------------------------------------------------------
def test_lora_parts_prefers_existing_paths_and_the_last_plus_that_resolves(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for d in ("a+b", "a", "b+c", "c", "x", "y"):
        (tmp_path / d).mkdir()
    assert lora_parts("a+b") is None  # exists as typed
    assert lora_parts("a") is None
    assert lora_parts("a+b+c") == ("a+b", "c")  # the last + whose two sides exist
    assert lora_parts("x+b+c") == ("x", "b+c")
    assert lora_parts("org/base+org/adapter") == ("org/base", "org/adapter")  # hub ids
    assert lora_parts("x+gone") == ("x", "gone")  # the side found nowhere gets reported
    assert lora_parts("x+") is None and lora_parts("+y") is None
    files = tmp_path / "files"
    (files / "base").mkdir(parents=True)
    (files / "adapter").mkdir()
    assert lora_parts("base+adapter", files) == ("base", "adapter")
    assert resolve_path("base+adapter", files) == f"{files / 'base'}+{files / 'adapter'}"
    assert resolve_path("x+adapter", files) == f"x+{files / 'adapter'}"
    assert resolve_path("x+y", files, absolute=True) == f"{tmp_path / 'x'}+{tmp_path / 'y'}"
    assert resolve_path("org/base+adapter", files) == f"org/base+{files / 'adapter'}"
    with pytest.raises(SpliceError, match=r"recipe r.yml: gone: no such folder, from the current"):
        resolve_path("x+gone", files, what="recipe r.yml")


def test_recipe_reference_forms():
    models = [
        "b+a",
        {"model": "b", "lora": "a"},
        {"model": {"path": "b"}, "lora": {"path": "a"}},
    ]
    recipe = Recipe.from_dict(
        {"merge_method": "linear", "models": [{"model": m} for m in models], "base_model": "b+a"}
    )
    assert [m.model for m in recipe.models] == ["b+a"] * 3 and recipe.base_model == "b+a"
    for bad, why in (
        ({"model": "b", "lora": {"path": "a", "revision": "x"}}, "'revision' is not supported"),
        ({"model": "b", "lora": ""}, "is empty"),
        ({"model": "b", "lora": "http://x/a"}, "is a URL"),
    ):
        with pytest.raises(SpliceError, match=why):
            Recipe.from_dict({"merge_method": "linear", "models": [{"model": bad}]})


def test_evolve_sources_resolve_each_side(lora, tmp_path, monkeypatch):
    path = lora["root"] / "evolve.yml"
    path.write_text(
        yaml.safe_dump(
            {
                "genome": {"models": ["base+plain", "base"], "merge_method": "linear"},
                "tasks": ["t"],
            }
        )
    )
    monkeypatch.chdir(tmp_path)
    config = EvolveConfig.from_yaml(path)
    assert config.source_models() == [f"{lora['base']}+{lora['plain']}", str(lora["base"])]
    assert config.tokenizer_ref() == str(lora["base"])  # the adapter ships no tokenizer


def test_in_memory_merge_from_resident_lora_sources(lora, tmp_path):
    """evolve's path: sources held resident (splice.problems.open_models, then
    ResidentCheckpoint.of), candidates merged into a live module: the written merge's tensors."""
    from splice.merge import merge_into, plan
    from splice.problems import open_models
    from splice.resident import empty_model

    base = str(lora["base"])
    recipe = _recipe(f"{base}+{lora['plain']}", f"{base}+{lora['saved']}", base)
    opened = open_models(Recipe.from_dict(recipe).referenced_models())
    resident = {ref: ResidentCheckpoint.of(ckpt) for ref, ckpt in opened.items()}
    assert sum(isinstance(r, ResidentLora) for r in resident.values()) == 2
    p = plan(recipe, MergeOptions(show_progress=False), resident)
    module = empty_model(p.config)
    for _ in range(2):  # the second merge reads nothing from disk
        merge_into(module, p, resident, options=MergeOptions(show_progress=False))
    run(recipe, tmp_path / "out", MergeOptions(show_progress=False))
    written = folder_tensors(tmp_path / "out")
    for n, t in module.state_dict().items():
        torch.testing.assert_close(t, written[n], rtol=0, atol=1e-6)


# ---- verbs that run the model ------------------------------------------------------------------
def test_live_model_verbs_run_the_adapted_model(lora):
    """The one model loader applies the adapter: ``load_causal_lm("base+adapter")`` (and of the
    open checkpoint) gives the logits of PEFT's merged model, not the base's."""
    from splice.checkpoint import open_checkpoint
    from splice.modeling import load_causal_lm

    ref = f"{lora['base']}+{lora['plain']}"
    ids = torch.arange(3, 19)[None]
    want = _peft_merged(lora["base"], lora["plain"])(ids).logits
    base = load_causal_lm(lora["base"])(ids).logits
    for given in (ref, open_checkpoint(ref)):
        got = load_causal_lm(given)(ids).logits
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert (base - want).abs().max() > 1e-3  # the adapter changes the logits


def test_the_zoo_loader_applies_the_adapter(lora):
    """``splice.zoo.load_model("base+adapter")`` (zoo eval's loader) is PEFT's merged model."""
    from splice.zoo import load_model

    ids = torch.arange(3, 19)[None]
    want = _peft_merged(lora["base"], lora["plain"])(ids).logits
    got = load_model(f"{lora['base']}+{lora['plain']}")(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
