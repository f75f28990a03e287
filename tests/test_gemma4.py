"""Gemma 4 (``gemma4_text`` and the multimodal ``gemma4``), checked against transformers' own
models on tiny random checkpoints, never against splice.

What is particular to the family, and what each verb does with it:

- a full-attention layer has ``global_head_dim`` (and, under ``attention_k_eq_v``, no
  ``v_proj`` and ``num_global_key_value_heads``), recorded per layer index in
  ``per_layer_config``; the last ``num_kv_shared_layers`` layers have no k/v projections (they
  reuse the keys and values of the last earlier layer of their type) and, under
  ``use_double_wide_mlp``, an MLP twice as wide: layers differ in shape;
- per-layer input embeddings: ``embed_tokens_per_layer`` ``[vocab_size_per_layer_input, L·P]``
  and ``per_layer_model_projection`` ``[L·P, hidden]`` hold one block of ``P`` =
  ``hidden_size_per_layer_input`` per layer; each layer gates its block into the stream
  (``per_layer_input_gate`` reads the stream un-normalised) and ``layer_scalar`` rescales the
  stream after it;
- the optional MoE block runs beside the dense MLP; its experts are stored packed
  (``experts.gate_up_proj`` ``[E, 2I, H]``, ``experts.down_proj`` ``[E, H, I]``).

merge (linear, two seeds) is the hand-computed mix; convert ``--text-only`` keeps the text
logits; upscale, prune, passthrough slices, slice and collapse refuse in one line (exit code 2,
nothing written).
A merge onto another vocabulary (``tokenizer_source: union``, tokensurgeon) refuses too: the
per-layer table is token-indexed and not re-indexed yet.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from mm_families import GEMMA4_AUDIO, GEMMA4_TOKENS, GEMMA4_VISION
from safetensors import safe_open

from splice.cli import main

torch.set_num_threads(1)

SLIDING = ["sliding_attention", "full_attention"] * 3
#: fields of every tiny Gemma 4 language model: 6 layers, sliding windows short enough to matter
#: on a 12-token input, a wider head in the full-attention layers, logit softcapping
TEXT: dict = dict(
    vocab_size=96,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=6,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    global_head_dim=16,
    max_position_embeddings=64,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
    sliding_window=3,
    layer_types=SLIDING,
    final_logit_softcapping=30.0,
)
#: E2B / E4B-like (per-layer embeddings, KV sharing, double-wide MLPs in the shared layers) and
#: 26B-A4B-like (an MoE block beside the MLP, keys as values in full attention, no PLE)
VARIANTS: dict[str, dict] = {
    "ple": dict(
        vocab_size_per_layer_input=96,
        hidden_size_per_layer_input=4,
        num_kv_shared_layers=2,
        use_double_wide_mlp=True,
    ),
    "moe": dict(
        hidden_size_per_layer_input=0,
        enable_moe_block=True,
        num_experts=4,
        top_k_experts=2,
        moe_intermediate_size=16,
        attention_k_eq_v=True,
        num_global_key_value_heads=1,
    ),
}
#: the towers and special tokens of the multimodal model (:data:`SPECIAL` kept out of
#: :data:`IDS`), the ones the architecture table's gemma4 row is built with
VISION, AUDIO, SPECIAL = GEMMA4_VISION, GEMMA4_AUDIO, GEMMA4_TOKENS
IDS = torch.tensor([[1, 5, 17, 33, 60, 7, 9, 11, 80, 3, 4, 5]])


def _perturb(model: torch.nn.Module, seed: int) -> None:
    """Every parameter, and every ``layer_scalar`` (a stored buffer), moved off its init."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
        for name, b in model.named_buffers():
            if name.endswith("layer_scalar"):
                b.add_(0.2 * torch.randn_like(b))


