"""Accuracy against parameters on the zoo: one search over merging and pruning, against the
naive pipeline "merge, then prune layers by angular distance".

    python examples/pareto_zoo.py [--zoo DIR] [--out out/pareto-zoo] [--fresh]
                                  [--weights 0,0.1,0.3,0.5,1,2] [--fevals 100]

* **search** (``splice.evolve``, ``genome.prune: layers``): task arithmetic of ``math`` and
  ``lang`` over ``base``, weights in [0, 2] per tensor set (attention / MLP / the rest; one set
  of genes for every layer, ``--granularity`` to change it), plus one keep gene per layer;
  fitness ``zoo_math_lang_fit - w * size`` (``size``: the candidate's parameters over the full
  model's), one run per size weight ``w`` of ``--weights``, ``--fevals`` candidates each;
* **naive**: the zoo grid's best naive merge on ``zoo_math_lang`` (task arithmetic 1.0/0.8),
  written once by ``splice merge``, then ``splice prune --n K --by angular`` for K = 1 ..
  ``--max-prune`` (calibration: 200 documents of the zoo's pre-training text).

Every winner and every naive model is then scored on the report splits (``zoo_math``,
``zoo_lang``, ``zoo_math_lang``; the searches only see ``zoo_math_lang_fit``). The points, the
Pareto front of ``zoo_math_lang`` against parameters over both series, and the sweep's wall
time go to ``benchmarks/results/pareto_zoo.json``; the plot to ``docs/img/pareto_zoo.png``.
One torch thread everywhere.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(var, "1")

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = ROOT / "benchmarks" / "results"
PLOT = ROOT / "docs" / "img" / "pareto_zoo.png"
NAIVE = "task_arithmetic 1.0/0.8"
AXIS = "zoo_math_lang"


def search_config(zoo: Path, common: dict[str, Any], w: float, args: argparse.Namespace):
    """``examples/evolve_zoo.py``'s PS genome (task arithmetic, weights in [0, 2]) with a keep
    gene per layer and size weight ``w``."""
    from evolve_zoo import ps_config, settings

    ps = settings(granularity=args.granularity, seed=args.seed, ps_fevals=args.fevals)
    data = ps_config(zoo, common, ps)
    data["genome"]["prune"] = "layers"
    data["search"]["size_weight"] = w
    return data


def best_record(run: Path) -> dict[str, Any]:
    recs = [json.loads(x) for x in (run / "candidates.jsonl").read_text().splitlines()]
    ok = [r for r in recs if r["fitness"] is not None]
    return max(ok, key=lambda r: r["fitness"])  # the first among equals, as the search's


def calibration_file(zoo: Path, path: Path) -> Path:
    """200 documents of the zoo's pre-training text, joined as its training stream joins them."""
    from splice.modeling import load_tokenizer
    from splice.zoo import calibration_text

    tok = load_tokenizer(zoo / "base")
    joiner = f"{tok.eos_token or ''}{tok.bos_token or ''}" or "\n"
    path.write_text(joiner.join(calibration_text(200, seed=99_991).splitlines()) + "\n")
    return path


def naive_pipeline(zoo: Path, out: Path, max_prune: int) -> dict[str, tuple[Path, list[int]]]:
    """The naive merge written once, then pruned by angular distance: label -> (folder,
    kept layers)."""
    from splice.execute import ExecOptions
    from splice.merge import MergeOptions
    from splice.merge import run as merge_run
    from splice.surgery import Calibration, prune
    from splice.zoo.acceptance import grid

    merged = out / "naive"
    if not (merged / "config.json").is_file():
        merge_run(grid(zoo)[NAIVE], merged, MergeOptions(show_progress=False, threads=1))
    n = json.loads((merged / "config.json").read_text())["num_hidden_layers"]
    models = {f"{NAIVE}": (merged, list(range(n)))}
    text = calibration_file(zoo, out / "calibration.txt")
    calib = Calibration(seq_len=64, max_samples=64, batch_size=16)
    opts = ExecOptions(overwrite=True, show_progress=False)
    for k in range(1, max_prune + 1):
        r = prune(merged, out / f"naive-prune{k}", n=k, by="angular", calibration=text,
                  calib=calib, options=opts)  # fmt: skip
        models[f"{NAIVE}, prune {k} angular"] = (r.out, list(r.report.layers))
    return models


def score(
    recipes: dict[str, dict[str, Any]], zoo: Path, tasks_dir: Path | None
) -> dict[str, dict[str, Any]]:
    """Each recipe merged in memory, scored on the report splits, its parameters counted."""
    from evolve_zoo import score_recipes

    return score_recipes(recipes, zoo, tasks_dir, sizes=True)


