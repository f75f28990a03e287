"""``splice tokensurgeon``: the zoo's base given a second tokenizer (issue 27, item 3).

The second tokenizer is a BPE trained here with ``tokenizers`` over the zoo's texts
(``assets/zoo/text/*.txt``): it shares whole words (``▁the``, ``▁soda``) and the special tokens
with the zoo's word-level tokenizer, and has sub-words and runs of words the zoo's lacks; its
special tokens
are spelled ``<s>`` / ``</s>`` where the zoo's are ``<bos>`` / ``<eos>`` (one token by role).
The donors are random Llamas of another width with that tokenizer.

Checked: shared tokens keep the source's rows bit for bit and every other tensor is a copy; the
output loads and generates; a tied model stays tied; each method's rows against
mergekit-tokensurgeon's on the same inputs; the refusals (one line, exit 2, nothing written).
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
from conftest import make_tiny
from safetensors.torch import load_file, save_file

from splice.cli import main
from splice.merge.tokensurgeon import (
    METHODS,
    nearest,
    omp,
    token_keys,
    token_text,
    tokensurgeon,
)

ROOT = Path(__file__).resolve().parents[1]
ZOO_BASE = ROOT / "assets" / "zoo" / "base"
TEXTS = sorted((ROOT / "assets" / "zoo" / "text").glob("*.txt"))
SPECIALS = {"pad": "<pad>", "bos": "<s>", "eos": "</s>", "unk": "<unk>"}
ZOO_SPECIALS = {"pad": "<pad>", "bos": "<bos>", "eos": "<eos>", "unk": "<unk>"}
K = 8  # omp / common_interpolation neighbours (the donors share ~80 tokens with the zoo)

needs_mergekit = pytest.mark.skipif(
    importlib.util.find_spec("mergekit") is None, reason="mergekit is not installed"
)


# ---- inputs --------------------------------------------------------------------------------------
def train_bpe(folder: Path, vocab_size: int = 400) -> Path:
    """A BPE tokenizer trained over the zoo's texts, one document at a time (the files join
    documents with ``<eos><bos>``). Words start with ``▁`` as the zoo's do, and a token may span
    up to three words (``▁is▁very▁big``), which the zoo's tokenizer splits into several."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    docs = [
        doc
        for path in TEXTS
        for line in path.read_text().splitlines()
        for doc in line.split("<eos><bos>")
        if doc.strip()
    ]
    tok = Tokenizer(models.BPE(unk_token=SPECIALS["unk"]))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=False),
            pre_tokenizers.Split(Regex("▁[^▁]+(?:▁[^▁]+){0,2}"), behavior="isolated"),
        ]
    )
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always", split=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIALS.values()),
        initial_alphabet=list("0123456789"),
        show_progress=False,
    )
    tok.train_from_iterator(docs, trainer)
    bos = SPECIALS["bos"]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, tok.token_to_id(bos))]
    )
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 128}
    config.update({f"{role}_token": t for role, t in SPECIALS.items()})
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def with_tokenizer(model: Path, tokenizer: Path) -> Path:
    """``model`` with its tokenizer files replaced by those of ``tokenizer``."""
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (model / f).unlink(missing_ok=True)
        if (tokenizer / f).is_file():
            shutil.copy(tokenizer / f, model / f)
    return model


def vocab_of(folder: Path) -> dict[str, int]:
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(folder / "tokenizer.json")).get_vocab(True)


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def shared_pairs(donor: Path, model: Path = ZOO_BASE) -> list[tuple[int, int]]:
    """(donor id, model id) of the tokens both have, worked out here by hand: equal strings,
    and the special tokens of one role."""
    d, m = vocab_of(donor), vocab_of(model)
    pairs = [(i, m[t]) for t, i in d.items() if t in m]
    roles = [
        (d[SPECIALS[r]], m[ZOO_SPECIALS[r]]) for r in SPECIALS if SPECIALS[r] != ZOO_SPECIALS[r]
    ]
    return sorted(pairs + roles)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    """The zoo's base (bf16) and a float32 copy, a tied model, and two donors (untied, tied)."""
    root = tmp_path_factory.mktemp("tokensurgeon")
    tok = train_bpe(root / "bpe")
    n = len(vocab_of(tok))
    donor = make_tiny(root / "donor", layers=2, hidden=64, vocab=n, seed=1, pad_token_id=0)
    tied_donor = make_tiny(
        root / "tied_donor", layers=2, hidden=48, vocab=n, seed=2, tie_word_embeddings=True
    )
    tied = make_tiny(
        root / "tied", layers=2, hidden=32, vocab=380, seed=3, tie_word_embeddings=True
    )
    base32 = root / "base32"
    assert main(["convert", str(ZOO_BASE), str(base32), "--dtype", "float32", "--no-progress"]) in (
        0,
        None,
    )
    return {
        "bpe": tok,
        "donor": with_tokenizer(donor, tok),
        "tied_donor": with_tokenizer(tied_donor, tok),
        "tied": with_tokenizer(tied, ZOO_BASE),
        "base": ZOO_BASE,
        "base32": base32,
    }