def build_text(folder: Path, variant: str, seed: int = 0) -> Path:
    """A tiny random Gemma4ForCausalLM of ``variant`` saved to ``folder``."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model("gemma4_text", **TEXT, **VARIANTS[variant])
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    _perturb(model, seed)
    model.save_pretrained(folder)
    return folder


def build_mm(folder: Path, seed: int = 0, *, tied: bool = True) -> Path:
    """A tiny random Gemma4ForConditionalGeneration (language model of the ``ple`` variant,
    vision and audio towers) saved to ``folder``."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    cfg = AutoConfig.for_model(
        "gemma4",
        text_config={**TEXT, **VARIANTS["ple"], "tie_word_embeddings": tied},
        vision_config=VISION,
        audio_config=AUDIO,
        tie_word_embeddings=tied,
        **SPECIAL,
    )
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(cfg, dtype=torch.float32)
    _perturb(model, seed)
    model.save_pretrained(folder)
    (folder / "tokenizer_config.json").write_text('{"model_max_length": 64}')
    (folder / "preprocessor_config.json").write_text('{"image_processor_type": "tiny"}')
    return folder


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """Two seeds of each text variant, and of the multimodal model tied and untied."""
    root = tmp_path_factory.mktemp("gemma4")
    out = {}
    for variant in VARIANTS:
        for seed in (0, 1):
            out[f"{variant}{seed}"] = build_text(root / f"{variant}{seed}", variant, seed)
    for tied in (True, False):
        for seed in (0, 1):
            name = f"mm-{'tied' if tied else 'untied'}{seed}"
            out[name] = build_mm(root / name, seed, tied=tied)
    return out


def _stored(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(f, "pt") as s:
            out.update({k: s.get_tensor(k) for k in s.keys()})  # noqa: SIM118
    return out


def _linear_recipe(tmp_path: Path, a: Path, b: Path) -> Path:
    recipe = tmp_path / "linear.yaml"
    recipe.write_text(
        "merge_method: linear\nmodels:\n"
        f"  - model: {a}\n    parameters: {{weight: 0.3}}\n"
        f"  - model: {b}\n    parameters: {{weight: 0.7}}\n"
        "dtype: float32\n"
    )
    return recipe


def _refused(capsys, argv: list[str], out: Path, *why: str) -> None:
    """``splice argv`` exits 2 with one error line naming each of ``why``; nothing written."""
    capsys.readouterr()
    assert main(argv) == 2
    errors = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("splice: error")]
    assert len(errors) == 1, errors
    for part in why:
        assert part in errors[0], errors[0]
    assert not out.exists()


# ---- reading ----------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_the_spec_names_every_tensor(models, variant):
    from splice.checkpoint import open_checkpoint

    ckpt = open_checkpoint(models[f"{variant}0"])
    spec = ckpt.arch
    assert spec.model_type == "gemma4_text" and not spec.inferred
    groups = {n: spec.parse(n) for n in ckpt.tensors}
    others = sorted(n for n, t in groups.items() if t.group == "other")
    layers = [f"model.layers.{i}.layer_scalar" for i in range(6)]
    ple = ["model.per_layer_model_projection.weight", "model.per_layer_projection_norm.weight"]
    assert others == sorted(layers + (ple if variant == "ple" else []))
    assert groups["model.embed_tokens.weight"].group == "embed"
    if variant == "ple":  # token-indexed like the embedding: re-indexed with it
        assert groups["model.embed_tokens_per_layer.weight"].group == "embed"
    assert groups["model.norm.weight"].group == "final_norm"
    assert ckpt.tied and spec.lm_head not in ckpt.tensors
    for layer, names in ckpt.layer_index.items():
        kinds = {spec.parse(n).kind for n in names}
        assert set(spec.required_layer_kinds()) <= kinds, layer
    cfg = ckpt.config
    if variant == "ple":  # the shared layers: no keys or values of their own, a wider MLP
        for layer in (4, 5):
            assert spec.layer_name(layer, "self_attn.k_proj.weight") not in ckpt.tensors
            assert ckpt[spec.layer_name(layer, "mlp.gate_proj.weight")].shape == (128, 32)
        per_layer = cfg["hidden_size_per_layer_input"] * cfg["num_hidden_layers"]
        assert ckpt["model.embed_tokens_per_layer.weight"].shape == (96, per_layer)
    else:  # experts listed one by one; full attention reads its values from the keys
        assert spec.num_experts(cfg) == 4 and spec.experts_per_token(cfg) == 2
        for e in range(4):
            assert ckpt[spec.layer_name(0, "gate_proj.weight", e)].shape == (16, 32)
            assert ckpt[spec.layer_name(0, "down_proj.weight", e)].shape == (32, 16)
        assert spec.layer_name(1, "self_attn.v_proj.weight") not in ckpt.tensors
    assert ckpt[spec.layer_name(1, "self_attn.q_proj.weight")].shape == (4 * 16, 32)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_validate_and_inspect(models, variant, capsys):
    from splice.checkpoint import open_checkpoint

    open_checkpoint(models[f"{variant}0"]).validate()
    assert main(["inspect", str(models[f"{variant}0"])]) == 0
    assert "gemma4_text (Gemma4ForCausalLM)" in capsys.readouterr().out


