"""splice demo on the built-in zoo (``make demo``).

1. Build the zoo, or reuse it (it is committed in ``assets/zoo``; ``make zoo`` rebuilds it).
2. Merge its two specialists with splice recipes (mergekit schema): linear, task arithmetic,
   TIES, DARE-TIES, written to ``out/demo/`` as ordinary checkpoints.
3. Prune: the two most redundant layers of the base (angular distance on calibration text),
   with its perplexity on the zoo's held-out text before and after (``splice prune``).
4. Evolve: a short parameter-space search (``splice.evolve``, CMA-ES, about a minute) for a
   task-arithmetic merge with per-layer weights (30 candidates), scored next to the others
   (``examples/evolve_zoo.py`` runs the full searches: PS, DFS, PS+DFS).
5. Score everything on the zoo's held-out tasks with lm-eval: each merge should carry both
   skills, which no specialist has.
6. Analyze: base vs each specialist, layer redundancy of base (weights and activations), and the
   MoE's experts vs base, saved under ``out/demo/analysis/``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(var, "1")

sys.path.insert(0, str(Path(__file__).parent))
from zoo_merges import markdown, zoo_recipes  # noqa: E402

DEMO_MERGES = (
    "linear 0.5/0.5",
    "task_arithmetic 1.0/0.8",
    "ties 1.0/1.0 d=0.7 normalize=false",
    "dare_ties 1.0/0.8 d=0.9",
)


def merge_step(zoo: Path, out: Path) -> dict[str, Path]:
    """Run the demo's recipes on the zoo's specialists; returns name -> output folder."""
    from splice.merge import MergeOptions, run

    recipes = zoo_recipes(zoo)
    opts = MergeOptions(overwrite=True, show_progress=False)
    return {name: run(recipes[name], out / name.split()[0], opts) for name in DEMO_MERGES}


def surgery_step(zoo: Path, out: Path) -> Path:
    """Prune 2 of base's 8 layers, chosen by angular distance on the zoo's calibration text, and
    print the choice and the perplexity of the source and the output on held-out text."""
    from splice.execute import ExecOptions
    from splice.scoring import read_text
    from splice.surgery import Calibration, prune

    result = prune(
        zoo / "base",
        out / "base-pruned",
        n=2,
        by="angular",
        calibration="zoo",
        calib=Calibration(seq_len=64),
        options=ExecOptions(overwrite=True, show_progress=False),
    )
    result.score(text=read_text("zoo"), seq_len=64)  # --ppl zoo: into the report's summary
    print(f"{result.report.summary()}\n(perplexity on the zoo's held-out text)\n")
    assert result.out is not None
    return result.out


def search_step(zoo: Path, out: Path, fevals: int = 30) -> dict[str, Path]:
    """A short parameter-space search on the zoo (the genome of ``examples/evolve_zoo.py``,
    ``fevals`` candidates, one torch thread), its winner written to ``out/evolved``; returns
    ``{label: folder}`` for the score table. Fitness on ``zoo_math_lang_fit``; a zoo without
    fitness splits (v1) searches on ``zoo_math_lang`` itself, with a printed note."""
    import shutil
    import time
    import warnings

    import torch
    from evolve_zoo import fitness_tasks, ps_config, settings, zoo_tasks

    from splice.evolve import EvolveConfig, evolve
    from splice.merge import MergeOptions, run

    torch.set_num_threads(1)
    run_dir = out / "evolve-run"
    shutil.rmtree(run_dir, ignore_errors=True)
    tasks_dir, have = zoo_tasks(zoo, out / "evolve-tasks")
    tasks, note = fitness_tasks(have, 0.0)
    if note:
        print(f"\n{note}\n", file=sys.stderr)
    ps = settings(ps_fevals=fevals)
    common = {
        "tasks": tasks,
        "zoo": str(zoo),
        "lm_eval": {"batch_size": 64},
        **({"tasks_dir": str(tasks_dir)} if tasks_dir else {}),
    }
    config = EvolveConfig.from_dict(ps_config(zoo, common, ps))
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = evolve(config, run_dir)
    print(
        f"evolve: {res.evaluations} candidates in {time.perf_counter() - t0:.0f} s, best fitness "
        f"{res.best_fitness:.3f} on {', '.join(task['name'] for task in tasks)}; run folder {run_dir}",
        file=sys.stderr,
    )
    assert res.best_recipe is not None
    label = f"evolved (PS, {res.evaluations} candidates)" + (" [fitted on report]" if note else "")
    return {
        label: run(
            res.best_recipe, out / "evolved", MergeOptions(overwrite=True, show_progress=False)
        )
    }


def analysis_step(zoo: Path, out: Path) -> None:
    """Run every analysis on the zoo and save the reports under ``out``."""
    from splice.analysis import compare_experts, compare_layers, compare_models
    from splice.analysis.activations import analyze_activations

    reports = {
        f"base-vs-{name}": compare_models(zoo / "base", zoo / name) for name in ("math", "lang")
    }
    reports["base-layers"] = compare_layers(zoo / "base", metrics="cosine")
    reports["base-activations"] = analyze_activations(
        zoo / "base", "zoo", seq_len=64, max_samples=32
    )
    reports["moe-experts-vs-base"] = compare_experts(zoo / "moe", zoo / "base")
    for name, report in reports.items():
        report.save(out / name)
        print(f"\n== {name} ==\n{report.summary()}")
    print(f"\nanalysis reports in {out}/")


def main() -> int:
    from splice.zoo import build, evaluate

    out = Path("out") / "demo"
    zoo = build()
    print(f"zoo: {zoo}\n", file=sys.stderr)
    merged = merge_step(zoo, out)
    surgery_step(zoo, out)
    merged |= search_step(zoo, out)
    models = {n: zoo / n for n in ("base", "math", "lang", "moe")} | merged
    scores = evaluate(models, ["zoo_math", "zoo_lang", "zoo_math_lang"], zoo=zoo)
    print("accuracy on the zoo's held-out tasks (multiple choice; chance is 0.25)\n")
    print(markdown(scores))
    analysis_step(zoo, out / "analysis")
    return 0


if __name__ == "__main__":
    sys.exit(main())
