"""Sakana's Table 1 on the zoo: sources, the zoo's naive merges, and three evolved merges.

    python examples/evolve_zoo.py [--zoo DIR] [--out out/evolve-zoo] [--ps-fevals N] ...

Runs on the zoo (default :func:`splice.zoo.default_dir`):

* **PS**: a parameter-space search (``splice.evolve``, CMA-ES): task arithmetic of ``math`` and
  ``lang`` over ``base``, one weight per source, per 2 layers (``layer_granularity 2``) and
  per tensor set (attention / MLP / the rest), weights in [0, 2] (24 genes, all starting at
  0.5: task arithmetic 1.0/1.0, which keeps math's sums; the search turns math down where it
  breaks lang's reading), 300 candidates (5-9 minutes on one thread of a loaded 2-core box).
  Per layer (``--granularity 1``, 48 genes) fits the fitness split better and the report split
  worse on zoo v2 (0.468 / 0.414 against 0.424 / 0.430 with 2, and lang at chance);
* **DFS**: a data-flow search over the layers of ``math`` and ``lang`` (Sakana's layer path,
  ``repeats`` r, one scale per slot), embeddings and head from ``math``;
* **PS+DFS**: a data-flow search whose first model is the PS winner (then ``math``, ``lang``):
  it starts at the PS winner's own layers;

then scores the sources, the zoo's fixed grid of naive merges (linear 0.5/0.5, task arithmetic
with weights in {0.5, 0.8, 1.0}², TIES 1.0/1.0: ``splice.zoo.acceptance.grid`` where the zoo
code has it, the same recipes otherwise) and the three winners on the **report** splits
(``zoo_math``, ``zoo_lang``, ``zoo_math_lang``; the searches only ever see the ``*_fit``
splits), prints a markdown table and writes ``benchmarks/results/evolve_zoo.json``.

Fitness: ``zoo_math_lang_fit`` alone (weight 1); ``--skill-weight W`` adds ``zoo_math_fit`` and
``zoo_lang_fit`` at weight W. The combined task is what the table is about, and it already gives
CMA-ES a slope on this zoo (the PS search climbs from 0.40 to 0.42-0.47 on it); each extra split
costs as much evaluation as the combined one (~1 s per 250-item split per candidate on one
thread), so the two skill splits would cut the candidates in the 10-minute budget to a third.
They are the knob to turn when the combined accuracy sits flat near chance (a candidate that
keeps lang's reading but lost math's sums scores like one that lost both there). A zoo without
``*_fit`` splits (v1) falls back to the report task names, with a printed note (the report is
then scored on what the search fitted: do not quote it).

One torch thread everywhere (``--threads``); each search's wall time is in the JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(var, "1")

REPORT = ("zoo_math", "zoo_lang", "zoo_math_lang")
RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"

_MC_YAML = """task: {name}
tag: [zoo]
dataset_path: json
dataset_kwargs:
  data_files:
    test: {path}
test_split: test
doc_to_text: "{{{{prompt}}}}"
output_type: multiple_choice
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{gold}}}}"
target_delimiter: " "
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


# ---- the zoo's tasks -------------------------------------------------------------------------
def zoo_tasks(zoo: Path, folder: Path) -> tuple[Path | None, set[str]]:
    """Task configs for every ``zoo/tasks/*.jsonl`` that ``splice.zoo``'s own task writer does
    not write (the fitness splits on a main without zoo v2's code), into ``folder``, naming the
    jsonl by its absolute path (the zoo's own YAMLs may name the folder it was built in).
    Returns (``folder`` or None when nothing was needed, every task name the zoo has)."""
    from splice.errors import SpliceError
    from splice.zoo.tasks import write_tasks

    data = zoo / "tasks"
    probe = Path(tempfile.mkdtemp(prefix="splice-zoo-probe-"))
    try:
        write_tasks(probe, data)
        written = {p.stem for p in probe.glob("*.yaml")}
    except SpliceError:  # a zoo of another version than this code's: write every config here
        written = set()
    finally:
        shutil.rmtree(probe, ignore_errors=True)
    have = {p.stem for p in data.glob("*.jsonl")} | written
    extra = sorted({p.stem for p in data.glob("*.jsonl")} - written)
    if not extra:
        return None, have
    folder.mkdir(parents=True, exist_ok=True)
    for name in extra:
        path = json.dumps(str((data / f"{name}.jsonl").resolve()))
        (folder / f"{name}.yaml").write_text(_MC_YAML.format(name=name, path=path))
    return folder, have