def test_the_multimodal_layout(models):
    from splice.checkpoint import open_checkpoint
    from splice.multimodal import LanguageModel

    for tied in ("tied", "untied"):
        ckpt = open_checkpoint(models[f"mm-{tied}0"])
        assert isinstance(ckpt, LanguageModel)
        assert ckpt.config["model_type"] == "gemma4_text"
        assert ckpt.tied == (tied == "tied")
        assert sorted(ckpt.modules) == [
            "audio_projector",
            "audio_tower",
            "multi_modal_projector",
            "vision_tower",
        ]
        assert ckpt.layout.stream_writers(ckpt.module_tensors) == {
            "model.embed_vision.embedding_projection.weight": (0, False),
            "model.embed_audio.embedding_projection.weight": (0, False),
        }
        assert ckpt.stored_name("model.layers.3.layer_scalar") == (
            "model.language_model.layers.3.layer_scalar"
        )


# ---- merge and convert ------------------------------------------------------------------------
def _hand_mix(model: torch.nn.Module, other: torch.nn.Module, keep=lambda k: True) -> None:
    """``model``'s parameters and stored buffers set to ``0.3 · model + 0.7 · other`` where
    ``keep(name)``."""
    mine, theirs = model.state_dict(), other.state_dict()
    mixed = {
        k: 0.3 * v + 0.7 * theirs[k] if keep(k) and v.is_floating_point() else v
        for k, v in mine.items()
    }
    model.load_state_dict(mixed)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_linear_merge_is_the_hand_mix(models, variant, tmp_path):
    from transformers import AutoModelForCausalLM

    a, b = models[f"{variant}0"], models[f"{variant}1"]
    out = tmp_path / "out"
    assert main(["merge", str(_linear_recipe(tmp_path, a, b)), str(out)]) == 0
    merged, info = AutoModelForCausalLM.from_pretrained(
        out, dtype=torch.float32, output_loading_info=True
    )
    assert type(merged).__name__ == "Gemma4ForCausalLM"
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    ref = AutoModelForCausalLM.from_pretrained(a, dtype=torch.float32)
    _hand_mix(ref, AutoModelForCausalLM.from_pretrained(b, dtype=torch.float32))
    with torch.no_grad():
        want, got = ref(IDS).logits, merged(IDS).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert (
        json.loads((out / "config.json").read_text())["per_layer_config"]
        == (json.loads((a / "config.json").read_text())["per_layer_config"])
    )


