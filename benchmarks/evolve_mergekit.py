"""A mergekit-evolve configuration as its documentation writes one, pointed at the zoo
(``examples/evolve/mergekit_ties.yml``: ties, weights and densities in [0, 1], 4 layers per gene
group, mergekit-evolve's start), 200 candidates; the winner, the seeded grid, the sources and
the zoo's naive grid scored on the report splits.

    python benchmarks/evolve_mergekit.py [--out RUN] [--fevals 200]

``--out`` an existing run folder of the same config is resumed (a finished one only reported).
Writes ``benchmarks/results/evolve_mergekit.json``; ``scripts/doc_tables.py`` draws its table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ.setdefault(var, "1")

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "examples" / "evolve" / "mergekit_ties.yml"
RESULTS = ROOT / "benchmarks" / "results"
REPORT = ["zoo_math_lang", "zoo_math", "zoo_lang"]


def main(argv: list[str] | None = None) -> int:
    import torch

    sys.path.insert(0, str(ROOT / "examples"))
    from evolve_zoo import naive_grid, score_recipes

    from splice.evolve import evolve
    from splice.evolve.report import grid_standing, report_table
    from splice.evolve.search import load_state
    from splice.zoo import default_dir

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--fevals", type=int, default=200)
    ap.add_argument("--json", type=Path, default=RESULTS / "evolve_mergekit.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    out = args.out or Path(tempfile.mkdtemp(prefix="splice-mk-")) / "run"
    t = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = evolve(CONFIG, out, max_fevals=args.fevals)
        table = report_table(out, REPORT)
    wall = time.perf_counter() - t
    zoo = default_dir().resolve()
    naive = score_recipes(naive_grid(zoo), zoo, None)
    best_naive = max(naive, key=lambda k: naive[k]["zoo_math_lang"])
    state = load_state(out)
    result = {
        "command": "python benchmarks/evolve_mergekit.py " + " ".join(argv or sys.argv[1:]),
        "config": str(CONFIG.relative_to(ROOT)),
        "candidates": res.evaluations,
        "stop": res.stop,
        "best_fitness": res.best_fitness,
        "grid_best_fitness": max(r["fitness"] for r in state["records"] if r.get("grid")),
        "restarts": max(h.get("restart", 0) for h in state["history"]),
        "search_s": round(sum(h["seconds"] for h in state["history"]), 1),
        "wall_s": round(wall, 1),
        "report": table,
        "zoo_naive": naive,
        "best_naive": best_naive,
        "standing": grid_standing(table),
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print("\n".join(result["standing"]), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
