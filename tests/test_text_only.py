"""``splice convert MM OUT --text-only``: a Gemma 3 vision-language checkpoint's language model
as ``gemma3_text``, checked against transformers' own multimodal model: the output loads in
``AutoModelForCausalLM`` with no missing or unexpected key, its logits on a text-only input are
the multimodal model's, and every language-model tensor is the input's, byte for byte."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from families import BASE, FAMILIES, build
from mm_families import VISION_CLIP
from safetensors import safe_open
from safetensors.torch import save_file

from splice.cli import main

VISION = VISION_CLIP  # the tiny SigLIP tower of tests/mm_families.py
#: transformers 4.52-4.x's names for what transformers 5 (and Google's files) save otherwise
NEW_LAYOUT = {
    "language_model.model.": "model.language_model.",
    "language_model.lm_head.": "lm_head.",
    "vision_tower.": "model.vision_tower.",
    "multi_modal_projector.": "model.multi_modal_projector.",
}
IDS = torch.tensor([[1, 5, 17, 42, 9, 77, 3, 60, 11, 88, 23, 4]])


def gemma3(folder: Path, *, tied: bool, layout: str = "saved") -> tuple[Path, torch.Tensor]:
    """A tiny random Gemma 3 vision-language model saved to ``folder``, and its logits on
    :data:`IDS` (text only), from transformers' ``Gemma3ForConditionalGeneration``.
    ``layout="new"``: its tensors renamed to transformers 4.52's layout (:data:`NEW_LAYOUT`)."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    text = {**BASE, **FAMILIES["gemma3_text"], "tie_word_embeddings": tied}
    cfg = Gemma3Config(
        text_config=text,
        vision_config=VISION,
        mm_tokens_per_image=4,
        boi_token_index=93,
        eoi_token_index=94,
        image_token_index=95,
        tie_word_embeddings=tied,
    )
    torch.manual_seed(0)
    model = Gemma3ForConditionalGeneration(cfg).float().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
        logits = model(input_ids=IDS).logits
    model.save_pretrained(folder)
    (folder / "tokenizer_config.json").write_text('{"model_max_length": 64}')
    if layout == "new":
        file = folder / "model.safetensors"
        with safe_open(file, "pt") as f:
            tensors = {_renamed(n): f.get_tensor(n) for n in f.keys()}  # noqa: SIM118
        save_file(tensors, file, metadata={"format": "pt"})
    return folder, logits


def _renamed(name: str) -> str:
    old = next(p for p in NEW_LAYOUT if name.startswith(p))
    return NEW_LAYOUT[old] + name[len(old) :]


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    with safe_open(folder / "model.safetensors", "pt") as f:
        return {n: f.get_tensor(n) for n in f.keys()}  # noqa: SIM118


@pytest.mark.parametrize(
    ("tied", "layout"), [(True, "saved"), (False, "saved"), (True, "new"), (False, "new")]
)
def test_text_only_matches_the_multimodal_model(tmp_path, tied, layout):
    from transformers import AutoModelForCausalLM

    mm, reference = gemma3(tmp_path / "mm", tied=tied, layout=layout)
    out = tmp_path / "text"
    assert main(["convert", str(mm), str(out), "--text-only", "--no-progress"]) == 0

    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "gemma3_text"
    assert config["architectures"] == ["Gemma3ForCausalLM"]
    assert config["dtype"] == "float32"
    assert config["tie_word_embeddings"] is tied
    assert config["layer_types"] == FAMILIES["gemma3_text"]["layer_types"]
    assert (out / "tokenizer_config.json").is_file()

    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert type(model).__name__ == "Gemma3ForCausalLM"
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert not info["mismatched_keys"]
    with torch.no_grad():
        logits = model.eval()(input_ids=IDS).logits
    torch.testing.assert_close(logits, reference, rtol=0, atol=1e-6)

    source, written = tensors(mm), tensors(out)
    prefix = "model.language_model." if layout == "new" else "language_model.model."
    expected = {"model." + n[len(prefix) :]: t for n, t in source.items() if n.startswith(prefix)}
    head = [n for n in source if n.endswith("lm_head.weight")]
    assert len(head) == (0 if tied else 1)
    if head:
        expected["lm_head.weight"] = source[head[0]]
    assert set(written) == set(expected)
    for name, t in expected.items():
        assert t.dtype == written[name].dtype
        assert t.view(torch.uint8).equal(written[name].view(torch.uint8)), name


def test_text_only_casts_on_request(tmp_path):
    mm, _ = gemma3(tmp_path / "mm", tied=True)
    out = tmp_path / "text"
    argv = ["convert", str(mm), str(out), "--text-only", "--dtype", "bfloat16", "--no-progress"]
    assert main(argv) == 0
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert {t.dtype for t in tensors(out).values()} == {torch.bfloat16}


