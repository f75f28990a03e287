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


def tiny(folder: Path, **kw) -> Path:
    """A tiny-step twin of the zoo: its acceptance check runs, and fails (recorded, not raised)."""
    return build(folder, steps_scale=TINY, acceptance="record", show_progress=False, **kw)


@pytest.fixture(scope="session")
def tiny_zoos(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("zoo")
    return tiny(root / "a"), tiny(root / "b")


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
    assert "lm_head.weight" in open_checkpoint(zoo / "base").tensors  # untied: lang's Zeta rows


# ---- tasks ----------------------------------------------------------------------------------------
def test_tasks_load_in_lm_eval(zoo: Path) -> None:
    from lm_eval.tasks import TaskManager

    from splice.zoo.tasks import ALL_TASKS, FIT_TASKS, write_tasks

    manager = TaskManager(include_path=str(write_tasks(zoo / "tasks")), include_defaults=False)
    loaded = manager.load(list(ALL_TASKS))["tasks"]
    assert set(loaded) == set(ALL_TASKS)
    for name, task in loaded.items():
        docs = list(task.test_docs())
        assert len(docs) >= (200 if name in FIT_TASKS else 500), name
        if name.endswith("_gen"):
            assert task.config.output_type == "generate_until"
        else:
            assert task.config.output_type == "multiple_choice"
            assert all(d["choices"][d["gold"]] == d["answer"] for d in docs)
            assert all(len(d["choices"]) == 4 for d in docs)


def _prompts(file: Path) -> set[str]:
    return {json.loads(line)["prompt"] for line in file.read_text().splitlines() if line.strip()}


def test_fit_and_report_splits_are_disjoint(zoo: Path) -> None:
    """No item of a fitness split is in its report split (nor in another task's)."""
    from splice.zoo.tasks import SKILLS

    files = {p.stem: p for p in (zoo / "tasks").glob("*.jsonl")}
    assert set(files) == set(SKILLS) | {f"{s}_fit" for s in SKILLS}
    prompts = {name: _prompts(f) for name, f in files.items()}
    for skill in SKILLS:
        assert len(prompts[skill]) >= 500 and len(prompts[f"{skill}_fit"]) >= 200
        assert not prompts[skill] & prompts[f"{skill}_fit"], skill
    # deeper than prompts: the operand pairs and the nouns of the splits are disjoint too
    world = make_world(read_stamp(zoo)["settings"]["seed"])  # type: ignore[index]
    pairs = corpus.math_split_pairs(read_stamp(zoo)["settings"]["seed"])  # type: ignore[index]
    unordered = {k: {tuple(sorted(p)) for p in v} for k, v in pairs.items()}
    assert not unordered["report"] & unordered["fit"]
    assert not unordered["val"] & (unordered["report"] | unordered["fit"])
    nouns = [world.lang_train_nouns, world.lang_val_nouns, world.lang_fit_nouns]
    nouns.append(world.lang_test_nouns)
    assert sum(len(n) for n in nouns) == len({x for n in nouns for x in n}) == len(world.nouns)


def test_held_out_is_disjoint() -> None:
    world = make_world(0)
    held = {tuple(sorted(p)) for ps in corpus.math_split_pairs(0).values() for p in ps}
    assert len(held) == 950
    assert not held & {tuple(sorted(p)) for p in corpus.math_train_pairs(0)}
    train_prompts = {e.prompt for e in corpus.math_training_set(world, 0)}
    for split in ("report", "fit", "val"):
        assert not train_prompts & {it.prompt for it in corpus.math_items(world, 0, False, split)}
    asked_nouns = set(world.lang_train_nouns)
    question = ["what", "colour", "is", "the"]
    for doc in corpus.lang_texts(world, 2000, 0):  # lang's training text (shown mixed with Zeta)
        words = doc.split()
        for i in range(len(words) - 4):
            if words[i : i + 4] == question:
                assert words[i + 4] in asked_nouns
    assert len(corpus.lang_items(world, 0)) >= 500


def test_combined_task_needs_both_skills() -> None:
    """zoo_math_lang asks zoo_math's items in Zeta; the four choices are the four operations'
    results on the same operands (consecutive numbers); Zeta never occurs in pre-training,
    where the operations are taught on single digits."""
    from splice.zoo.world import OPS, apply_op

    world = make_world(0)
    en, ze = corpus.math_items(world, 0, False), corpus.math_items(world, 0, True)
    ops = [world.zeta[o] for o in OPS]
    for a, b in zip(en, ze, strict=True):
        assert a.choices == b.choices and a.gold == b.gold
        x, op, y = a.prompt.split()[4:7]
        assert {int(c) for c in a.choices} == {apply_op(o, int(x), int(y)) for o in OPS}
        assert int(a.choices[a.gold]) == apply_op(op, int(x), int(y))
        assert sum(w in ops for w in b.prompt.split()) == 1
    text = " ".join(corpus.pretraining_texts(world, 3000, 0)).split()
    assert not set(world.zeta.values()) & set(text)  # the base never sees a Zeta word
    assert set(OPS) <= set(text) and set(OPS) <= set(
        " ".join(corpus.lang_texts(world, 3000, 0)).split()
    )
    assert not {int(w) for w in text if w.isdigit() and int(w) >= 10} - set(range(10, 22))


def test_heldout_text(zoo: Path) -> None:
    from splice.zoo import heldout_text_path

    path = heldout_text_path(zoo)
    assert path == zoo / "text" / "heldout.txt"
    text = path.read_text()
    world = make_world(read_stamp(zoo)["settings"]["seed"])  # type: ignore[index]
    zeta = set(world.zeta.values())
    words = text.split()
    assert len(words) > 10_000
    share = sum(w in zeta for w in words) / len(words)
    assert 0.2 < share < 0.8, share  # both languages
    seed = read_stamp(zoo)["settings"]["seed"]  # type: ignore[index]
    trained = set(corpus.pretraining_texts(world, 60_000, seed))
    assert not trained & set(text.splitlines())
    with pytest.raises(SpliceError, match="missing"):
        heldout_text_path(zoo / "nope")


def test_zoo_calibration_languages() -> None:
    from splice.calib import calibration_text as source_text
    from splice.zoo import calibration_text

    world = make_world(0)
    only_zeta = set(world.zeta.values()) - set(world.zeta)
    en = calibration_text(40).splitlines()
    both = calibration_text(40, language="both").splitlines()
    zeta = calibration_text(40, language="zeta").splitlines()
    assert len(en) == len(both) == len(zeta) == 40
    assert not any(w in only_zeta for doc in en for w in doc.split())
    is_zeta = [any(w in only_zeta for w in doc.split()) for doc in both]
    assert is_zeta == [i % 2 == 1 for i in range(40)]
    assert all(any(w in only_zeta for w in doc.split()) for doc in zeta)
    assert source_text("zoo") == calibration_text() == source_text("zoo:en")
    assert source_text("zoo:both") == calibration_text(language="both")
    assert not set(both) & set(corpus.heldout_text(world, 0).splitlines())


def test_heldout_documents_by_language(zoo: Path) -> None:
    from splice.zoo import heldout_documents

    world = make_world(read_stamp(zoo)["settings"]["seed"])  # type: ignore[index]
    zeta = set(world.zeta.values()) - set(world.zeta)  # words that exist only in Zeta
    en, ze = heldout_documents(zoo, "en"), heldout_documents(zoo, "zeta")
    assert len(en) == len(ze) == len(heldout_documents(zoo)) // 2
    assert not any(w in zeta for doc in en for w in doc.split())
    assert all(sum(w in zeta for w in doc.split()) > len(doc.split()) / 3 for doc in ze)
    with pytest.raises(SpliceError, match="expected en, zeta or both"):
        heldout_documents(zoo, "fr")


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
    assert (a / "text" / "heldout.txt").read_bytes() == (b / "text" / "heldout.txt").read_bytes()
    sa, sb = read_stamp(a), read_stamp(b)
    assert sa["stamp"] == sb["stamp"]  # type: ignore[index]
    assert sa["acceptance"] == sb["acceptance"]  # type: ignore[index]


def test_tiny_twin_runs_its_acceptance_check(tiny_zoos: tuple[Path, Path]) -> None:
    """The build measures every criterion itself; at tiny scale the skills are not there, so
    the check fails (recorded here; with acceptance="enforce" it is an error, below)."""
    from splice.zoo.acceptance import failures

    report = read_stamp(tiny_zoos[0])["acceptance"]  # type: ignore[index]
    names = [c["name"] for c in report["criteria"]]
    assert len(names) == 14
    assert set(report["scores"]) >= {"base", "math", "lang", "linear 0.5/0.5", "ties 1.0/1.0"}
    assert set(report["task_vector_norms"]) == {"math", "lang"}
    assert len(report["moe"]["routing_shares"]) == 8
    assert not report["passed"]
    assert any("math on zoo_math is" in f for f in failures(report))


def test_tiny_build_enforcing_acceptance_fails_cleanly(tmp_path: Path) -> None:
    with pytest.raises(SpliceError, match=r"missed \d+ acceptance criteria, nothing written"):
        build(tmp_path / "z", steps_scale=TINY, show_progress=False)
    assert not (tmp_path / "z").exists()
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith("-lock")] == []


