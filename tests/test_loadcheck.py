"""splice.loadcheck against transformers itself.

Each family of ``families.FAMILIES`` is built once (transformers' ``save_pretrained``); its
config and tensor list must pass :func:`check_loads`, and every fault planted into them (a
tensor dropped, an extra one, a wrong shape, a short ``layer_types``) must be refused, with the
missing or unexpected names that ``AutoModelForCausalLM.from_pretrained(...,
output_loading_info=True)`` reports for the same fault written to disk: the independent
reference.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import families
import pytest
import torch
from safetensors.torch import load_file, save_file

from splice.errors import SpliceError
from splice.loadcheck import check_loads, load_report

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)

BOGUS = "model.layers.0.bogus.weight"
Tensors = dict[str, torch.Tensor]


class Built:
    """Each family's config and tensors, built on first use (one folder per family)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.models: dict[str, tuple[dict[str, Any], Tensors]] = {}

    def __call__(self, family: str) -> tuple[dict[str, Any], Tensors]:
        """The family's config.json and tensors (skips a family transformers does not know)."""
        if not families.known(family):
            pytest.skip(f"the installed transformers has no model type {family!r}")
        if family not in self.models:
            folder = families.build(family, self.root / family)
            config = json.loads((folder / "config.json").read_text())
            self.models[family] = (config, load_file(folder / "model.safetensors"))
        return self.models[family]


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Built:
    return Built(tmp_path_factory.mktemp("loadcheck"))


def listing(tensors: Tensors) -> dict[str, tuple[tuple[int, ...], str]]:
    """name -> (shape, dtype name): what check_loads takes."""
    return {n: (tuple(t.shape), str(t.dtype).removeprefix("torch.")) for n, t in tensors.items()}


def refused(config: dict[str, Any], tensors: Tensors) -> str:
    """check_loads' one-line refusal."""
    with pytest.raises(SpliceError) as e:
        check_loads(config, listing(tensors))
    message = str(e.value)
    assert "\n" not in message, message
    return message