def pareto(points: list[dict[str, Any]], axis: str = AXIS) -> None:
    """Mark ``front`` on the points no other point beats: as few or fewer parameters and as
    high or higher a score on ``axis``, one of them strictly."""
    for p in points:
        p["front"] = not any(
            q["params"] <= p["params"]
            and q["scores"][axis] >= p["scores"][axis]
            and (q["params"] < p["params"] or q["scores"][axis] > p["scores"][axis])
            for q in points
        )


#: each series of the plot: kind -> (marker, color, legend)
STYLES = {
    "search": ("o", "tab:blue", "search (merge + keep genes), one per size weight"),
    "naive": ("s", "tab:orange", f"naive: {NAIVE}, then prune K by angular distance"),
}


def plot(
    points: list[dict[str, Any]],
    path: Path,
    *,
    axis: str = AXIS,
    styles: dict[str, tuple[str, str, str]] = STYLES,
    title: str = "zoo: merge + prune search vs merge, then prune",
    legend: str = "upper left",
) -> None:
    """Accuracy on ``axis`` against parameters, a series per kind of ``styles`` (the search's
    tags left of its points, the others' right), and the Pareto front of them all."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for kind, (marker, color, label) in styles.items():
        pts = sorted((p for p in points if p["kind"] == kind), key=lambda p: p["params"])
        xs = [p["params"] / 1e6 for p in pts]
        ys = [p["scores"][axis] for p in pts]
        ax.plot(xs, ys, marker=marker, color=color, label=label, alpha=0.85,
                linestyle="none" if kind == "search" else "-")  # fmt: skip
        left = kind == "search"
        for (x, y), tags in _labels(pts, axis).items():
            ax.annotate(", ".join(tags), (x, y), textcoords="offset points", fontsize=7,
                        xytext=(-6 if left else 6, -3), ha="right" if left else "left")  # fmt: skip
    front = sorted((p for p in points if p["front"]), key=lambda p: p["params"])
    ax.step([p["params"] / 1e6 for p in front], [p["scores"][axis] for p in front], where="post",
            color="black", linewidth=1, linestyle="--", label="Pareto front (all series)")  # fmt: skip
    ax.scatter([p["params"] / 1e6 for p in front], [p["scores"][axis] for p in front], s=140,
               facecolors="none", edgecolors="black", linewidths=1.2)  # fmt: skip
    ax.set_xlabel("parameters (millions)")
    ax.set_ylabel(f"accuracy on {axis} (report split)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc=legend)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _labels(pts: list[dict[str, Any]], axis: str = AXIS) -> dict[tuple[float, float], list[str]]:
    """Tags by where they are drawn: points with the same parameters within 0.012 of each
    other's accuracy share one label (``w=0.3, w=0.5``)."""
    out: dict[tuple[float, float], list[str]] = {}
    last: tuple[float, float] | None = None
    for p in sorted(pts, key=lambda p: (p["params"], p["scores"][axis])):
        x, y = p["params"] / 1e6, p["scores"][axis]
        if last is not None and last[0] == x and y - last[1] < 0.012:
            out[last].append(p["tag"])
            continue
        last = (x, y)
        out[last] = [p["tag"]]
    return out


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--zoo", type=Path, default=None, help="zoo folder (default: the zoo)")
    ap.add_argument("--out", type=Path, default=Path("out/pareto-zoo"), help="work folder")
    ap.add_argument("--fresh", action="store_true", help="delete --out first (else resume)")
    ap.add_argument("--weights", default="0,0.1,0.3,0.5,1,2", help="size weights to sweep")
    ap.add_argument("--fevals", type=int, default=100, help="candidates per search")
    ap.add_argument("--granularity", type=int, default=0, help="layers per gene group")
    ap.add_argument("--max-prune", type=int, default=6, help="naive: prune K = 1 .. this")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=RESULTS / "pareto_zoo.json")
    ap.add_argument("--plot", type=Path, default=PLOT)
    ap.add_argument("--replot", action="store_true", help="only redraw the plot from --json")
    return ap


def begin(args: argparse.Namespace, fit_task: str) -> tuple[Path, Path | None, dict[str, Any]]:
    """The zoo (``--zoo``, else the built one), its task folder under ``--out`` (emptied first
    with ``--fresh``) and the searches' common config: fitness ``fit_task``, the report
    splits."""
    from evolve_zoo import REPORT, zoo_tasks

    from splice.zoo import default_dir

    zoo = (args.zoo or default_dir()).resolve()
    if args.fresh:
        shutil.rmtree(args.out, ignore_errors=True)
    args.out.mkdir(parents=True, exist_ok=True)
    tasks_dir, have = zoo_tasks(zoo, args.out.resolve() / "tasks")
    if fit_task not in have:
        sys.exit(f"{zoo}: no {fit_task} split (zoo v1?); this example needs zoo v2")
    common: dict[str, Any] = {
        "tasks": [{"name": fit_task, "metric": "acc,none"}],
        "zoo": str(zoo),
        "lm_eval": {"batch_size": 64},
        "report_tasks": list(REPORT),
        **({"tasks_dir": str(tasks_dir)} if tasks_dir else {}),
    }
    return zoo, tasks_dir, common