@pytest.mark.parametrize("tied", ["tied", "untied"])
def test_convert_text_only(models, tied, tmp_path):
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    out = tmp_path / "text"
    assert main(["convert", str(models[f"mm-{tied}0"]), str(out), "--text-only"]) == 0
    text, info = AutoModelForCausalLM.from_pretrained(
        out, dtype=torch.float32, output_loading_info=True
    )
    assert type(text).__name__ == "Gemma4ForCausalLM"
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    assert text.config.tie_word_embeddings == (tied == "tied")
    mm = AutoModelForImageTextToText.from_pretrained(models[f"mm-{tied}0"], dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(text(IDS).logits, mm(input_ids=IDS).logits, atol=0, rtol=0)


@pytest.mark.parametrize("tied", ["tied", "untied"])
def test_multimodal_linear_merge(models, tied, tmp_path):
    from transformers import AutoModelForImageTextToText

    a, b = models[f"mm-{tied}0"], models[f"mm-{tied}1"]
    out = tmp_path / "out"
    assert main(["merge", str(_linear_recipe(tmp_path, a, b)), str(out)]) == 0
    merged, info = AutoModelForImageTextToText.from_pretrained(
        out, dtype=torch.float32, output_loading_info=True
    )
    assert type(merged).__name__ == "Gemma4ForConditionalGeneration"
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    ref = AutoModelForImageTextToText.from_pretrained(a, dtype=torch.float32)
    lm = ("model.language_model.", "lm_head.")
    _hand_mix(
        ref,
        AutoModelForImageTextToText.from_pretrained(b, dtype=torch.float32),
        keep=lambda k: k.startswith(lm),
    )
    with torch.no_grad():
        want, got = ref(input_ids=IDS).logits, merged(input_ids=IDS).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    base, written = _stored(a), _stored(out)
    assert set(written) == set(base)
    for name, tensor in base.items():  # the towers and embedders are the base's, as stored
        if not name.startswith(lm):
            assert torch.equal(written[name], tensor), name
    cfg_in, cfg_out = (json.loads((p / "config.json").read_text()) for p in (a, out))
    assert cfg_out["text_config"] == cfg_in["text_config"]
    assert cfg_out["vision_config"] == cfg_in["vision_config"]
    assert cfg_out["audio_config"] == cfg_in["audio_config"]


# ---- refusals ---------------------------------------------------------------------------------
LAYER_MAP_WHY = "per-layer input embeddings keep one block per layer"


@pytest.mark.parametrize(
    ("model", "argv"),
    [
        ("ple0", ["upscale", "--duplicate", "1:3"]),
        ("ple0", ["upscale", "--expand", "1"]),  # layer_scalar: a zeroed copy is no identity
        ("moe0", ["prune", "--drop", "2"]),  # no PLE, but per_layer_config by layer index
        ("mm-tied0", ["prune", "--drop", "2"]),
    ],
    ids=["upscale-duplicate", "upscale-expand", "prune-moe", "prune-multimodal"],
)
def test_layer_maps_refuse_in_one_line(models, model, argv, tmp_path, capsys):
    out = tmp_path / "out"
    verb, *options = argv
    _refused(capsys, [verb, str(models[model]), str(out), *options], out, verb, LAYER_MAP_WHY)


def test_a_passthrough_that_moves_layers_refuses(models, tmp_path, capsys):
    """Layers 0-1 twice, then the shared layers 4-5: as many layers as the source, every
    shape as the config says, so nothing but the refusal stops a wrong model (the per-layer
    embedding blocks of output layers 2-3 would stay those of source layers 2-3)."""
    a = models["ple0"]
    recipe = tmp_path / "passthrough.yaml"
    recipe.write_text(
        "merge_method: passthrough\nslices:\n"
        + "".join(
            f"  - sources: [{{model: {a}, layer_range: [{s}, {e}]}}]\n"
            for s, e in ((0, 2), (0, 2), (4, 6))
        )
        + "dtype: float32\n"
    )
    out = tmp_path / "out"
    _refused(capsys, ["merge", str(recipe), str(out)], out, LAYER_MAP_WHY)


@pytest.mark.parametrize("model", ["ple0", "mm-untied0"])
def test_slice_refuses_in_one_line(models, model, tmp_path, capsys):
    text = tmp_path / "calib.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    out = tmp_path / "out"
    argv = ["slice", str(models[model]), str(out), "--sparsity", "0.25"]
    _refused(capsys, [*argv, "--calibration", str(text)], out, "'gemma4_text'", "post-norm")


def test_collapse_refuses_in_one_line(models, tmp_path, capsys):
    out = tmp_path / "out"
    why = "its experts run beside an always-on dense MLP"
    _refused(capsys, ["collapse", str(models["moe0"]), str(out)], out, "'gemma4_text'", why)


# ---- another vocabulary -----------------------------------------------------------------------
def _tokenizer(folder: Path, shuffle: int | None, words: int = 92) -> None:
    """A word-level tokenizer (4 specials, then ``w0 w1 ...``; the words shuffled by seed
    ``shuffle``) saved to ``folder``."""
    import random

    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = [f"w{i}" for i in range(words)]
    if shuffle is not None:
        random.Random(shuffle).shuffle(vocab)
    vocab = ["<pad>", "<s>", "</s>", "<unk>", *vocab]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
    ).save_pretrained(folder)