def transplant(inputs, out: Path, method: str, model: str = "base", donor: str = "donor") -> Path:
    result = tokensurgeon(inputs[model], inputs[donor], out, method=method, k=K)
    assert result.out == out
    return out


# ---- exact rows, copies, config, tokenizer -------------------------------------------------------
@pytest.mark.parametrize("method", ["omp", "subword"])
def test_shared_tokens_keep_their_rows_and_the_rest_is_copied(inputs, tmp_path, method):
    out = transplant(inputs, tmp_path / "out", method)
    ours, src = tensors(out), tensors(ZOO_BASE)
    pairs = shared_pairs(inputs["bpe"])
    assert len(pairs) > 60  # words, digits, specials
    n = len(vocab_of(inputs["bpe"]))
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        assert ours[name].shape == (n, 96) and ours[name].dtype == torch.bfloat16
        d, m = map(list, zip(*pairs, strict=True))
        assert torch.equal(ours[name][d], src[name][m]), name
        new = sorted(set(range(n)) - set(d))
        assert ours[name][new].abs().sum(1).gt(0).all()  # every new token got a row
    for name, t in src.items():
        if name not in ("model.embed_tokens.weight", "lm_head.weight"):
            assert torch.equal(ours[name], t), name
    config = json.loads((out / "config.json").read_text())
    assert config["vocab_size"] == n and config["tie_word_embeddings"] is False
    donor_config = json.loads((inputs["donor"] / "config.json").read_text())
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        assert config[key] == donor_config[key]
    for f in ("tokenizer.json", "tokenizer_config.json"):
        assert (out / f).read_bytes() == (inputs["bpe"] / f).read_bytes()