def reference(folder: Path, config: dict[str, Any], tensors: Tensors) -> dict[str, Any] | str:
    """transformers' loading info for ``tensors`` written to ``folder``, or the first line of
    its exception."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config))
    save_file({n: t.contiguous() for n, t in tensors.items()}, folder / "model.safetensors")
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        _, info = AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True)
    except Exception as e:
        return str(e).splitlines()[0]
    finally:
        hf_logging.set_verbosity(level)
        hf_logging.enable_progress_bar()
        shutil.rmtree(folder)
    return info


def layer_tensor(tensors: Tensors) -> str:
    return sorted(n for n in tensors if n.startswith("model.layers.1."))[0]


def global_norm(tensors: Tensors) -> str:
    return sorted(n for n in tensors if ".layers." not in n and "norm" in n)[-1]


# ---- every family -------------------------------------------------------------------------------
FAMILIES = list(families.FAMILIES)


@pytest.mark.parametrize("family", FAMILIES)
def test_the_saved_model_passes(family, built):
    config, tensors = built(family)
    check_loads(config, listing(tensors))


@pytest.mark.parametrize("where", ["layer", "global"])
@pytest.mark.parametrize("family", FAMILIES)
def test_a_dropped_tensor_is_missing_as_transformers_says(family, where, built, tmp_path):
    config, tensors = built(family)
    name = layer_tensor(tensors) if where == "layer" else global_norm(tensors)
    kept = {n: t for n, t in tensors.items() if n != name}
    assert f"1 missing tensor ({name})" in refused(config, kept)
    report = load_report(config, listing(kept))
    info = reference(tmp_path / "ref", config, kept)
    assert isinstance(info, dict), info
    assert set(info["missing_keys"]) == report.missing == {name}
    assert not info["unexpected_keys"] and not report.unexpected


@pytest.mark.parametrize("family", FAMILIES)
def test_an_extra_tensor_is_unexpected_as_transformers_says(family, built, tmp_path):
    config, tensors = built(family)
    extra = {**tensors, BOGUS: torch.zeros(4)}
    assert f"1 unexpected tensor ({BOGUS})" in refused(config, extra)
    info = reference(tmp_path / "ref", config, extra)
    assert isinstance(info, dict), info
    assert set(info["unexpected_keys"]) == load_report(config, listing(extra)).unexpected
    assert not info["missing_keys"]


@pytest.mark.parametrize("family", FAMILIES)
def test_a_wrong_shape_is_refused_as_transformers_does(family, built, tmp_path):
    config, tensors = built(family)
    name = layer_tensor(tensors)
    shape = tensors[name].shape
    wrong = {**tensors, name: torch.zeros(shape[0] + 1, *shape[1:])}
    message = refused(config, wrong)
    assert f"1 tensor of the wrong shape ({name}: [{shape[0] + 1}" in message
    assert "mismatched" in reference(tmp_path / "ref", config, wrong)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_short_layer_types_is_refused(family, built):
    config, tensors = built(family)
    if "layer_types" not in config:
        pytest.skip(f"{family} has no layer_types")
    short = {**config, "layer_types": config["layer_types"][:-1]}
    message = refused(short, tensors)
    assert message.startswith("transformers rejects the output's config:"), message
    assert "layer_types" in message


@pytest.mark.parametrize("family", FAMILIES)
def test_tied_embeddings_need_no_head(family, built, tmp_path):
    config, tensors = built(family)
    headless = {n: t for n, t in tensors.items() if n != "lm_head.weight"}
    tied = {**config, "tie_word_embeddings": True}
    if config.get("tie_word_embeddings"):
        assert "lm_head.weight" not in tensors  # save_pretrained left the tied head out
    check_loads(tied, listing(headless))
    both = {**headless, "lm_head.weight": tensors["model.embed_tokens.weight"].clone()}
    check_loads(tied, listing(both))  # a head that is there as well loads too
    untied = {**config, "tie_word_embeddings": False}
    assert "1 missing tensor (lm_head.weight)" in refused(untied, headless)
    if family in ("gemma", "starcoder2"):  # one reference each way is enough
        info = reference(tmp_path / "tied", tied, headless)
        assert isinstance(info, dict) and not info["missing_keys"], info
        info = reference(tmp_path / "untied", untied, headless)
        assert isinstance(info, dict) and set(info["missing_keys"]) == {"lm_head.weight"}, info


def test_tied_embeddings_load_from_the_head_alone(built):
    config, tensors = built("gemma")
    head_only = {n: t for n, t in tensors.items() if n != "model.embed_tokens.weight"}
    check_loads({**config, "tie_word_embeddings": True}, listing(head_only))
    neither = {n: t for n, t in head_only.items() if n != "lm_head.weight"}
    message = refused({**config, "tie_word_embeddings": True}, neither)
    assert "2 missing tensors (lm_head.weight, model.embed_tokens.weight)" in message


def test_old_rotary_buffers_are_tolerated_as_transformers_does(built, tmp_path):
    config, tensors = built("llama")
    old = {**tensors, "model.layers.0.self_attn.rotary_emb.inv_freq": torch.zeros(4)}
    check_loads(config, listing(old))
    info = reference(tmp_path / "ref", config, old)
    assert isinstance(info, dict) and not info["unexpected_keys"], info


# ---- converted checkpoints (MoE experts packed at load) -----------------------------------------
@pytest.fixture(scope="module")
def mixtral(tmp_path_factory) -> tuple[dict[str, Any], Tensors]:
    from transformers import AutoConfig, AutoModelForCausalLM

    if not families.known("mixtral"):
        pytest.skip("the installed transformers has no mixtral")
    torch.manual_seed(0)
    cfg = AutoConfig.for_model(
        "mixtral",
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        num_local_experts=4,
        num_experts_per_tok=2,
    )
    folder = tmp_path_factory.mktemp("mixtral") / "model"
    AutoModelForCausalLM.from_config(cfg).save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    return config, load_file(folder / "model.safetensors")


def test_mixtral_saved_per_expert_passes(mixtral):
    config, tensors = mixtral
    assert "model.layers.0.block_sparse_moe.experts.3.w1.weight" in tensors
    check_loads(config, listing(tensors))


def test_mixtral_packed_experts_pass(mixtral):
    from transformers import AutoConfig, AutoModelForCausalLM

    config, _ = mixtral
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config))
    packed = {n: (tuple(t.shape), "float32") for n, t in model.state_dict().items()}
    assert "model.layers.0.mlp.experts.gate_up_proj" in packed
    check_loads(config, packed)
    packed["model.layers.0.mlp.experts.gate_up_proj"] = ((4, 3, 16), "float32")
    with pytest.raises(SpliceError, match="wrong shape"):
        check_loads(config, packed)


def test_mixtral_missing_expert_fails_as_transformers_does(mixtral, tmp_path):
    config, tensors = mixtral
    name = "model.layers.0.block_sparse_moe.experts.3.w1.weight"
    kept = {n: t for n, t in tensors.items() if n != name}
    message = refused(config, kept)
    assert "cannot convert (model.layers.0.mlp.experts.gate_up_proj" in message, message
    assert "conversion" in reference(tmp_path / "ref", config, kept)
    extra = {**tensors, BOGUS: torch.zeros(4)}
    assert f"1 unexpected tensor ({BOGUS})" in refused(config, extra)


# ---- refusals before any tensor -----------------------------------------------------------------
def test_unknown_model_type_needs_no_verify():
    message = refused({"model_type": "foo", "num_hidden_layers": 2}, {})
    assert "does not know" in message and "'foo'" in message and "--no-verify" in message


def test_remote_code_is_never_run(built):
    config, tensors = built("llama")
    remote = {**config, "auto_map": {"AutoConfig": "x.Config", "AutoModelForCausalLM": "x.M"}}
    message = refused(remote, tensors)
    assert "auto_map" in message and "--no-verify" in message


def test_a_rebuilt_per_layer_field_is_named(built, monkeypatch):
    from transformers import CONFIG_MAPPING, LlamaConfig

    class Rebuilds(LlamaConfig):  # as a config class that derives layer_types from an interval
        model_type = "splice_rebuilds"

        def __post_init__(self, **kwargs):
            super().__post_init__(**kwargs)
            self.layer_types = ["full_attention"] * self.num_hidden_layers

    monkeypatch.setitem(CONFIG_MAPPING._extra_content, "splice_rebuilds", Rebuilds)
    config, tensors = built("llama")
    planned = ["sliding_attention", "full_attention"] * 2
    config = {**config, "model_type": "splice_rebuilds", "layer_types": planned}
    message = refused(config, tensors)
    assert message.startswith("transformers rebuilds layer_types of splice_rebuilds"), message
    assert "planned ['sliding_attention'" in message


def test_a_config_the_model_cannot_build_is_one_line(built):
    config, tensors = built("llama")
    message = refused({**config, "hidden_act": "no_such_activation"}, tensors)
    assert message.startswith("transformers cannot build LlamaForCausalLM"), message
    assert "no_such_activation" in message


def test_a_70b_config_is_checked_on_the_meta_device():
    import resource
    import time

    from transformers import AutoConfig

    sizes = dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80)
    sizes.update(num_attention_heads=64, num_key_value_heads=8, vocab_size=128256)
    config = {**AutoConfig.for_model("llama", **sizes).to_dict(), "model_type": "llama"}
    config["architectures"] = ["LlamaForCausalLM"]
    hidden, inter, heads_kv = 8192, 28672, 8 * 128
    tensors: dict[str, tuple[tuple[int, ...], str]] = {
        "model.embed_tokens.weight": ((128256, hidden), "bfloat16"),
        "lm_head.weight": ((128256, hidden), "bfloat16"),
        "model.norm.weight": ((hidden,), "bfloat16"),
    }
    for i in range(80):
        p = f"model.layers.{i}."
        tensors |= {
            p + "input_layernorm.weight": ((hidden,), "bfloat16"),
            p + "post_attention_layernorm.weight": ((hidden,), "bfloat16"),
            p + "self_attn.q_proj.weight": ((hidden, hidden), "bfloat16"),
            p + "self_attn.k_proj.weight": ((heads_kv, hidden), "bfloat16"),
            p + "self_attn.v_proj.weight": ((heads_kv, hidden), "bfloat16"),
            p + "self_attn.o_proj.weight": ((hidden, hidden), "bfloat16"),
            p + "mlp.gate_proj.weight": ((inter, hidden), "bfloat16"),
            p + "mlp.up_proj.weight": ((inter, hidden), "bfloat16"),
            p + "mlp.down_proj.weight": ((hidden, inter), "bfloat16"),
        }
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    check_loads(config, tensors)
    assert time.perf_counter() - start < 10
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 512 * 1024  # KiB