def test_text_only_refuses_a_text_model(tmp_path, capsys):
    llama = build("llama", tmp_path / "llama")
    out = tmp_path / "out"
    capsys.readouterr()
    assert main(["convert", str(llama), str(out), "--text-only"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "model_type 'llama' is not one" in err
    assert not out.exists()


def test_text_only_refuses_an_unmapped_multimodal_family(tmp_path, capsys):
    mm, _ = gemma3(tmp_path / "mm", tied=True)
    config = json.loads((mm / "config.json").read_text())
    config["model_type"] = "llava"
    (mm / "config.json").write_text(json.dumps(config))
    out = tmp_path / "out"
    capsys.readouterr()
    assert main(["convert", str(mm), str(out), "--text-only"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "no layout for the multimodal model_type 'llava'" in err
    assert not out.exists()


def test_a_multimodal_model_in_another_familys_layout_is_refused(tmp_path, capsys):
    """A Gemma 3 checkpoint whose config says Qwen2.5-VL: its tensors are in none of
    Qwen2.5-VL's modules, which every verb says in one line before writing anything."""
    mm, _ = gemma3(tmp_path / "mm", tied=True)
    config = json.loads((mm / "config.json").read_text())
    config["model_type"] = "qwen2_5_vl"
    (mm / "config.json").write_text(json.dumps(config))
    capsys.readouterr()
    for argv in (["convert", "--text-only"], ["upscale", "--duplicate", "1:2"]):
        out = tmp_path / argv[0]
        assert main([argv[0], str(mm), str(out), *argv[1:]]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1
        assert "'language_model.model.embed_tokens.weight' is in none of qwen2_5_vl's" in err
        assert not out.exists()


def test_text_config_of_a_hub_gemma3_config():
    """google/gemma-3-4b-it's config.json: a sparse text_config (defaults from the class, linear
    RoPE scaling on the full-attention layers), the end-of-turn ids at the top level."""
    from splice.multimodal import LAYOUTS, text_config

    hub = {
        "architectures": ["Gemma3ForConditionalGeneration"],
        "eos_token_id": [1, 106],
        "model_type": "gemma3",
        "text_config": {
            "hidden_size": 2560,
            "intermediate_size": 10240,
            "model_type": "gemma3_text",
            "num_hidden_layers": 34,
            "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
            "sliding_window": 1024,
        },
        "torch_dtype": "bfloat16",
        "vision_config": {"model_type": "siglip_vision_model", "vision_use_head": False},
    }
    config = text_config(hub, LAYOUTS["gemma3"], tied=True)
    assert config["model_type"] == "gemma3_text"
    assert config["eos_token_id"] == [1, 106]
    assert config["torch_dtype"] == "bfloat16"
    assert (config["vocab_size"], config["head_dim"], config["num_key_value_heads"]) == (
        262208,
        256,
        4,
    )
    rope = config["rope_parameters"]
    assert rope["full_attention"]["rope_type"] == "linear"
    assert rope["full_attention"]["factor"] == 8.0
    assert rope["sliding_attention"]["rope_theta"] == 10000.0
    assert config["layer_types"][:6] == ["sliding_attention"] * 5 + ["full_attention"]


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_text_only_of_mistral3(tmp_path, tied):
    """Mistral Small 3.x (``mistral3``): its language model as a plain ``mistral``, loaded by
    ``AutoModelForCausalLM`` with nothing missing or unexpected, with the multimodal model's
    text logits; the vision tower and projector left out."""
    from transformers import AutoModelForCausalLM, Mistral3Config, Mistral3ForConditionalGeneration

    text = dict(model_type="mistral", vocab_size=96, hidden_size=32, intermediate_size=64,
                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                max_position_embeddings=64, tie_word_embeddings=tied)  # fmt: skip
    vision = dict(model_type="pixtral", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                  num_attention_heads=4, head_dim=8, image_size=32, patch_size=8)  # fmt: skip
    cfg = Mistral3Config(text_config=text, vision_config=vision, image_token_index=95,
                         tie_word_embeddings=tied)  # fmt: skip
    torch.manual_seed(0)
    mm = Mistral3ForConditionalGeneration(cfg).eval()
    src, out = tmp_path / "mm", tmp_path / "text"
    mm.save_pretrained(src)
    ids = torch.arange(3, 19)[None]
    with torch.no_grad():
        want = mm(input_ids=ids).logits
    assert main(["convert", str(src), str(out), "--text-only", "--no-progress"]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "mistral" and config["architectures"] == ["MistralForCausalLM"]
    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    with torch.no_grad():
        got = model(input_ids=ids).logits
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    names = set(tensors(out))
    assert not any("vision" in n or "projector" in n for n in names)
    assert ("lm_head.weight" in names) == (not tied)