def sweep(
    args: argparse.Namespace, config: Callable[[float], dict[str, Any]]
) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
    """One search of ``config(w)`` per size weight w of ``--weights``, into ``--out``:
    (label -> the search's summary with its winner's size and fitness-split scores, label ->
    the winner's recipe)."""
    from evolve_zoo import search

    runs: dict[str, dict[str, Any]] = {}
    recipes: dict[str, dict[str, Any]] = {}
    for w in (float(w) for w in args.weights.split(",")):
        label = f"search w={w:g}"
        r = search(f"w{w:g}", config(w), args.out)
        best = best_record(Path(r["run"]))
        r.update(size_weight=w, size=best["size"], fit_score=best["scores"])
        runs[label], recipes[label] = r, r["recipe"]
    return runs, recipes


def save(
    args: argparse.Namespace,
    argv: list[str] | None,
    zoo: Path,
    result: dict[str, Any],
    script: str = "pareto_zoo.py",
) -> None:
    """Write ``result`` (with the command, the zoo's stamp and the machine) to ``--json`` and
    print one row per point."""
    from evolve_zoo import REPORT, zoo_stamp

    cmd = f"python examples/{script} " + " ".join(sys.argv[1:] if argv is None else argv)
    result = {
        "command": cmd.strip(),
        "zoo": str(zoo),
        "zoo_stamp": zoo_stamp(zoo),
        "threads": 1,
        "cpus": os.cpu_count(),
        "load_average_1min_end": round(os.getloadavg()[0], 2),
        **result,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    for p in result["points"]:
        front = " front" if p["front"] else ""
        cells = " ".join(f"{p['scores'][t]:.3f}" for t in REPORT)
        print(f"{p['label']:<45} {p['params']:>8} {p['size']:.3f} {cells}{front}")
    print(f"results in {args.json}, plot in {args.plot}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    import torch

    sys.path.insert(0, str(HERE))
    args = parser().parse_args(argv)
    if args.replot:
        plot(json.loads(args.json.read_text())["points"], args.plot)
        return 0
    torch.set_num_threads(1)
    zoo, tasks_dir, common = begin(args, "zoo_math_lang_fit")
    t0 = time.perf_counter()
    runs, recipes = sweep(args, lambda w: search_config(zoo, common, w, args))
    search_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    naive = naive_pipeline(zoo, args.out, args.max_prune)
    naive_s = time.perf_counter() - t1
    for label, (folder, _) in naive.items():
        recipes[label] = {"merge_method": "passthrough", "models": [{"model": str(folder)}]}
    t2 = time.perf_counter()
    scored = score(recipes, zoo, tasks_dir)
    report_s = time.perf_counter() - t2
    full = scored[NAIVE]["params"]  # every layer: the searches' full model too

    points = []
    for label, s in scored.items():
        if label in runs:
            r = runs[label]
            kind, tag = "search", f"w={r['size_weight']:g}"
            layers = _kept(r["recipe"], scored[NAIVE]["num_layers"])
            extra = {"size_weight": r["size_weight"], "fit_score": r["fit_score"]}
        else:
            kind = "naive"
            layers = naive[label][1]
            k = len(naive[NAIVE][1]) - len(layers)
            tag, extra = f"K={k}", {"pruned": k}
        points.append(
            {
                "kind": kind,
                "label": label,
                "tag": tag,
                "layers": layers,
                "params": s["params"],
                "size": round(s["params"] / full, 4),
                "scores": s["scores"],
                **extra,
            }
        )
    pareto(points)
    plot(points, args.plot)
    result = {
        "fitness": common["tasks"],
        "axis": AXIS,
        "full_params": full,
        "naive": NAIVE,
        "wall_s": round(time.perf_counter() - t0, 1),
        "search_s": round(search_s, 1),
        "naive_s": round(naive_s, 1),
        "report_s": round(report_s, 1),
        "points": points,
        "searches": runs,
    }
    save(args, argv, zoo, result)
    return 0


def _kept(recipe: dict[str, Any], n: int) -> list[int]:
    """The layers a recipe's slices keep (every layer for a ``models`` recipe)."""
    if "slices" not in recipe:
        return list(range(n))
    kept: list[int] = []
    for slc in recipe["slices"]:
        a, b = slc["sources"][0]["layer_range"]
        kept += range(a, b)
    return kept


if __name__ == "__main__":
    sys.exit(main())