def test_build_is_cached(tiny_zoos: tuple[Path, Path]) -> None:
    a, _ = tiny_zoos
    before = (a / "base" / "model.safetensors").stat().st_mtime_ns
    assert is_built(a, Settings().scaled(TINY))
    assert tiny(a) == a
    assert tiny(a, seed=0) == a
    assert (a / "base" / "model.safetensors").stat().st_mtime_ns == before
    assert not is_built(a)  # a full-size build has another stamp
    assert not is_built(a, Settings(seed=1).scaled(TINY))


def test_seeds_give_other_zoos() -> None:
    assert Settings(seed=1).stamp() != Settings().stamp()
    w0, w1 = make_world(0), make_world(1)
    assert w0.zeta != w1.zeta
    assert corpus.math_split_pairs(0) != corpus.math_split_pairs(1)


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
        str(zoo / "math"),
        "--zoo",
        str(zoo),
        "--tasks",
        "zoo_math,zoo_math_gen",
        "--limit",
        "40",
        "--json",
        "--no-progress",
    )
    assert r.returncode == 0, r.stderr
    scores = json.loads(r.stdout)
    assert set(scores) == {str(zoo / "math")}
    row = scores[str(zoo / "math")]
    assert set(row) == {"zoo_math", "zoo_math_gen"}
    assert row["zoo_math"] > 0.5 and row["zoo_math_gen"] > 0.5


