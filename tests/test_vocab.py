"""Merging models whose vocabularies differ (``tokenizer_source``), against properties:

* a model whose vocabulary is a permutation of the base's (rows permuted to match) merges
  exactly like the unpermuted model;
* tokens only one model has keep that model's rows; the output tokenizer encodes them;
* ``align_rows`` fills missing rows by the rule on hand-built tensors.

mergekit's own output on the same recipes is compared in test_merge_vs_mergekit.py.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_checkpoint import reference_tensors

from splice import SpliceError
from splice.merge import MergeOptions, plan, run
from splice.merge.vocab import PAD, align_rows

OPTS = MergeOptions(show_progress=False)
VOCAB_TENSORS = ("model.embed_tokens.weight", "lm_head.weight")
NEW_TOKENS = ["<|im_start|>", "<|im_end|>"]


def with_tokens(src: Path, dst: Path, tokens: list[str], seed: int) -> Path:
    """``src`` with special tokens appended to its tokenizer and random embedding/head rows."""
    from transformers import AutoTokenizer

    shutil.copytree(src, dst)
    tok = AutoTokenizer.from_pretrained(src)
    tok.add_tokens(tokens, special_tokens=True)
    tok.save_pretrained(dst)
    sd = load_file(dst / "model.safetensors")
    g = torch.Generator().manual_seed(seed)
    for name in VOCAB_TENSORS:
        extra = torch.randn((len(tokens), sd[name].shape[1]), generator=g)
        sd[name] = torch.cat([sd[name], extra])
    save_file(sd, dst / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((dst / "config.json").read_text())
    config["vocab_size"] = len(tok)
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def permuted(src: Path, dst: Path, seed: int) -> Path:
    """``src`` with its ordinary words' ids shuffled and its rows moved with them: the same
    model under another vocabulary order."""
    shutil.copytree(src, dst)
    data = json.loads((src / "tokenizer.json").read_text())
    special = {a["id"] for a in data["added_tokens"]}
    vocab = data["model"]["vocab"]
    ids = sorted(i for i in vocab.values() if i not in special)
    g = torch.Generator().manual_seed(seed)
    shuffled = [ids[k] for k in torch.randperm(len(ids), generator=g).tolist()]
    new_id = dict(zip(ids, shuffled, strict=True))
    data["model"]["vocab"] = {t: new_id.get(i, i) for t, i in vocab.items()}
    (dst / "tokenizer.json").write_text(json.dumps(data))
    sd = load_file(dst / "model.safetensors")
    for name in VOCAB_TENSORS:
        moved = sd[name].clone()
        for old, new in new_id.items():
            moved[new] = sd[name][old]
        sd[name] = moved
    save_file(sd, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


@pytest.fixture(scope="module")
def vocab_models(trio, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("vocab")
    return {
        **trio,
        "ft2_perm": permuted(trio["ft2"], root / "ft2_perm", seed=5),
        "ft1_chat": with_tokens(trio["ft1"], root / "ft1_chat", NEW_TOKENS, seed=6),
        "ft2_chat": with_tokens(trio["ft2"], root / "ft2_chat", NEW_TOKENS, seed=7),
    }


def ties(models: dict[str, Path], a: str, b: str, method: str = "ties", **extra) -> dict:
    return {
        "merge_method": method,
        "base_model": str(models["base"]),
        "models": [
            {"model": str(models[a]), "parameters": {"weight": 0.7, "density": 0.6}},
            {"model": str(models[b]), "parameters": {"weight": 0.5, "density": 0.8}},
        ],
        **extra,
    }


@pytest.mark.parametrize("source", ["base", "union"])
def test_permuted_vocabulary_merges_like_the_original(vocab_models, tmp_path, source):
    want = reference_tensors(run(ties(vocab_models, "ft1", "ft2"), tmp_path / "want", OPTS))
    recipe = ties(vocab_models, "ft1", "ft2_perm", tokenizer_source=source)
    got = reference_tensors(run(recipe, tmp_path / "got", OPTS))
    assert sorted(got) == sorted(want)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=0)


def test_union_keeps_the_rows_of_tokens_one_model_has(vocab_models, tmp_path):
    from transformers import AutoTokenizer

    # task arithmetic is elementwise (TIES's trimming cut would move with the row count)
    recipe = ties(vocab_models, "ft1_chat", "ft2", "task_arithmetic", tokenizer_source="union")
    out = run(recipe, tmp_path / "out", OPTS)
    got, chat = reference_tensors(out), reference_tensors(vocab_models["ft1_chat"])
    plain = ties(vocab_models, "ft1", "ft2", "task_arithmetic")
    plain = reference_tensors(run(plain, tmp_path / "plain", OPTS))
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok.convert_tokens_to_ids(NEW_TOKENS)
    assert ids == [96, 97] and len(tok) == 98
    assert tok("<|im_start|>w5", add_special_tokens=False).input_ids[0] == 96
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 98
    for name in VOCAB_TENSORS:
        assert got[name].shape == (98, 32)
        # every model (the base too) takes ft1_chat's rows for the new tokens: zero deltas
        torch.testing.assert_close(got[name][96:], chat[name][96:], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(got[name][:96], plain[name], rtol=0, atol=0)


def test_a_model_as_tokenizer_source_and_base_dropping_tokens(vocab_models, tmp_path):
    union = reference_tensors(
        run(ties(vocab_models, "ft1_chat", "ft2", tokenizer_source="union"), tmp_path / "u", OPTS)
    )
    source = str(vocab_models["ft1_chat"])
    model = run(
        ties(vocab_models, "ft1_chat", "ft2", tokenizer_source=source), tmp_path / "m", OPTS
    )
    assert (model / "tokenizer.json").read_bytes() == (
        vocab_models["ft1_chat"] / "tokenizer.json"
    ).read_bytes()
    got = reference_tensors(model)
    assert all(torch.equal(got[n], union[n]) for n in union)
    elementwise = {"method": "task_arithmetic", "tokenizer_source": "union"}
    union = reference_tensors(
        run(ties(vocab_models, "ft1_chat", "ft2", **elementwise), tmp_path / "u2", OPTS)
    )
    elementwise["tokenizer_source"] = "base"
    base = reference_tensors(
        run(ties(vocab_models, "ft1_chat", "ft2", **elementwise), tmp_path / "b", OPTS)
    )
    for name in VOCAB_TENSORS:
        assert torch.equal(base[name], union[name][:96])


def test_same_vocabularies_need_no_reindexing(vocab_models):
    p = plan(ties(vocab_models, "ft1", "ft2", tokenizer_source="union"))
    assert p.files == {}
    assert all("re-indexed" not in t.label for t in p.tasks)


def test_layer_path_reindexes_the_embeddings(vocab_models, tmp_path):
    recipe = {
        "merge_method": "passthrough",
        "base_model": str(vocab_models["base"]),
        "tokenizer_source": "union",
        "layer_path": [
            {"model": str(vocab_models["ft1_chat"]), "layer_range": [0, 2]},
            {"model": str(vocab_models["base"]), "layer_range": [2, 4], "scale": 0.5},
        ],
    }
    out = run(recipe, tmp_path / "out", OPTS)
    got, base = reference_tensors(out), reference_tensors(vocab_models["base"])
    for name in VOCAB_TENSORS:  # from the base, which lacks the chat tokens: zero rows
        assert got[name].shape == (98, 32)
        assert torch.equal(got[name][:96], base[name]) and not got[name][96:].any()
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 98
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(out).convert_tokens_to_ids(NEW_TOKENS) == [96, 97]


def test_align_rows_fills_missing_rows_by_the_rule():
    a = torch.tensor([[1.0], [2.0], [3.0]])  # base: tokens x y z
    b = torch.tensor([[10.0], [20.0], [30.0]])  # tokens y u v
    c = torch.tensor([[100.0], [200.0]])  # tokens u w
    # output tokens: x y z u v w t
    rows = [
        (0, 1, 2, -1, -1, -1, -1),
        (-1, 0, -1, 1, 2, -1, -1),
        (-1, -1, -1, 0, -1, 1, -1),
    ]
    got = align_rows([a, b, c], rows, base=0)
    x, y, z = 1.0, 2.0, 3.0  # the base has them: missing rows take the base's
    u = (20.0 + 100.0) / 2  # two non-base models have it: their mean
    v, w, t = 30.0, 200.0, 0.0  # one model has it: its row; none: zero
    assert got[0].flatten().tolist() == [1, 2, 3, u, v, w, t]
    assert got[1].flatten().tolist() == [x, 10, z, 20, 30, w, t]
    assert got[2].flatten().tolist() == [x, y, z, 100, v, 200, t]
    no_base = align_rows([a, b], rows[:2], base=None)
    assert no_base[0].flatten().tolist() == [1, 2, 3, 20, 30, 0, 0]
    assert no_base[1].flatten().tolist() == [1, 10, 3, 20, 30, 0, 0]


def test_models_without_a_tokenizer(vocab_models, tmp_path):
    bare = shutil.copytree(vocab_models["ft2"], tmp_path / "bare")
    (bare / "tokenizer.json").unlink()
    # a model without tokenizer.json is taken to share the donor's vocabulary (as in mergekit)
    models = {**vocab_models, "bare": bare}
    recipe = ties(models, "ft1_chat", "bare", "task_arithmetic", tokenizer_source="union")
    got = reference_tensors(run(recipe, tmp_path / "out", OPTS))
    want = ties(vocab_models, "ft1_chat", "ft2", "task_arithmetic", tokenizer_source="union")
    want = reference_tensors(run(want, tmp_path / "want", OPTS))
    assert all(torch.equal(got[n], want[n]) for n in want)
    # ... but the donor's vocabulary is needed to align by
    recipe = {**ties(models, "ft1_chat", "ft2", tokenizer_source="base"), "base_model": str(bare)}
    with pytest.raises(SpliceError, match=r"bare has no tokenizer.json, which is needed"):
        plan(recipe)
    same_rows = {**ties(models, "ft1", "ft2"), "base_model": str(bare)}
    assert plan({**same_rows, "tokenizer_source": "base"}).files == {}
    with pytest.raises(SpliceError, match=r"bare has no tokenizer.json, which is needed"):
        plan({**same_rows, "tokenizer": {"pad_to_multiple_of": 64}})


def test_padding_rows_are_each_models_mean_row():
    a = torch.tensor([[1.0, 2.0], [3.0, 6.0]])
    b = torch.tensor([[5.0, 0.0], [7.0, 2.0]])
    got = align_rows([a, b], [(0, 1, PAD, PAD), (1, 0, PAD, PAD)], base=None)
    assert got[0].tolist() == [[1, 2], [3, 6], [2, 4], [2, 4]]
    assert got[1].tolist() == [[7, 2], [5, 0], [6, 1], [6, 1]]


def test_pad_to_multiple_of_rounds_the_rows_up(vocab_models):
    p = plan(ties(vocab_models, "ft1", "ft2", tokenizer={"pad_to_multiple_of": 64}))
    assert p.config["vocab_size"] == 128
    embed = next(t for t in p.tasks if t.name == "model.embed_tokens.weight")
    assert embed.shape == (128, 32)


def test_token_sources(vocab_models, tmp_path):
    from transformers import AutoTokenizer

    ft2 = str(vocab_models["ft2"])
    tokens = {
        "<x>": {"source": {"kind": "zero"}, "force": True},
        "w9": {"source": ft2, "force": True},
        "<brand_new>": {"source": {"kind": "model_token", "model": ft2, "token_id": 7}},
    }
    recipe = {
        "merge_method": "linear",
        "models": [
            {"model": str(vocab_models["ft1_chat"]), "parameters": {"weight": 0.3}},
            {"model": ft2, "parameters": {"weight": 0.7}},
        ],
        "tokenizer": {"tokens": tokens},
    }
    out = run(recipe, tmp_path / "out", OPTS)
    got, src = reference_tensors(out), reference_tensors(vocab_models["ft2"])
    tok = AutoTokenizer.from_pretrained(out)
    x, w9, new = tok.convert_tokens_to_ids(["<x>", "w9", "<brand_new>"])
    assert (x, new) == (98, 99) and len(tok) == 100  # after the donor's two chat tokens
    for name in VOCAB_TENSORS:
        assert got[name].shape == (100, 32)
        assert not got[name][x].any()
        torch.testing.assert_close(got[name][w9], src[name][w9], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(got[name][new], src[name][7], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    ("tokens", "message"),
    [
        ({"w9": {"source": "FT1_CHAT"}}, "not among the models merged into"),
        ({"nope": {"source": "FT2"}}, "has no token 'nope'"),
        ({"w9": {"force": True}}, "force needs a source"),
        (
            {"w9": {"source": {"kind": "model_token", "model": "FT2", "token_id": 500}}},
            "token_id 500 is out of range",
        ),
    ],
)
def test_bad_token_sources(vocab_models, tokens, message):
    text = json.dumps(tokens)
    text = text.replace('"FT1_CHAT"', json.dumps(str(vocab_models["ft1_chat"])))
    text = text.replace('"FT2"', json.dumps(str(vocab_models["ft2"])))
    recipe = {
        "merge_method": "passthrough",
        "models": [{"model": str(vocab_models["ft2"])}],
        "tokenizer": {"tokens": json.loads(text)},
    }
    with pytest.raises(SpliceError, match=message):
        plan(recipe)
