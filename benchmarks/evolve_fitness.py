"""Cheaper fitness on the zoo: the parameter-space search of ``examples/evolve_zoo.py`` (task
arithmetic of math and lang, 24 genes, weights in [0, 2]) with ``search.fitness`` full, subset
(racing) and irt, on the same seeds; each winner scored on the report split.

    python benchmarks/evolve_fitness.py [--seeds 0,1,2] [--fevals 200] [--modes full,subset,irt]

Per run: candidates, item evaluations (the sum over candidates of the items scored), the
winner's fitness and report-split scores, the estimator's mean absolute error against the
full score on every candidate that was fully scored after generation 0, and wall time. Writes
``benchmarks/results/evolve_fitness.json``; ``scripts/doc_tables.py`` draws its table. One
torch thread.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ.setdefault(var, "1")

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT / "examples"))

#: the fitness modes, in the order the table shows them
MODES = ("full", "subset", "irt")
#: items in the report split zoo_math_lang (its standard error is sqrt(p (1 - p) / N))
REPORT_ITEMS = 500


def run_one(
    zoo: Path, mode: str, seed: int, fevals: int, out: Path, search: dict[str, Any] | None = None
) -> dict[str, Any]:
    from evolve_zoo import ps_config, settings

    from splice.evolve import EvolveConfig, evolve
    from splice.evolve.report import item_summary
    from splice.evolve.search import load_state

    args = settings(seed=seed, ps_fevals=fevals)
    common = {
        "tasks": [{"name": "zoo_math_lang_fit", "metric": "acc,none"}],
        "zoo": str(zoo),
        "lm_eval": {"batch_size": 64},
        "report_tasks": ["zoo_math_lang"],
    }
    data = ps_config(zoo, common, args)
    data["search"].update(fitness=mode, **(search or {}))
    t = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = evolve(EvolveConfig.from_dict(data), out)
    wall = time.perf_counter() - t
    recs = load_state(out)["records"]
    staged = item_summary(recs)  # None for full fitness: every candidate on every item
    return {
        "mode": mode,
        "seed": seed,
        "candidates": len(recs),
        "fully_scored": staged["fully_scored"] if staged else len(recs),
        "item_evaluations": staged["items"] if staged else sum(r["items"] for r in recs),
        "best_fitness": res.best_fitness,
        "estimate_mae": staged["estimate_mae"] if staged else None,
        "estimates_checked": staged["estimates_checked"] if staged else 0,
        "wall_s": round(wall, 1),
        "recipe": res.best_recipe,
    }


def main(argv: list[str] | None = None) -> int:
    import torch
    from evolve_zoo import score_recipes

    from splice.zoo import default_dir

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--zoo", type=Path, default=None)
    ap.add_argument("--seeds", default="0,1,2,3,4", help="comma-separated ('': only --add)")
    ap.add_argument("--modes", default="full,subset,irt")
    ap.add_argument("--fevals", type=int, default=200)
    ap.add_argument("--subset", type=float, default=None, help="search.subset (default 1/8)")
    ap.add_argument("--race-z", type=float, default=None, help="search.race_z (default 2)")
    ap.add_argument("--json", type=Path, default=RESULTS / "evolve_fitness.json")
    ap.add_argument(
        "--add", type=Path, action="append", default=[],
        help="a result file (same settings) whose runs of other seeds or modes join these",
    )  # fmt: skip
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    zoo = (args.zoo or default_dir()).resolve()
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    modes = args.modes.split(",")
    work = Path(tempfile.mkdtemp(prefix="splice-evolve-fitness-"))
    runs = []
    try:
        for seed in seeds:
            for mode in modes:
                extra = {"subset": args.subset, "race_z": args.race_z} if mode != "full" else {}
                extra = {k: v for k, v in extra.items() if v is not None}
                r = run_one(zoo, mode, seed, args.fevals, work / f"{mode}-{seed}", extra)
                r["search"] = extra
                print(
                    f"{mode} seed {seed}: {r['candidates']} candidates, "
                    f"{r['item_evaluations']} items, best {r['best_fitness']:.4f}, "
                    f"{r['wall_s']} s",
                    file=sys.stderr,
                )
                runs.append(r)
        recipes = {f"{r['mode']} {r['seed']}": r["recipe"] for r in runs}
        scores = score_recipes(recipes, zoo, None) if recipes else {}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for r in runs:
        p = scores[f"{r['mode']} {r['seed']}"]["zoo_math_lang"]
        r["report"] = round(p, 4)
        r["report_se"] = round(math.sqrt(p * (1 - p) / REPORT_ITEMS), 4)
        del r["recipe"]
    for path in args.add:  # runs of other seeds or modes, same settings
        earlier = json.loads(path.read_text())
        if earlier["fevals"] != args.fevals:
            raise SystemExit(f"{path}: {earlier['fevals']} candidates a run, not {args.fevals}")
        have = {(r["mode"], r["seed"]) for r in runs}
        runs += [r for r in earlier["runs"] if (r["mode"], r["seed"]) not in have]
    modes = [m for m in MODES if any(r["mode"] == m for r in runs)]
    runs.sort(key=lambda r: (r["seed"], modes.index(r["mode"])))
    summary = {}
    for mode in modes:
        mine = [r for r in runs if r["mode"] == mode]
        summary[mode] = {
            "report_mean": round(statistics.mean(r["report"] for r in mine), 4),
            "item_evaluations_mean": round(statistics.mean(r["item_evaluations"] for r in mine)),
            "wall_s_mean": round(statistics.mean(r["wall_s"] for r in mine), 1),
        }
    if "full" in summary:
        for s in summary.values():
            s["fewer_items_x"] = round(
                summary["full"]["item_evaluations_mean"] / s["item_evaluations_mean"], 2
            )
            s["report_minus_full"] = round(s["report_mean"] - summary["full"]["report_mean"], 4)
        full = {r["seed"]: r for r in runs if r["mode"] == "full"}
        for mode, s in summary.items():  # seeds whose winner is within one SE of full's, or above
            mine = [r for r in runs if r["mode"] == mode and r["seed"] in full]
            s["seeds_within_one_se"] = sum(
                r["report"] >= full[r["seed"]]["report"] - full[r["seed"]]["report_se"]
                for r in mine
            )
            s["seeds"] = len(mine)
    result = {
        "command": "python benchmarks/evolve_fitness.py "
        + " ".join(Path(a).name if os.sep in a else (a or "''") for a in argv or sys.argv[1:]),
        "seeds": sorted({r["seed"] for r in runs}),
        "zoo": str(zoo),
        "fevals": args.fevals,
        "threads": 1,
        "cpus": os.cpu_count(),
        "load_average_1min_end": round(os.getloadavg()[0], 2),
        "runs": runs,
        "summary": summary,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(summary, indent=1), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