def fitness_tasks(have: set[str], skill_weight: float) -> tuple[list[dict[str, Any]], str | None]:
    """The fitness: the ``_fit`` splits (combined at 1, each skill at ``skill_weight``); a zoo
    without them falls back to the report names, with a note."""
    names = ["zoo_math_lang", "zoo_math", "zoo_lang"]
    weights = [1.0, skill_weight, skill_weight]
    note = None
    if all(f"{n}_fit" in have for n in names):
        names = [f"{n}_fit" for n in names]
    else:
        note = (
            "NOTE: this zoo has no *_fit splits (zoo v1): the searches fit the report splits "
            "themselves, so the evolved rows below are scored on what they fitted"
        )
    tasks = [
        {"name": n, "weight": w, "metric": "acc,none"}
        for n, w in zip(names, weights, strict=True)
        if w
    ]
    return tasks, note


def zoo_stamp(zoo: Path) -> str | None:
    """The zoo's build stamp and version (``zoo.json``), to tell zoos apart in the results."""
    try:
        meta = json.loads((zoo / "zoo.json").read_text())
    except (OSError, ValueError):
        return None
    return f"{meta.get('stamp')} (v{meta.get('version')})"


# ---- the naive merges ---------------------------------------------------------------------------
def naive_grid(zoo: Path) -> dict[str, dict[str, Any]]:
    """The zoo's fixed grid of naive merges of ``math`` and ``lang`` (the one its build checks)."""
    from splice.zoo.acceptance import grid

    return grid(zoo)