WORDS = ["w1", "w5", "w17", "w33", "w60", "w7", "w9", "w11", "w80", "w3"]


def _ids(folder: Path, words: list[str]) -> torch.Tensor:
    from transformers import AutoTokenizer

    return torch.tensor([AutoTokenizer.from_pretrained(folder).convert_tokens_to_ids(words)])


def test_tokensurgeon_keeps_the_shared_tokens_or_refuses(models, tmp_path, capsys):
    """A donor vocabulary of 120 shuffled words: the per-layer embedding table is token-indexed
    too, so it must follow the embedding (and ``vocab_size_per_layer_input`` the vocabulary);
    until the core sets that field the load check refuses the output in one line."""
    import shutil

    from transformers import AutoModelForCausalLM

    model, donor = tmp_path / "model", tmp_path / "donor"
    shutil.copytree(models["ple0"], model)
    _tokenizer(model, None)
    build_text(donor, "ple")
    _tokenizer(donor, 0, words=116)
    cfg = json.loads((donor / "config.json").read_text())
    assert cfg["vocab_size"] == 96  # its weights are never read: only its tokenizer is
    out = tmp_path / "out"
    capsys.readouterr()
    code = main(["tokensurgeon", str(model), str(donor), str(out), "--method", "zero"])
    if code == 2:
        err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("splice: error")]
        assert len(err) == 1 and "embed_tokens_per_layer" in err[0], err
        assert not out.exists()
        return
    assert code == 0
    src = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    got = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    shared = [f"w{i}" for i in range(92)]
    with torch.no_grad():
        want = src(_ids(model, WORDS)).logits[0][:, _ids(model, shared)[0]]
        have = got(_ids(out, WORDS)).logits[0][:, _ids(out, shared)[0]]
    torch.testing.assert_close(have, want, atol=1e-5, rtol=0)


def test_a_union_vocabulary_merge_reindexes_the_per_layer_table_or_refuses(
    models, tmp_path, capsys
):
    """Two seeds whose tokenizers order the same words differently, merged with
    ``tokenizer_source: union``: every token-indexed table of the second (the embedding and the
    per-layer embedding) is mixed by token, not by id."""
    import shutil

    from transformers import AutoModelForCausalLM, AutoTokenizer

    a, b = tmp_path / "a", tmp_path / "b"
    shutil.copytree(models["ple0"], a)
    shutil.copytree(models["ple1"], b)
    _tokenizer(a, None)
    _tokenizer(b, 1)
    recipe = tmp_path / "union.yaml"
    recipe.write_text(
        f"merge_method: linear\nbase_model: {a}\nmodels:\n"
        f"  - model: {a}\n    parameters: {{weight: 0.3}}\n"
        f"  - model: {b}\n    parameters: {{weight: 0.7}}\n"
        "tokenizer_source: union\ndtype: float32\n"
    )
    out = tmp_path / "out"
    capsys.readouterr()
    code = main(["merge", str(recipe), str(out)])
    if code == 2:
        err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("splice: error")]
        assert len(err) == 1 and "per-layer input embeddings" in err[0], err
        assert not out.exists()
        return
    assert code == 0
    ref = AutoModelForCausalLM.from_pretrained(a, dtype=torch.float32)
    other = AutoModelForCausalLM.from_pretrained(b, dtype=torch.float32)
    written = AutoTokenizer.from_pretrained(out)
    tokens = [written.convert_ids_to_tokens(i) for i in range(96)]
    for folder, model in ((a, ref), (b, other)):  # both in the output's token order
        order = torch.tensor(AutoTokenizer.from_pretrained(folder).convert_tokens_to_ids(tokens))
        with torch.no_grad():
            for table in (model.model.embed_tokens, model.model.embed_tokens_per_layer):
                table.weight.copy_(table.weight[order])
    _hand_mix(ref, other)
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    with torch.no_grad():
        ids = _ids(out, WORDS)
        torch.testing.assert_close(merged(ids).logits, ref(ids).logits, atol=1e-5, rtol=0)
