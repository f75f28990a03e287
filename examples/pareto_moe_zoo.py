"""Experts kept per layer, chosen by a search that sees the task, against the task-blind pruning
criteria at the same expert counts, on the zoo's MoE.

    python examples/pareto_moe_zoo.py [--zoo DIR] [--out out/pareto-moe-zoo] [--fresh]
                                      [--weights 0,0.1,0.2,0.3,0.5] [--fevals 150]

* **search** (``splice.evolve``, ``genome.prune: experts``): the zoo has one MoE (``moe``: a
  Mixtral of 8 layers, 4 experts each, 2 per token), so it is the only model of a ``linear``
  merge (its one weight normalizes to 1: the merge is the model itself) and the genes that act
  are the expert count gene and one rank gene per expert of each layer; fitness
  ``zoo_lang_fit - w * size`` (``size``: the candidate's parameters over the MoE's), one run per
  size weight ``w`` of ``--weights``, ``--fevals`` candidates each;
* **pruning criteria**: ``splice collapse --keep-experts K --prune --by naee | frequency |
  reap`` for K = 2 and 3 (calibration ``zoo:both``, the text the MoE was trained on, as
  ``examples/collapse_zoo.py``).

Every point is scored on the report splits (``zoo_math``, ``zoo_lang``, ``zoo_math_lang``; the
searches only see ``zoo_lang_fit``) and its parameters counted on the loaded model. The
points, the Pareto front of ``zoo_lang`` against parameters, and the wall times go to
``benchmarks/results/pareto_moe_zoo.json``; the plot to ``docs/img/pareto_moe_zoo.png``. One
torch thread everywhere.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(var, "1")

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = ROOT / "benchmarks" / "results"
PLOT = ROOT / "docs" / "img" / "pareto_moe_zoo.png"
AXIS = "zoo_lang"
CRITERIA = ("naee", "frequency", "reap")
STYLES = {
    "search": ("o", "tab:blue", "search (expert genes), one per size weight"),
    "moe": ("D", "black", "the MoE, every expert"),
    **{
        f"prune {by}": (m, c, f"collapse --keep-experts K --prune --by {by}")
        for by, m, c in zip(CRITERIA, "s^v", ("tab:orange", "tab:green", "tab:red"), strict=True)
    },
}


def search_config(
    zoo: Path, common: dict[str, Any], w: float, args: argparse.Namespace
) -> dict[str, Any]:
    """The MoE alone, its expert genes, size weight ``w``."""
    return {
        "genome": {
            "models": [str(zoo / "moe")],
            "merge_method": "linear",
            "layer_granularity": 0,
            "ranges": {"weight": [0.5, 1.0]},  # normalized: the model itself
            "prune": "experts",
        },
        "search": {"seed": args.seed, "max_fevals": args.fevals, "size_weight": w},
        **common,
    }


def pruned(zoo: Path, out: Path) -> dict[str, tuple[Path, int, str]]:
    """The MoE pruned to K = 2 and 3 experts by each criterion: label -> (folder, K, by)."""
    from splice.execute import ExecOptions
    from splice.surgery import Calibration, collapse

    calib = Calibration(seq_len=64, max_samples=128, batch_size=16)
    opts = ExecOptions(overwrite=True, show_progress=False)
    models = {}
    for k in (2, 3):
        for by in CRITERIA:
            folder = out / f"prune{k}-{by}"
            if not (folder / "config.json").is_file():
                collapse(zoo / "moe", folder, keep_experts=k, prune=True, by=by,
                         calibration="zoo:both", calib=calib, options=opts)  # fmt: skip
            models[f"keep {k} prune --by {by}"] = (folder, k, by)
    return models


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--zoo", type=Path, default=None, help="zoo folder (default: the zoo)")
    ap.add_argument("--out", type=Path, default=Path("out/pareto-moe-zoo"), help="work folder")
    ap.add_argument("--fresh", action="store_true", help="delete --out first (else resume)")
    ap.add_argument("--weights", default="0,0.1,0.2,0.3,0.5", help="size weights to sweep")
    ap.add_argument("--fevals", type=int, default=150, help="candidates per search")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=RESULTS / "pareto_moe_zoo.json")
    ap.add_argument("--plot", type=Path, default=PLOT)
    ap.add_argument("--replot", action="store_true", help="only redraw the plot from --json")
    return ap


def draw(points: list[dict[str, Any]], path: Path) -> None:
    from pareto_zoo import plot

    plot(points, path, axis=AXIS, styles=STYLES, legend="center right",
         title="zoo MoE: experts chosen by a search vs by pruning criteria")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    import torch

    sys.path.insert(0, str(HERE))
    from evolve_zoo import score_recipes
    from pareto_zoo import begin, pareto, save, sweep

    args = parser().parse_args(argv)
    if args.replot:
        draw(json.loads(args.json.read_text())["points"], args.plot)
        return 0
    torch.set_num_threads(1)
    zoo, tasks_dir, common = begin(args, "zoo_lang_fit")
    if not (zoo / "moe" / "config.json").is_file():
        sys.exit(f"{zoo}: no moe model (build the zoo first: splice zoo build)")
    t0 = time.perf_counter()
    runs, recipes = sweep(args, lambda w: search_config(zoo, common, w, args))
    search_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    baselines = pruned(zoo, args.out)
    prune_s = time.perf_counter() - t1
    recipes["moe"] = {"merge_method": "passthrough", "models": [{"model": str(zoo / "moe")}]}
    for label, (folder, _, _) in baselines.items():
        recipes[label] = {"merge_method": "passthrough", "models": [{"model": str(folder)}]}
    t2 = time.perf_counter()
    scored = score_recipes(recipes, zoo, tasks_dir, sizes=True)
    report_s = time.perf_counter() - t2
    full = scored["moe"]["params"]

    points = []
    for label, s in scored.items():
        if label in runs:
            r = runs[label]
            kept = r["recipe"].get("keep_experts")
            k = len(next(e for e in kept if e is not None)) if kept else 4
            kind, tag = "search", f"w={r['size_weight']:g}"
            extra = {"size_weight": r["size_weight"], "fit_score": r["fit_score"], "kept": kept}
        elif label == "moe":
            kind, tag, k, extra = "moe", "4 experts", 4, {}
        else:
            _, k, by = baselines[label]
            kind, tag, extra = f"prune {by}", f"K={k}", {}
        points.append(
            {
                "kind": kind,
                "label": label,
                "tag": tag,
                "experts": k,
                "params": s["params"],
                "size": round(s["params"] / full, 4),
                "scores": s["scores"],
                **extra,
            }
        )
    pareto(points, AXIS)
    draw(points, args.plot)
    result = {
        "fitness": common["tasks"],
        "axis": AXIS,
        "full_params": full,
        "wall_s": round(time.perf_counter() - t0, 1),
        "search_s": round(search_s, 1),
        "prune_s": round(prune_s, 1),
        "report_s": round(report_s, 1),
        "points": points,
        "searches": runs,
    }
    save(args, argv, zoo, result, "pareto_moe_zoo.py")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
