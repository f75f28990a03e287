"""The zoo's held-out text and its shipped halves: ``text/heldout_en.txt`` and
``text/heldout_zeta.txt`` are the English and Zeta documents of ``text/heldout.txt``, joined as
the zoo trains (they tokenize to the training stream ``<bos> doc <eos> <bos> doc ...``), the
build regenerates all three bit for bit from the zoo's seed, and ``--ppl zoo`` scores the
English half: the README's 3.471 for the base (windows of 64, stride 32)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from splice.cli import main
from splice.errors import SpliceError
from splice.scoring import HELDOUT_NAMES, read_text, text_ids
from splice.zoo.build import (
    HELDOUT,
    HELDOUT_FILES,
    _not_a_zoo,
    heldout_documents,
    heldout_halves,
    heldout_text_path,
    join_documents,
    read_heldout,
)


def test_the_build_regenerates_the_shipped_files(zoo):
    """The committed files are what a build of the zoo's seed writes (corpus.heldout_text)."""
    from splice.zoo.corpus import heldout_text
    from splice.zoo.world import make_world

    seed = json.loads((zoo / "zoo.json").read_text())["settings"]["seed"]
    whole = heldout_text(make_world(seed), seed)
    assert (zoo / HELDOUT).read_text() == whole
    halves = heldout_halves(whole)
    assert set(halves) == {"en", "zeta"}
    for lang, text in halves.items():
        assert (zoo / HELDOUT_FILES[lang]).read_text() == text
        assert heldout_text_path(zoo, lang) == zoo / HELDOUT_FILES[lang]


def test_halves_are_the_documents_of_each_language(zoo):
    lines = (zoo / HELDOUT).read_text().splitlines()
    assert len(lines) == 400
    for lang, docs in (("en", lines[0::2]), ("zeta", lines[1::2])):
        text = (zoo / HELDOUT_FILES[lang]).read_text()
        assert text.endswith("\n") and "\n" not in text[:-1]
        assert text[:-1].split("<eos><bos>") == docs == heldout_documents(zoo, lang)
    # the halves are disjoint in vocabulary: English never shows a Zeta word
    en = set(lines[0].split()) | set(lines[2].split())
    assert not en & set(lines[1].split()) - {".", "?", ":"}


def test_the_english_half_tokenizes_as_the_zoo_trains(zoo):
    """BOS + the file's tokens are the training stream of its documents (train.token_stream,
    ``<bos> doc <eos>`` each) up to the last document's last token, which the final newline
    joins into one unknown token (the zoo's tokenizer splits words on spaces only)."""
    from tokenizers import Tokenizer

    from splice.modeling import load_tokenizer
    from splice.zoo.train import token_stream

    docs = heldout_documents(zoo, "en")
    ids = text_ids(load_tokenizer(zoo / "base"), read_heldout(zoo, "en"))
    stream = token_stream(Tokenizer.from_file(str(zoo / "base" / "tokenizer.json")), docs)
    assert len(ids) == len(stream) - 1
    assert torch.equal(ids[:-1], stream[:-2])


def test_ppl_names_read_the_heldout_text(zoo):
    for name, lang in HELDOUT_NAMES.items():
        assert read_text(name, zoo=zoo) == read_heldout(zoo, lang)
    assert read_text("zoo") == (zoo / HELDOUT_FILES["en"]).read_text()
    assert read_text("zoo:zeta") == (zoo / HELDOUT_FILES["zeta"]).read_text()
    assert read_text("zoo:both") == join_documents(heldout_documents(zoo, "both"))
    # --calibration keeps reading the names as fresh calibration text
    from splice.calib import calibration_text

    assert read_text("zoo", option="--calibration") == calibration_text("zoo")
    assert read_text("zoo", option="--calibration") != read_text("zoo")


def test_an_older_zoo_without_the_halves_reads_the_same_text(zoo, tmp_path):
    (tmp_path / "text").mkdir()
    shutil.copyfile(zoo / HELDOUT, tmp_path / HELDOUT)
    for lang in ("en", "zeta", "both"):
        assert read_heldout(tmp_path, lang) == read_heldout(zoo, lang)
    with pytest.raises(SpliceError, match=r"heldout_en\.txt: missing"):
        heldout_text_path(tmp_path, "en")
    with pytest.raises(SpliceError, match=r"heldout\.txt: missing"):
        read_heldout(tmp_path / "nowhere", "en")
    with pytest.raises(SpliceError, match="expected en, zeta or both"):
        read_heldout(zoo, "fr")


def test_a_zoo_with_the_new_files_may_still_be_rebuilt(zoo):
    """``splice zoo build --force`` replaces only a folder that holds a zoo and nothing else:
    the halves and the task loader are part of one."""
    assert (zoo / "tasks" / "zoo_data.py").is_file()
    assert _not_a_zoo(zoo) is None


def test_ppl_zoo_is_the_readmes_number(zoo, capsys):
    """The README's base perplexity (3.471: windows of 64, the zoo's training length, stride
    32) from the shipped file and from ``--ppl zoo``; the whole text, half Zeta, which the base
    never saw, is far worse."""
    base = str(zoo / "base")
    args = ["eval", base, "--seq-len", "64", "--device", "cpu", "--json"]
    ppl = {}
    for text in ("zoo", str(zoo / HELDOUT_FILES["en"]), "zoo:both"):
        assert main([*args, "--ppl", text]) == 0
        ppl[text] = json.loads(capsys.readouterr().out)[base]["ppl"]
    assert round(ppl["zoo"], 3) == 3.471
    assert ppl[str(zoo / HELDOUT_FILES["en"])] == ppl["zoo"]
    assert ppl["zoo:both"] > 100 * ppl["zoo"]