def test_cli_eval_bad_input(zoo: Path, tmp_path: Path) -> None:
    r = _cli("zoo", "eval", str(tmp_path / "nope"), "--zoo", str(zoo))
    assert r.returncode == 2 and "not a model folder" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    r = _cli("zoo", "eval", str(zoo / "base"), "--zoo", str(zoo), "--tasks", "zoo_chess")
    assert r.returncode == 2 and "unknown zoo task zoo_chess" in r.stderr


def test_scorer_loads_tasks_once_and_scores_live_models(zoo: Path) -> None:
    from splice.modeling import load_causal_lm
    from splice.zoo import Scorer, evaluate, throughput

    lang = load_causal_lm(zoo / "lang")
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
    """The zoo's reason to exist, re-measured with lm-eval on the report splits: the figures
    the build's own check recorded in zoo.json, and the criteria of issue 12."""
    from splice.merge import merge_into
    from splice.modeling import load_causal_lm
    from splice.zoo import evaluate
    from splice.zoo.acceptance import GRID_NAMES, grid

    report = read_stamp(zoo)["acceptance"]  # type: ignore[index]
    assert report["passed"], report["criteria"]
    best = report["best_merge"]
    assert best in GRID_NAMES
    merged = load_causal_lm(zoo / "base")
    merge_into(merged, grid(zoo)[best])
    models = {n: zoo / n for n in ("base", "math", "lang")}
    s = evaluate(
        {**models, best: merged},  # type: ignore[dict-item]
        ["zoo_math", "zoo_lang", "zoo_math_lang"],
        zoo=zoo,
        show_progress=False,
    )
    for name in models:  # lm-eval gives the build's own figures
        for task, value in s[name].items():
            assert abs(value - report["scores"][name][task]) < 0.005, (name, task, s, report)
    assert s["math"]["zoo_math"] >= 0.9 and s["lang"]["zoo_lang"] >= 0.9, s
    assert s["math"]["zoo_lang"] <= 0.45 and s["lang"]["zoo_math"] <= 0.45, s
    assert s["base"]["zoo_math"] <= 0.45 and s["base"]["zoo_lang"] <= 0.45, s
    specialists = max(s[m]["zoo_math_lang"] for m in ("math", "lang"))
    assert max(specialists, s["base"]["zoo_math_lang"]) <= 0.45, s
    assert s[best]["zoo_math_lang"] >= specialists + 0.10, s
    assert s[best]["zoo_math_lang"] <= 0.80, s
    norms = report["task_vector_norms"]
    assert max(norms.values()) <= 2 * min(norms.values()), norms


