"""Every merge method on the zoo's two specialists, scored on every zoo task.

    python examples/zoo_merges.py [--out out/zoo-merges] [--tasks report] [--methods ties,linear]

Each recipe is an ordinary splice (mergekit-schema) recipe run with ``splice.merge.run``; the
scores come from ``splice.zoo.evaluate`` (lm-eval, held-out items). Prints a markdown table and
writes ``benchmarks/results/zoo_merges.json``. The README's merge table comes from here.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(var, "1")


def zoo_recipes(zoo: Path) -> dict[str, dict]:
    """Recipes merging the zoo's ``math`` and ``lang`` specialists, one (or two) per method."""
    base, math, lang = str(zoo / "base"), str(zoo / "math"), str(zoo / "lang")

    def per_model(method: str, wm: float, wl: float, base_model: bool = True, **each) -> dict:
        r = {
            "merge_method": method,
            "models": [
                {"model": math, "parameters": {"weight": wm, **each}},
                {"model": lang, "parameters": {"weight": wl, **each}},
            ],
            "dtype": "float32",
            "seed": 0,
        }
        if base_model:
            r["base_model"] = base
        return r

    recipes = {
        "linear 0.5/0.5": per_model("linear", 0.5, 0.5, base_model=False),
        "task_arithmetic 1.0/0.8": per_model("task_arithmetic", 1.0, 0.8),
        "slerp t=0.5 (math -> lang)": {
            "merge_method": "slerp",
            "base_model": math,
            "models": [{"model": math}, {"model": lang}],
            "parameters": {"t": 0.5},
            "dtype": "float32",
        },
        "nuslerp 0.5/0.5 (task vectors)": per_model("nuslerp", 0.5, 0.5),
        "multislerp 0.5/0.5 (task vectors)": per_model("multislerp", 0.5, 0.5),
        "karcher": {
            "merge_method": "karcher",
            "models": [{"model": math}, {"model": lang}],
            "dtype": "float32",
        },
        "ties 1.0/1.0 (defaults)": per_model("ties", 1.0, 1.0),
        "ties 1.0/1.0 d=0.7": per_model("ties", 1.0, 1.0, density=0.7),
        "ties 1.0/1.0 d=0.7 normalize=false": {
            **per_model("ties", 1.0, 1.0, density=0.7),
            "parameters": {"normalize": False},
        },
        "dare_ties 1.0/0.8 d=0.9": per_model("dare_ties", 1.0, 0.8, density=0.9),
        "dare_linear 1.0/0.8 d=0.9": per_model("dare_linear", 1.0, 0.8, density=0.9),
        "breadcrumbs 1.0/0.8 d=0.9": per_model("breadcrumbs", 1.0, 0.8, density=0.9, gamma=0.01),
        "breadcrumbs_ties 1.0/0.8 d=0.9": per_model(
            "breadcrumbs_ties", 1.0, 0.8, density=0.9, gamma=0.01
        ),
        "della 1.0/0.8 d=0.7": per_model("della", 1.0, 0.8, density=0.7, epsilon=0.15),
        "della_linear 1.0/0.8 d=0.7": per_model(
            "della_linear", 1.0, 0.8, density=0.7, epsilon=0.15
        ),
        "model_stock": {
            "merge_method": "model_stock",
            "base_model": base,
            "models": [{"model": math}, {"model": lang}],
            "dtype": "float32",
        },
    }
    return recipes


def run_all(zoo: Path, out: Path, methods: list[str] | None = None) -> dict[str, Path]:
    """Merge every recipe (or those whose method is in ``methods``) into ``out/<n>``."""
    from splice.merge import MergeOptions, run

    folders = {}
    for i, (name, recipe) in enumerate(zoo_recipes(zoo).items()):
        if methods and recipe["merge_method"] not in methods:
            continue
        folders[name] = run(recipe, out / f"{i:02d}-{recipe['merge_method']}", MergeOptions(
            overwrite=True, show_progress=False))  # fmt: skip
    return folders


def markdown(scores: dict[str, dict[str, float]]) -> str:
    tasks = list(next(iter(scores.values())))
    lines = ["| model | " + " | ".join(tasks) + " |", "|---|" + "---:|" * len(tasks)]
    lines += [
        f"| {m} | " + " | ".join(f"{s[t]:.3f}" for t in tasks) + " |" for m, s in scores.items()
    ]
    return "\n".join(lines)


def main() -> None:
    from splice.zoo import build, evaluate

    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--out", type=Path, default=Path("out/zoo-merges"))
    ap.add_argument(
        "--tasks",
        default="report",
        help="comma-separated zoo tasks, all, or report (the report splits and their _gen twins)",
    )
    ap.add_argument("--methods", help="comma-separated merge methods (default: all)")
    args = ap.parse_args()
    zoo = build()
    merged = run_all(zoo, args.out, args.methods.split(",") if args.methods else None)
    models = {n: zoo / n for n in ("base", "math", "lang")} | merged
    from splice.zoo.tasks import GEN_TASKS, MC_TASKS

    tasks = [*MC_TASKS, *GEN_TASKS] if args.tasks == "report" else args.tasks
    scores = evaluate(models, tasks, zoo=zoo)
    print(markdown(scores))
    dest = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "zoo_merges.json"
    dest.parent.mkdir(exist_ok=True)
    dest.write_text(json.dumps(scores, indent=2) + "\n")
    print(f"\nscores in {dest}", file=sys.stderr)


if __name__ == "__main__":
    main()
