"""The zoo: tokenizer, models, tasks, determinism, CLI, and the acceptance numbers.

The shared zoo (``splice.zoo.default_dir()``: the committed ``assets/zoo`` of a checkout) is
built once if it is missing or stale; the determinism test builds two tiny zoos of its own.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from splice.errors import SpliceError
from splice.zoo import corpus
from splice.zoo.build import MODELS, Settings, build, is_built, read_stamp
from splice.zoo.world import make_world

TINY = 0.01  # steps scale of the throw-away builds


@pytest.fixture(scope="session")
def tiny_zoos(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("zoo")
    return (
        build(root / "a", steps_scale=TINY, show_progress=False),
        build(root / "b", steps_scale=TINY, show_progress=False),
    )


# ---- tokenizer ----------------------------------------------------------------------------------
def test_tokenizer_round_trip(zoo: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(zoo / "base")
    world = make_world(0)
    import random

    rng = random.Random(1)
    texts = [corpus.pretraining_document(world, rng) for _ in range(200)]
    texts += [
        it.prompt + " " + it.choices[it.gold].strip() for it in corpus.math_items(world, 0, True)
    ]
    for text in texts:
        ids = tok(text).input_ids
        assert ids[0] == tok.bos_token_id
        assert tok.unk_token_id not in ids, text
        assert tok.decode(ids, skip_special_tokens=True) == text
    assert tok.convert_ids_to_tokens(tok(" 407").input_ids) == ["<bos>", "▁", "4", "0", "7"]
    assert {tok.pad_token, tok.bos_token, tok.eos_token} == {"<pad>", "<bos>", "<eos>"}
    assert len({tok.pad_token_id, tok.bos_token_id, tok.eos_token_id}) == 3


# ---- models -------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", MODELS)
def test_models_load_offline(zoo: Path, name: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(zoo / name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(zoo / name)
    cfg = model.config
    assert cfg.num_hidden_layers >= 8
    n = sum(p.numel() for p in model.parameters())
    if name == "moe":
        assert cfg.model_type == "mixtral"
        assert (cfg.num_local_experts, cfg.num_experts_per_tok) == (4, 2)
        experts = model.model.layers[0].mlp.experts.down_proj.detach()  # [E, H, I]
        gaps = [float((experts[e] - experts[0]).norm() / experts[0].norm()) for e in range(1, 4)]
        assert min(gaps) > 0.05, f"experts barely differ: {gaps}"
    else:
        assert cfg.model_type == "llama"
        assert 300_000 <= n <= 2_000_000
    ids = tok("question : what is 12 plus 30 ? answer :", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], cfg.vocab_size)
    assert torch.isfinite(logits).all()


def test_checkpoint_layout(zoo: Path) -> None:
    from splice.checkpoint import open_checkpoint

    moe = open_checkpoint(zoo / "moe")
    assert "model.layers.0.block_sparse_moe.experts.3.w2.weight" in moe.tensors
    assert "lm_head.weight" not in open_checkpoint(zoo / "base").tensors  # tied


# ---- tasks --------------------------------------------------------------------------------------
def test_tasks_load_in_lm_eval(zoo: Path) -> None:
    from lm_eval.tasks import TaskManager

    from splice.zoo.tasks import ALL_TASKS, write_tasks

    manager = TaskManager(include_path=str(write_tasks(zoo / "tasks")), include_defaults=False)
    loaded = manager.load(list(ALL_TASKS))["tasks"]
    assert set(loaded) == set(ALL_TASKS)
    for name, task in loaded.items():
        docs = list(task.test_docs())
        assert len(docs) >= 500, name
        if name.endswith("_gen"):
            assert task.config.output_type == "generate_until"
        else:
            assert task.config.output_type == "multiple_choice"
            assert all(d["choices"][d["gold"]] == d["answer"] for d in docs)


def test_held_out_is_disjoint() -> None:
    world = make_world(0)
    test_pairs = {tuple(sorted(p)) for p in corpus.math_test_pairs(0)}
    assert len(test_pairs) == 500
    assert not test_pairs & {tuple(sorted(p)) for p in corpus.math_train_pairs(0)}
    train_prompts = {e.prompt for e in corpus.math_training_set(world, 0)}
    assert not train_prompts & {it.prompt for it in corpus.math_items(world, 0, zeta=False)}
    assert not set(world.lang_train_nouns) & set(world.lang_test_nouns)
    zeta_test_nouns = {world.zeta[n] for n in world.lang_test_nouns}
    for ex in corpus.lang_training_set(world, 0):
        asked = ex.prompt.split()[-4]  # "... <the> NOUN ? <answer> :"
        assert asked not in zeta_test_nouns
    assert len(corpus.lang_items(world, 0)) >= 500


# ---- build --------------------------------------------------------------------------------------
def test_two_builds_are_identical(tiny_zoos: tuple[Path, Path]) -> None:
    from splice.checkpoint import open_checkpoint

    a, b = tiny_zoos
    for name in MODELS:
        ca, cb = open_checkpoint(a / name), open_checkpoint(b / name)
        assert sorted(ca.tensors) == sorted(cb.tensors)
        for t in ca.tensors:
            assert ca.load(t).equal(cb.load(t)), f"{name}/{t} differs between two builds"
    for f in sorted(p.name for p in (a / "tasks").glob("*.jsonl")):
        assert (a / "tasks" / f).read_bytes() == (b / "tasks" / f).read_bytes()
    assert read_stamp(a)["stamp"] == read_stamp(b)["stamp"]  # type: ignore[index]


def test_build_is_cached(tiny_zoos: tuple[Path, Path]) -> None:
    a, _ = tiny_zoos
    before = (a / "base" / "model.safetensors").stat().st_mtime_ns
    assert is_built(a, Settings().scaled(TINY))
    assert build(a, steps_scale=TINY, show_progress=False) == a
    assert (a / "base" / "model.safetensors").stat().st_mtime_ns == before
    assert not is_built(a)  # a full-size build has another stamp


def test_build_refuses_a_foreign_folder(tmp_path: Path) -> None:
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "keep.txt").write_text("mine")
    with pytest.raises(SpliceError, match="not a zoo"):
        build(tmp_path / "x", steps_scale=TINY, show_progress=False)
    assert (tmp_path / "x" / "keep.txt").read_text() == "mine"


# ---- evaluation ---------------------------------------------------------------------------------
def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "splice.cli", *args], capture_output=True, text=True, check=False
    )


def test_cli_eval_json(zoo: Path) -> None:
    r = _cli(
        "zoo",
        "eval",
        str(zoo / "lang"),
        "--zoo",
        str(zoo),
        "--tasks",
        "zoo_lang,zoo_lang_gen",
        "--limit",
        "40",
        "--json",
        "--no-progress",
    )
    assert r.returncode == 0, r.stderr
    scores = json.loads(r.stdout)
    assert set(scores) == {str(zoo / "lang")}
    row = scores[str(zoo / "lang")]
    assert set(row) == {"zoo_lang", "zoo_lang_gen"}
    assert row["zoo_lang"] > 0.5 and row["zoo_lang_gen"] > 0.5


def test_cli_eval_bad_input(zoo: Path, tmp_path: Path) -> None:
    r = _cli("zoo", "eval", str(tmp_path / "nope"), "--zoo", str(zoo))
    assert r.returncode == 2 and "not a model folder" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    r = _cli("zoo", "eval", str(zoo / "base"), "--zoo", str(zoo), "--tasks", "zoo_chess")
    assert r.returncode == 2 and "unknown zoo task zoo_chess" in r.stderr


def test_scorer_loads_tasks_once_and_scores_live_models(zoo: Path) -> None:
    from splice.zoo import Scorer, evaluate, throughput
    from splice.zoo.evaluate import load_model

    lang = load_model(zoo / "lang")
    with Scorer(["zoo_lang", "zoo_math"], zoo=zoo) as scorer:
        first = scorer.score(lang, limit=40)
        assert scorer.score(lang, limit=40, batch_size=7) == first  # reusable, batch-independent
    assert first == evaluate({"lang": lang}, ["zoo_lang", "zoo_math"], zoo=zoo, limit=40,
                             show_progress=False)["lang"]  # fmt: skip
    (row,) = throughput(lang, "zoo_lang", batch_sizes=(64,), repeat=1, zoo=zoo)
    assert row["requests"] == 4 * 512 and row["requests_per_s"] > 0
    with pytest.raises(SpliceError, match="multiple-choice"):
        throughput(lang, "zoo_lang_gen", zoo=zoo)


@pytest.mark.slow
def test_acceptance(zoo: Path) -> None:
    """The zoo's reason to exist, on the held-out tests (>= 500 items each)."""
    from splice.merge import merge_into
    from splice.zoo import evaluate
    from splice.zoo.evaluate import load_model

    models = {n: zoo / n for n in ("base", "math", "lang")}
    ta = load_model(zoo / "base")
    merge_into(
        ta,
        {
            "merge_method": "task_arithmetic",
            "base_model": str(zoo / "base"),
            "models": [
                {"model": str(zoo / "math"), "parameters": {"weight": 1.0}},
                {"model": str(zoo / "lang"), "parameters": {"weight": 0.8}},
            ],
        },
    )
    models["ta"] = ta  # type: ignore[assignment]
    s = evaluate(models, ["zoo_math", "zoo_lang"], zoo=zoo, show_progress=False)
    assert s["math"]["zoo_math"] >= 0.8 and s["lang"]["zoo_lang"] >= 0.8, s
    assert s["math"]["zoo_lang"] <= 0.5 and s["lang"]["zoo_math"] <= 0.5, s
    assert s["base"]["zoo_math"] <= 0.5 and s["base"]["zoo_lang"] <= 0.5, s
    # task arithmetic carries both skills: 10+ points above the specialist that lacks each one
    assert s["ta"]["zoo_math"] >= s["lang"]["zoo_math"] + 0.10, s
    assert s["ta"]["zoo_lang"] >= s["math"]["zoo_lang"] + 0.10, s


def test_import_is_light() -> None:
    code = "import sys, splice.zoo; print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'lm_eval', 'matplotlib', 'transformers'}))"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert r.stdout.strip() == "[]"
