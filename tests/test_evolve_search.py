"""splice.evolve's search: CMA-ES over in-memory candidates, the run folder, resume, failures."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from evolve_helpers import config_dict, write_config, write_tasks

from splice.evolve import EvolveConfig, evolve, format_report, report, resume
from splice.evolve.search import load_state

pytest.importorskip("cma")
pytest.importorskip("lm_eval")

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tasks(tmp_path_factory) -> Path:
    return write_tasks(tmp_path_factory.mktemp("evolve_tasks"))


@pytest.fixture(scope="module")
def finished(trio, tasks, tmp_path_factory):
    """An uninterrupted run of 6 generations (the reference for resume)."""
    run = tmp_path_factory.mktemp("evolve") / "run"
    cfg = EvolveConfig.from_dict(config_dict(trio, tasks, generations=6))
    return cfg, evolve(cfg, run)


def test_a_run_improves_and_writes_its_folder(finished):
    _cfg, result = finished
    run = result.run
    assert result.done and result.generation == 6 and result.evaluations == 24
    hist = result.history
    assert [h["generation"] for h in hist] == list(range(6))
    assert hist[-1]["best_so_far"] >= hist[0]["best"]
    assert all(np.isfinite(h["mean"]) for h in hist)
    records = [json.loads(x) for x in (run / "candidates.jsonl").read_text().splitlines()]
    assert len(records) == 24
    r = records[0]
    assert set(r) >= {"generation", "index", "genes", "recipe", "scores", "fitness", "merge_s"}
    assert set(r["scores"]) == {"tiny_ll:perplexity,none", "tiny_mc"}
    # fitness: lower perplexity is better (the task declares it), acc weighted 0.5
    assert r["fitness"] == pytest.approx(
        -r["scores"]["tiny_ll:perplexity,none"] + 0.5 * r["scores"]["tiny_mc"]
    )
    assert all(0 <= g <= 1 for rec in records for g in rec["genes"])
    best = max(records, key=lambda rec: rec["fitness"])
    assert result.best_fitness == best["fitness"] and result.best_genes == best["genes"]
    assert (run / "fitness.png").stat().st_size > 1000
    text = format_report(report(run))
    assert "best candidates:" in text and "winning recipe" in text


def test_best_yml_runs_through_splice_merge_and_matches_the_in_memory_candidate(finished, tmp_path):
    """The winner saved as a recipe gives the same model as the resident candidate."""
    from conftest import logits

    from splice.evolve.search import Candidates, prepare
    from splice.merge import MergeOptions, run

    cfg, result = finished
    out = run(result.run / "best.yml", tmp_path / "merged", MergeOptions(show_progress=False))
    genome, sources, options = prepare(cfg)
    cand = Candidates(cfg, genome, sources, None, options)  # type: ignore[arg-type]
    cand.merge(np.array(result.best_genes))
    assert torch.equal(logits(out), logits(cand.module))


@pytest.mark.parametrize("space", ["parameter", "dataflow"])
def test_candidates_read_and_write_nothing_after_warm_up(trio, tasks, space):
    """Merge (or path) + score of later candidates: no tensor bytes read, no file opened."""
    from test_resident import counting_reads

    from splice.evolve.scorer import TaskScorer
    from splice.evolve.search import Candidates, prepare, start_point
    from splice.modeling import load_tokenizer

    data = config_dict(trio, tasks)
    if space == "dataflow":
        data["genome"] = {"models": data["genome"]["models"], "space": "dataflow", "repeats": 2}
    cfg = EvolveConfig.from_dict(data)
    genome, sources, options = prepare(cfg)
    tok = load_tokenizer(cfg.tokenizer_ref())
    with TaskScorer(cfg.tasks, tokenizer=tok, args=cfg.lm_eval, tasks_dir=tasks) as scorer:
        cand = Candidates(cfg, genome, sources, scorer, options)
        x0 = start_point(cfg, genome)
        first = cand.evaluate(x0)
        assert first["error"] is None
        module = cand.module
        rng = np.random.default_rng(0)
        with counting_reads() as seen:
            later = [cand.evaluate(rng.uniform(0, 1, genome.dim)) for _ in range(3)]
        assert seen["tensor_bytes"] == 0 and seen["opened"] == []
        assert cand.module is module  # one resident model
        assert all(r["error"] is None for r in later)
        assert len({r["fitness"] for r in later}) > 1


def test_a_failing_candidate_scores_worst_and_the_run_goes_on(trio, tasks, tmp_path, monkeypatch):
    from splice.evolve import scorer as scorer_mod

    real = scorer_mod.TaskScorer.score
    calls = {"n": 0}

    def flaky(self, module):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("out of memory (simulated)")
        return real(self, module)

    monkeypatch.setattr(scorer_mod.TaskScorer, "score", flaky)
    cfg = EvolveConfig.from_dict(config_dict(trio, tasks, generations=2))
    with pytest.warns(UserWarning, match=r"candidate 0\.1 failed: RuntimeError: out of memory"):
        result = evolve(cfg, tmp_path / "run")
    assert result.done and result.evaluations == 8
    records = load_state(tmp_path / "run")["records"]
    failed = [r for r in records if r["error"]]
    assert len(failed) == 1 and failed[0]["fitness"] is None
    assert result.history[0]["failed"] == 1


def test_resume_after_sigterm_gives_the_uninterrupted_result(finished, trio, tasks, tmp_path):
    """A real `splice evolve` process killed by SIGTERM after generation 2, then resumed."""
    _cfg, reference = finished
    path = write_config(tmp_path / "search.yml", config_dict(trio, tasks, generations=6))
    run = tmp_path / "run"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "splice.cli", "evolve", str(path), "--out", str(run)]
    proc = subprocess.Popen(
        [*cmd, "--no-progress"],
        env=env,
        cwd=tmp_path,  # not the repo root: its stale splice.egg-info would hide the verb
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    history = run / "history.json"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if history.is_file() and len(json.loads(history.read_text() or "[]")) >= 2:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err.decode()[-2000:]
    killed = load_state(run)
    assert err.decode().strip().splitlines()[-1] == (
        f"splice: stopped by SIGTERM after generation {killed['generation']}/6 (saved in {run}); "
        f"continue with: splice evolve resume {run}"
    )
    assert 2 <= killed["generation"] < 6 and killed["stop"] is None
    assert "unfinished" in format_report(report(run))

    result = resume(run)
    assert result.done and result.generation == 6
    assert result.best_genes == reference.best_genes
    assert result.best_fitness == reference.best_fitness
    mine = [r["genes"] for r in load_state(run)["records"]]
    theirs = [r["genes"] for r in load_state(reference.run)["records"]]
    assert mine == theirs


def test_resuming_with_another_config_is_refused(finished, trio, tasks, tmp_path):
    from splice.errors import SpliceError

    cfg, reference = finished
    other = EvolveConfig.from_dict(config_dict(trio, tasks, generations=6, sigma0=0.3))
    with pytest.raises(SpliceError, match=r"another configuration \(changed: search\.sigma0\)"):
        evolve(other, reference.run)
    # the same config on a finished run: nothing to do, the same result
    again = evolve(cfg, reference.run)
    assert again.best_genes == reference.best_genes
    # an edited RUN/config.yml
    edited = tmp_path / "edited"
    import shutil

    shutil.copytree(reference.run, edited)
    data = yaml.safe_load((edited / "config.yml").read_text())
    data["search"]["popsize"] = 5
    (edited / "config.yml").write_text(yaml.safe_dump(data))
    with pytest.raises(SpliceError) as e:
        resume(edited)
    assert "search.popsize" in str(e.value) and len(str(e.value).splitlines()) == 1


def test_two_worker_processes_give_the_in_process_result(trio, tasks, tmp_path):
    cfg = EvolveConfig.from_dict(config_dict(trio, tasks, generations=2, popsize=2))
    here = evolve(cfg, tmp_path / "here")
    there = evolve(cfg, tmp_path / "there", workers=2)
    mine = [(r["genes"], r["scores"]) for r in load_state(here.run)["records"]]
    theirs = [(r["genes"], r["scores"]) for r in load_state(there.run)["records"]]
    assert mine == theirs and there.best_fitness == here.best_fitness


def test_ray_actors_give_the_in_process_result(trio, tasks, tmp_path):
    """On a local Ray instance (the ray extra; CI installs it)."""
    ray = pytest.importorskip("ray")
    cfg = EvolveConfig.from_dict(config_dict(trio, tasks, generations=2, popsize=2))
    here = evolve(cfg, tmp_path / "here")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        there = evolve(cfg, tmp_path / "there", workers=2, ray="auto")
    finally:
        ray.shutdown()
    mine = [(r["genes"], r["scores"]) for r in load_state(here.run)["records"]]
    theirs = [(r["genes"], r["scores"]) for r in load_state(there.run)["records"]]
    assert mine == theirs and there.best_fitness == here.best_fitness


def test_scorer_directions_shuffle_and_fitness(trio, tasks):
    """higher_is_better: the task's declaration unless the config says; a negative weight on
    a lower-is-better metric is mergekit-evolve's minimization (negated once, warned); shuffle
    is seeded."""
    import warnings

    from splice.evolve.config import LmEvalArgs, TaskSpec
    from splice.evolve.scorer import TaskScorer, fitness
    from splice.modeling import load_tokenizer

    tok = load_tokenizer(trio["base"])
    specs = [
        TaskSpec(name="tiny_ll", metric="perplexity", weight=-1.0),  # mergekit's habit
        TaskSpec(name="tiny_mc", higher_is_better=False),
    ]
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        s = TaskScorer(specs, tokenizer=tok, args=LmEvalArgs(shuffle=True), tasks_dir=tasks, seed=3)
    assert any("mergekit-evolve's way of minimizing" in str(w.message) for w in seen)
    assert s.higher == {"tiny_ll:perplexity,none": True, "tiny_mc": False}
    scores = {"tiny_ll:perplexity,none": 10.0, "tiny_mc": 0.5}
    assert fitness(specs, scores, s.higher) == pytest.approx(-10.0 - 0.5)  # both minimized
    assert np.isnan(fitness(specs, {"tiny_mc": 0.5}, s.higher))
    from splice.evolve.scorer import _leaves

    docs = [d["prompt"] for d in dict(_leaves(s.task_dict))["tiny_mc"].test_docs()]
    plain = [json.loads(x)["prompt"] for x in (tasks / "tiny.jsonl").read_text().splitlines()]
    assert sorted(docs) == sorted(plain) and docs != plain
    s.close()
    again = TaskScorer(specs, tokenizer=tok, args=LmEvalArgs(shuffle=True), tasks_dir=tasks, seed=3)
    assert [d["prompt"] for d in dict(_leaves(again.task_dict))["tiny_mc"].test_docs()] == docs
    again.close()