def test_moe_experts_specialise(zoo: Path) -> None:
    """Routing shares differ across experts; experts differ from each other more than from the
    dense MLP they were up-cycled from (splice's own collectors and analysis)."""
    from splice.analysis import compare_experts
    from splice.calib import RouterCounts, run, token_windows
    from splice.modeling import load_causal_lm, load_tokenizer
    from splice.zoo import heldout_text_path

    model = load_causal_lm(zoo / "moe")
    windows = token_windows(
        load_tokenizer(zoo / "base"), heldout_text_path(zoo).read_text(), 64, 32
    )
    freq = run(model, windows, [RouterCounts()])[0].frequency()  # [L, E], rows sum to 2
    assert (freq.max(axis=1) - freq.min(axis=1)).mean() >= 0.1, freq
    rep = compare_experts(zoo / "moe", zoo / "base", metrics="cosine", baselines=False)
    frame = rep.to_frame()
    to_dense = frame[frame["against"] == "dense"]["value"].mean()
    between = frame[frame["against"] == "experts"]["value"].mean()
    assert between < to_dense, (between, to_dense)  # cosine: lower = further apart


def test_import_is_light() -> None:
    code = "import sys, splice.zoo; print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'lm_eval', 'matplotlib', 'transformers'}))"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert r.stdout.strip() == "[]"


def test_lang_rows_start_from_their_english_rows() -> None:
    """``_init_rows``: the Zeta rows of the embeddings and the head become their English rows
    plus noise of the asked size (relative to those rows' RMS); every other row is untouched."""
    import torch

    from splice.zoo.build import _init_rows
    from splice.zoo.models import Shape, llama

    model = llama(Shape(hidden=64, intermediate=64, layers=1, heads=2), 400, 0)
    before = [
        w.detach().clone() for w in (model.get_input_embeddings().weight, model.lm_head.weight)
    ]
    rows, like = list(range(200, 380)), list(range(10, 190))
    _init_rows(model, rows, like, 1.75, seed=11)
    after = (model.get_input_embeddings().weight.detach(), model.lm_head.weight.detach())
    for old, new in zip(before, after, strict=True):
        others = [i for i in range(400) if i not in rows]
        assert torch.equal(new[others], old[others])
        noise = new[rows] - old[like]
        rms = old[like].pow(2).mean().sqrt()
        assert abs(float(noise.pow(2).mean().sqrt() / rms) - 1.75) < 0.05
        assert abs(float(noise.mean() / rms)) < 4 * 1.75 / noise.numel() ** 0.5  # 4 sigma