# ---- the searches ---------------------------------------------------------------------------------
def ps_config(zoo: Path, common: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    return {
        "genome": {
            "models": [str(zoo / "math"), str(zoo / "lang")],
            "merge_method": "task_arithmetic",
            "base_model": str(zoo / "base"),
            "layer_granularity": args.granularity,
            "filters": ["self_attn", "mlp"],
            "ranges": {"weight": [0.0, args.max_weight]},
        },
        "search": {
            "seed": args.seed,
            "max_fevals": args.ps_fevals,
            "sigma0": args.sigma0,
            "start": args.ps_start,
            **({"popsize": args.popsize} if args.popsize else {}),
        },
        **common,
    }


def dfs_config(
    models: list[str], common: dict[str, Any], fevals: int, args: argparse.Namespace
) -> dict[str, Any]:
    return {
        "genome": {
            "space": "dataflow",
            "models": models,
            "repeats": args.repeats,
            "scales": args.dfs_scales,
            "donor": "gene",
        },
        # a long search of a large space (300 genes): restart after 10 stalled generations
        "search": {
            "seed": args.seed,
            "max_fevals": fevals,
            "fitness": args.dfs_fitness,
            "patience": 10,
        },
        **common,
    }


def search(name: str, data: dict[str, Any], out: Path) -> dict[str, Any]:
    """One search into ``out/name`` (resumed when that folder holds the same run)."""
    from splice.evolve import EvolveConfig, evolve

    config = EvolveConfig.from_dict(data)
    t = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = evolve(config, out / name, show_progress=sys.stderr.isatty())
    wall = time.perf_counter() - t
    history = json.loads((out / name / "history.json").read_text())
    wall = max(wall, sum(h["seconds"] for h in history))  # a resumed run: its generations' time
    recs = [json.loads(x) for x in (out / name / "candidates.jsonl").read_text().splitlines()]
    ok = [r for r in recs if r.get("eval_s") is not None]
    print(
        f"{name}: {res.evaluations} candidates in {wall:.0f} s ({res.stop}); best fitness "
        f"{res.best_fitness:.4f} {res.best_scores}",
        file=sys.stderr,
    )
    return {
        "run": str(out / name),
        "wall_s": round(wall, 1),
        "candidates": res.evaluations,
        "generations": res.generation,
        "stop": res.stop,
        "best_fitness": res.best_fitness,
        "best_fit_scores": res.best_scores,
        "fitness": config.search.fitness,
        "item_evaluations": sum(r.get("items") or 0 for r in recs),
        "merge_s_mean": round(sum(r["merge_s"] for r in ok) / max(1, len(ok)), 4),
        "eval_s_mean": round(sum(r["eval_s"] for r in ok) / max(1, len(ok)), 4),
        "recipe": res.best_recipe,
    }


# ---- the report -----------------------------------------------------------------------------------
def score_recipes(
    recipes: dict[str, dict[str, Any]], zoo: Path, tasks_dir: Path | None, *, sizes: bool = False
) -> dict[str, dict[str, Any]]:
    """Each recipe merged in memory and scored on the report splits (tasks loaded once):
    ``{label: {task: score}}``; with ``sizes``, ``{label: {"scores": ..., "params": ...,
    "num_layers": ...}}``."""
    from splice.errors import SpliceWarning
    from splice.evolve import LmEvalArgs, TaskSpec
    from splice.evolve.scorer import TaskScorer
    from splice.merge.runner import MergeOptions, merge_into, plan
    from splice.modeling import load_tokenizer
    from splice.resident import empty_model

    opts = MergeOptions(device="cpu", show_progress=False, threads=1)
    out: dict[str, dict[str, float]] = {}
    with TaskScorer(
        [TaskSpec(name=n) for n in REPORT],
        tokenizer=load_tokenizer(str(zoo / "base")),
        args=LmEvalArgs(batch_size=64),
        tasks_dir=tasks_dir,
        zoo=zoo,
    ) as scorer:
        for label, recipe in recipes.items():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", SpliceWarning)
                p = plan(recipe, opts)
                module = empty_model(p.config, device="cpu", dtype="float32")
                merge_into(module, p, options=opts)
            scores = scorer.score(module)
            out[label] = (
                scores
                if not sizes
                else {
                    "scores": scores,
                    "params": sum(t.numel() for t in module.parameters()),
                    "num_layers": module.config.num_hidden_layers,
                }
            )
    return out


def markdown(scores: dict[str, dict[str, float]], kinds: dict[str, str]) -> str:
    lines = ["| kind | model | " + " | ".join(REPORT) + " |", "|---|---|" + "---:|" * len(REPORT)]
    for label, row in scores.items():
        cells = " | ".join(f"{row[t]:.3f}" for t in REPORT)
        lines.append(f"| {kinds[label]} | {label} | {cells} |")
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    """The command line (its defaults are the searches' settings)."""
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--zoo", type=Path, default=None, help="zoo folder (default: the zoo)")
    ap.add_argument("--out", type=Path, default=Path("out/evolve-zoo"), help="run folders")
    ap.add_argument("--fresh", action="store_true", help="delete --out first (else resume)")
    ap.add_argument("--ps-fevals", type=int, default=300)
    ap.add_argument("--dfs-fevals", type=int, default=3200, help="DFS: candidates (20x 160)")
    ap.add_argument("--dfs-fitness", default="subset", help="DFS: full, subset or irt")
    ap.add_argument("--dfs-scales", default="per_transition", help="DFS: or per_slot")
    ap.add_argument("--psdfs-fevals", type=int, default=150)
    ap.add_argument("--granularity", type=int, default=2, help="PS: layers per gene group")
    ap.add_argument("--max-weight", type=float, default=2.0, help="PS: weight range top")
    ap.add_argument("--ps-start", type=float, default=0.5, help="PS: every gene's start")
    ap.add_argument("--sigma0", type=float, default=1 / 6)
    ap.add_argument("--popsize", type=int, default=None, help="PS popsize (default 4+3 ln d)")
    ap.add_argument("--repeats", type=int, default=2, help="DFS: repetitions r of the layers")
    ap.add_argument("--skill-weight", type=float, default=0.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--skip", default="", help="comma-separated: ps, dfs, psdfs")
    ap.add_argument("--json", type=Path, default=RESULTS / "evolve_zoo.json")
    return ap


def settings(**changes: Any) -> argparse.Namespace:
    """The searches' settings: the command line's defaults, ``changes`` applied."""
    ns = parser().parse_args([])
    for key, value in changes.items():
        setattr(ns, key, value)
    return ns


def main(argv: list[str] | None = None) -> int:
    import torch

    from splice.zoo import default_dir

    args = parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    zoo = (args.zoo or default_dir()).resolve()
    if args.fresh:
        shutil.rmtree(args.out, ignore_errors=True)
    args.out.mkdir(parents=True, exist_ok=True)
    tasks_dir, have = zoo_tasks(zoo, args.out.resolve() / "tasks")
    tasks, note = fitness_tasks(have, args.skill_weight)
    if note:
        print(note, file=sys.stderr)
    common: dict[str, Any] = {
        "tasks": tasks,
        "zoo": str(zoo),
        "lm_eval": {"batch_size": 64},
        "report_tasks": list(REPORT),
        **({"tasks_dir": str(tasks_dir)} if tasks_dir else {}),
    }
    skip = set(filter(None, args.skip.split(",")))
    runs: dict[str, dict[str, Any]] = {}
    if "ps" not in skip:
        runs["PS"] = search("ps", ps_config(zoo, common, args), args.out)
    if "dfs" not in skip:
        models = [str(zoo / "math"), str(zoo / "lang")]
        runs["DFS"] = search("dfs", dfs_config(models, common, args.dfs_fevals, args), args.out)
    if "psdfs" not in skip and "PS" in runs:
        models = [str((args.out / "ps").resolve()), str(zoo / "math"), str(zoo / "lang")]
        data = dfs_config(models, common, args.psdfs_fevals, args)
        data["genome"]["repeats"] = 1
        runs["PS+DFS"] = search("psdfs", data, args.out)

    recipes: dict[str, dict[str, Any]] = {}
    kinds: dict[str, str] = {}
    for n in ("base", "math", "lang"):
        recipes[n] = {"merge_method": "passthrough", "models": [{"model": str(zoo / n)}]}
        kinds[n] = "source"
    for label, recipe in naive_grid(zoo).items():
        recipes[label], kinds[label] = recipe, "naive merge"
    for label, r in runs.items():
        recipes[f"{label} winner"], kinds[f"{label} winner"] = r["recipe"], label
    t = time.perf_counter()
    scores = score_recipes(recipes, zoo, tasks_dir)
    report_s = time.perf_counter() - t
    table = markdown(scores, kinds)
    if note:
        print(note)
    print(table)
    naive = {k: v for k, v in scores.items() if kinds[k] == "naive merge"}
    best_naive = max(naive, key=lambda k: naive[k]["zoo_math_lang"])
    cmd = "python examples/evolve_zoo.py " + " ".join(sys.argv[1:] if argv is None else argv)
    result = {
        "command": cmd.strip(),
        "zoo": str(zoo),
        "zoo_stamp": zoo_stamp(zoo),
        "fitness": tasks,
        "note": note,
        "threads": args.threads,
        "cpus": os.cpu_count(),
        "load_average_1min_end": round(os.getloadavg()[0], 2),
        "scores": scores,
        "kinds": kinds,
        "best_naive": best_naive,
        "searches": runs,
        "report_s": round(report_s, 1),
        "table": table,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nbest naive merge on zoo_math_lang: {best_naive}", file=sys.stderr)
    print(f"results in {args.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