def test_output_loads_and_generates(inputs, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = transplant(inputs, tmp_path / "out", "omp")
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok("the cat is red . question : what colour is the cat ?", return_tensors="pt")
    assert ids["input_ids"][0, 0].item() == tok.bos_token_id == tok.convert_tokens_to_ids("<s>")
    gen = model.generate(**ids, max_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id)
    new = gen[0, ids["input_ids"].shape[1] :]
    assert len(new) == 5 and int(new.max()) < model.config.vocab_size
    assert isinstance(tok.decode(new), str)


def test_a_text_of_shared_tokens_gets_the_same_logits(inputs, tmp_path):
    """Identity: on a sequence of shared tokens the output computes what the source does, so
    its logits for the shared tokens are the source's (the new rows only add columns)."""
    from transformers import AutoModelForCausalLM

    out = transplant(inputs, tmp_path / "out", "omp")
    pairs = shared_pairs(inputs["bpe"])
    g = torch.Generator().manual_seed(0)
    pick = torch.randint(0, len(pairs), (2, 24), generator=g)
    d = torch.tensor([p[0] for p in pairs])
    m = torch.tensor([p[1] for p in pairs])
    ours = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    src = AutoModelForCausalLM.from_pretrained(ZOO_BASE, dtype=torch.float32)
    with torch.no_grad():
        a = ours(input_ids=d[pick]).logits[..., d]
        b = src(input_ids=m[pick]).logits[..., m]
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_a_tied_model_stays_tied(inputs, tmp_path):
    out = transplant(inputs, tmp_path / "out", "omp", model="tied")
    ours, src = tensors(out), tensors(inputs["tied"])
    assert "lm_head.weight" not in ours
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True
    d, m = map(list, zip(*shared_pairs(inputs["bpe"], inputs["tied"]), strict=True))
    name = "model.embed_tokens.weight"
    assert torch.equal(ours[name][d], src[name][m])
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert model.generate(torch.tensor([[1, 50, 60]]), max_new_tokens=3, do_sample=False).shape == (
        1,
        6,
    )


# ---- the methods' arithmetic ---------------------------------------------------------------------
def test_omp_finds_a_sparse_combination_and_projects_orthogonally():
    g = torch.Generator().manual_seed(0)
    atoms = torch.randn(40, 16, generator=g, dtype=torch.float64)
    target = (2.0 * atoms[3] - 0.5 * atoms[27]).unsqueeze(0)
    index, coef = omp(target, atoms, 2)
    assert sorted(index[0].tolist()) == [3, 27]
    got = dict(zip(index[0].tolist(), coef[0].tolist(), strict=True))
    assert got[3] == pytest.approx(2.0, abs=1e-12) and got[27] == pytest.approx(-0.5, abs=1e-12)
    # any target: the coefficients are the least-squares fit on the picked atoms
    targets = torch.randn(5, 16, generator=g, dtype=torch.float64)
    index, coef = omp(targets, atoms, 6)
    for b in range(5):
        assert len(set(index[b].tolist())) == 6
        best = torch.linalg.lstsq(atoms[index[b]].T, targets[b]).solution
        assert torch.allclose(coef[b], best, atol=1e-10)


def test_nearest_weights_the_k_nearest_by_inverse_distance():
    g = torch.Generator().manual_seed(1)
    atoms = torch.randn(30, 8, generator=g, dtype=torch.float64)
    targets = torch.randn(4, 8, generator=g, dtype=torch.float64)
    index, weight = nearest(targets, atoms, 5)
    for b in range(4):
        dist = (atoms - targets[b]).norm(dim=1)
        assert set(index[b].tolist()) == set(dist.argsort()[:5].tolist())
        inv = 1 / dist[index[b]]
        assert torch.allclose(weight[b], inv / inv.sum())


def test_tokens_compare_by_role_and_word_marker(tmp_path):
    """``▁the`` (SentencePiece) and ``Ġthe`` (byte-level BPE) are one token, as are the
    special tokens of a role whatever their strings; other tokens compare as strings."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    meta = {"pre_tokenizer": {"type": "Metaspace", "replacement": "▁"}}
    byte = {"pre_tokenizer": {"type": "ByteLevel"}}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": {"content": "<s>"}}))
    a = token_keys({"<s>": 0, "▁the": 1, "the": 2, "▁": 3}, tmp_path, meta)
    b = token_keys({"<|bos|>": 5, "Ġthe": 6, "the": 7}, ZOO_BASE, byte)
    assert a == {("special", "bos"): 0, ("word", "the"): 1, "the": 2, "▁": 3}
    assert b == {"<|bos|>": 5, ("word", "the"): 6, "the": 7}
    assert token_keys({"<bos>": 1}, ZOO_BASE, {}) == {("special", "bos"): 1}
    # the text of a token, as its decoder writes it inside a text
    bpe = Tokenizer(models.BPE())
    bpe.decoder = decoders.ByteLevel()
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel()
    assert token_text(bpe, "Ġthe") == " the" and token_text(bpe, "Ã©") == "é"
    zoo = Tokenizer.from_file(str(ZOO_BASE / "tokenizer.json"))
    assert token_text(zoo, "▁the") == " the" and token_text(zoo, "he") == "he"


def test_methods_are_registered():
    assert METHODS.names() == sorted(["omp", "common_interpolation", "subword", "mean", "zero"])


# ---- against mergekit-tokensurgeon ---------------------------------------------------------------
#: every mergekit run: name -> (model, donor, method); all in one process (its import takes
#: seconds), through the same click command as .venv/bin/mergekit-tokensurgeon
JOBS = {
    **{f"{m}-bf16": ("base", "donor", m) for m in METHODS.names()},
    **{f"{m}-f32": ("base32", "donor", m) for m in METHODS.names()},
    "omp-tied-model": ("tied", "donor", "omp"),
    "omp-tied-donor": ("base32", "tied_donor", "omp"),
}
MERGEKIT_DRIVER = """
import json, sys
from mergekit.scripts.tokensurgeon import main
for args in json.loads(sys.argv[1]):
    main.main(args, standalone_mode=False)
"""


@pytest.fixture(scope="module")
def mergekit_outputs(inputs, tmp_path_factory) -> dict[str, Path]:
    if importlib.util.find_spec("mergekit") is None:
        pytest.skip("mergekit is not installed")
    root = tmp_path_factory.mktemp("mergekit_tokensurgeon")
    runs = []
    for name, (model, donor, method) in JOBS.items():
        # mergekit's defaults otherwise: no prefix or byte matches, no magikarp, batch 512
        args = [str(inputs[model]), str(inputs[donor]), str(root / name), "-a", method]
        runs.append([*args, "-k", str(K), "--quiet", "--no-copy-tokenizer"])
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(
        [sys.executable, "-c", MERGEKIT_DRIVER, json.dumps(runs)],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return {name: root / name for name in JOBS}


def bf16_step(x: torch.Tensor) -> torch.Tensor:
    """One bf16 rounding step (ulp) at each entry's magnitude."""
    x = x.float().abs().clamp(min=torch.finfo(torch.bfloat16).tiny)
    return torch.exp2(torch.floor(torch.log2(x)) - 7)


@pytest.mark.slow
@needs_mergekit
@pytest.mark.parametrize("name", list(JOBS))
def test_rows_match_mergekit_tokensurgeon(name, inputs, mergekit_outputs, tmp_path):
    model, donor, method = JOBS[name]
    out = tokensurgeon(inputs[model], inputs[donor], tmp_path / "out", method=method, k=K).out
    ours, theirs = tensors(out), tensors(mergekit_outputs[name])
    assert sorted(ours) == sorted(theirs)
    ours_cfg = json.loads((out / "config.json").read_text())
    theirs_cfg = json.loads((mergekit_outputs[name] / "config.json").read_text())
    for key in (
        "vocab_size",
        "bos_token_id",
        "eos_token_id",
        "pad_token_id",
        "tie_word_embeddings",
    ):
        assert ours_cfg.get(key) == theirs_cfg.get(key), key
    for t in ours:
        assert ours[t].dtype == theirs[t].dtype and ours[t].shape == theirs[t].shape, t
        if name != "subword-bf16" or t not in ("model.embed_tokens.weight", "lm_head.weight"):
            assert torch.equal(ours[t], theirs[t]), t
            continue
        # mergekit's subword sums the pieces' rows into a bf16 row, rounding after each
        # addition, and divides the rounded sum; splice sums in float32 and rounds the mean
        # once. The float32 runs (subword-f32) agree bit for bit; here a row of one or two
        # pieces agrees bit for bit too (x / 2 is exact) and a longer one within one step of
        # its sum's magnitude per extra piece.
        from splice.checkpoint import open_checkpoint
        from splice.merge.tokensurgeon import map_tokens

        tm = map_tokens(open_checkpoint(inputs[model]), open_checkpoint(inputs[donor]), pieces=True)
        for j, row in enumerate(tm.new):
            n = len(tm.pieces[j])
            diff = (ours[t][row].float() - theirs[t][row].float()).abs()
            if n <= 2:
                assert diff.max() == 0, (t, row)
            else:
                total = tensors(inputs[model])[t][list(tm.pieces[j])].float().abs().sum(0)
                assert (diff <= (n - 1) * bf16_step(total)).all(), (t, row)


# ---- refusals ------------------------------------------------------------------------------------
def refused(capsys, argv: list, needle: str, out: Path) -> None:
    """``splice tokensurgeon`` exits 2 with one line naming ``needle``; nothing is written."""
    before = sorted(p.name for p in out.parent.iterdir())
    rc = main(["tokensurgeon", *map(str, argv), str(out), "--no-progress"])
    _, err = capsys.readouterr()
    assert rc == 2, err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert needle in err, (needle, err)
    assert not out.exists()
    assert sorted(p.name for p in out.parent.iterdir()) == before


def test_refusals_are_one_line_and_write_nothing(inputs, tmp_path, capsys):
    no_tok = tmp_path / "no_tokenizer"
    shutil.copytree(inputs["donor"], no_tok)
    (no_tok / "tokenizer.json").unlink()
    no_embed = tmp_path / "no_embedding"
    shutil.copytree(inputs["tied"], no_embed)
    weights = load_file(no_embed / "model.safetensors")
    del weights["model.embed_tokens.weight"]
    save_file(weights, no_embed / "model.safetensors", metadata={"format": "pt"})
    base, donor = inputs["base"], inputs["donor"]
    out = tmp_path / "out"
    refused(capsys, [base, no_tok], "no tokenizer.json", out)
    refused(capsys, [no_tok, donor], "no tokenizer.json", out)
    refused(capsys, [no_embed, donor], "no embedding tensor", out)
    refused(capsys, [base, no_embed, "--method", "omp"], "no embedding tensor", out)
    refused(capsys, [base, donor, "-k", "0"], "k must be a whole number of 1 or more", out)
    refused(capsys, [base, donor, "-k", "1000"], "share", out)
    refused(capsys, [base, donor, "--method", "nearest"], "invalid choice", out)
    refused(capsys, [base, tmp_path / "nowhere"], "no such folder", out)
    # a method that does not read the donor's weights takes a donor without an embedding
    assert main(["tokensurgeon", str(base), str(no_embed), str(out), "--method", "mean"]) in (
        0,
        None,
    )
    assert (out / "model.safetensors").is_file()
