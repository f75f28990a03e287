"""Hand-built data-flow paths on the zoo: can a layer path alone (no weight merged) beat both
sources on ``zoo_math_lang``?

    python examples/dfs_paths_zoo.py [--zoo DIR] [--json benchmarks/results/dfs_paths_zoo.json]

Each row is a path: the donor (whose embeddings, final norm and head the path uses) and the
layers the stream passes through, in order, each with the scale the stream is multiplied by
before it. Rows marked ``recipe`` are ``layer_path`` recipes (``base_model`` the donor) that
``splice merge`` writes as they are scored (scales folded into the residual writers); the few
marked otherwise take the embeddings from one model and the final norm and head from another,
which a ``layer_path`` recipe cannot say: they are there to tell the embeddings' part from the
head's.

Every path runs in memory on the sources' own layer modules
(:class:`splice.evolve.dataflow.PathModels`, nothing copied) and is scored by lm-eval on the
report splits (``zoo_math``, ``zoo_lang``, ``zoo_math_lang``: :class:`splice.evolve.scorer.
TaskScorer`, tasks loaded once). Writes ``benchmarks/results/dfs_paths_zoo.json`` and prints a
markdown table. About 7 s a row on one thread.

The rows: the sources; each donor over the other models' layers; cut points (the first k layers
of one model, the rest of the other's, both donors; math's first layers swapped for base's);
scales before the first, a middle and the last layer; a repeated layer and an inserted layer
(Sakana's r > 1).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any

for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(var, "1")

REPORT = ("zoo_math", "zoo_lang", "zoo_math_lang")
MODELS = ("base", "math", "lang")
RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"

Step = tuple[str, int, float]


def span(model: str, first: int, last: int, scale: float = 1.0) -> list[Step]:
    """Layers ``first..last`` of ``model`` (inclusive); ``scale`` before the first of them."""
    return [(model, i, scale if i == first else 1.0) for i in range(first, last + 1)]


def rescale(steps: list[Step], at: int, scale: float) -> list[Step]:
    out = list(steps)
    out[at] = (*out[at][:2], scale)
    return out


def paths() -> list[dict[str, Any]]:
    """The hand-built paths: ``{label, donor, steps}`` (``embed`` / ``head`` where they part)."""
    math8, lang8 = span("math", 0, 7), span("lang", 0, 7)
    rows: list[dict[str, Any]] = [
        {"label": "source: base", "donor": "base", "steps": span("base", 0, 7)},
        {"label": "source: math", "donor": "math", "steps": math8},
        {"label": "source: lang", "donor": "lang", "steps": lang8},
        {"label": "math's layers, lang donor", "donor": "lang", "steps": math8},
        {"label": "lang's layers, math donor", "donor": "math", "steps": lang8},
        {"label": "math's layers, base donor", "donor": "base", "steps": math8},
        {"label": "base's layers, lang donor", "donor": "lang", "steps": span("base", 0, 7)},
    ]
    for donor in ("lang", "math"):
        for k in (2, 4, 6):
            rows.append(
                {
                    "label": f"lang 0-{k - 1} then math {k}-7, {donor} donor",
                    "donor": donor,
                    "steps": span("lang", 0, k - 1) + span("math", k, 7),
                }
            )
    for k in (1, 4):  # math's early layers swapped for those of its parent
        rows.append(
            {
                "label": f"base 0-{k - 1} then math {k}-7, math donor",
                "donor": "math",
                "steps": span("base", 0, k - 1) + span("math", k, 7),
            }
        )
    for k in (4, 6, 7):
        rows.append(
            {
                "label": f"math 0-{k - 1} then lang {k}-7, lang donor",
                "donor": "lang",
                "steps": span("math", 0, k - 1) + span("lang", k, 7),
            }
        )
    for at, scale in ((0, 0.7), (0, 1.4), (4, 2.0), (7, 2.0)):
        rows.append(
            {
                "label": f"math's layers, lang donor, x{scale:g} before layer {at}",
                "donor": "lang",
                "steps": rescale(math8, at, scale),
            }
        )
    rows += [
        {
            "label": "math 0-2, 2-7 (layer 2 twice), lang donor",
            "donor": "lang",
            "steps": span("math", 0, 2) + span("math", 2, 7),
        },
        {
            "label": "math 0-3, 3-7 (layer 3 twice), lang donor",
            "donor": "lang",
            "steps": span("math", 0, 3) + span("math", 3, 7),
        },
        {
            "label": "math 0-3, lang 3, math 4-7, lang donor",
            "donor": "lang",
            "steps": span("math", 0, 3) + span("lang", 3, 3) + span("math", 4, 7),
        },
        {
            "label": "math 0-2, 2-7 (layer 2 twice), math donor",
            "donor": "math",
            "steps": span("math", 0, 2) + span("math", 2, 7),
        },
        {
            "label": "math's layers, lang embeddings, math norm and head",
            "donor": "lang",
            "head": "math",
            "steps": math8,
        },
        {
            "label": "math's layers, math embeddings, lang norm and head",
            "donor": "math",
            "head": "lang",
            "steps": math8,
        },
    ]
    return rows


def compact(steps: list[Step]) -> str:
    """``math 0-3, lang 3, math 4-7 (x1.4 before math 0)``."""
    runs: list[list[Any]] = []
    for m, i, _ in steps:
        if runs and runs[-1][0] == m and runs[-1][2] == i - 1:
            runs[-1][2] = i
        else:
            runs.append([m, i, i])
    text = ", ".join(f"{m} {a}" if a == b else f"{m} {a}-{b}" for m, a, b in runs)
    scaled = [f"x{s:g} before {m} {i}" for m, i, s in steps if s != 1.0]
    return text + (f" ({', '.join(scaled)})" if scaled else "")


def score_paths(zoo: Path, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each path built on the shared modules and scored on the report splits."""
    from splice.errors import SpliceWarning
    from splice.evolve import LmEvalArgs, TaskSpec
    from splice.evolve.dataflow import PathModels
    from splice.evolve.scorer import TaskScorer
    from splice.merge.runner import MergeOptions
    from splice.modeling import load_tokenizer
    from splice.resident import ResidentCheckpoint

    refs = {n: str(zoo / n) for n in MODELS}
    opts = MergeOptions(device="cpu", show_progress=False, threads=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SpliceWarning)
        sources = {refs[n]: ResidentCheckpoint(refs[n]) for n in MODELS}
        models = PathModels(sources, None, opts, "float32")
    out = []
    with TaskScorer(
        [TaskSpec(name=n) for n in REPORT],
        tokenizer=load_tokenizer(refs["base"]),
        args=LmEvalArgs(batch_size=64),
        zoo=zoo,
    ) as scorer:
        for row in rows:
            steps = [{"model": refs[m], "layer": i, "scale": s} for m, i, s in row["steps"]]
            module = models.build(steps, donor=refs[row["donor"]])
            head = row.get("head")
            kept = (module.model.norm, module.get_output_embeddings())
            if head:  # the final norm and head of another model (no layer_path says this)
                other = models.modules[refs[head]]
                module.model.norm = other.model.norm
                module.set_output_embeddings(other.get_output_embeddings())
            t = time.perf_counter()
            try:
                scores = scorer.score(module)
            finally:
                module.model.norm = kept[0]
                module.set_output_embeddings(kept[1])
            out.append(
                {
                    "label": row["label"],
                    "path": compact(row["steps"]),
                    "steps": [list(s) for s in row["steps"]],
                    "donor": row["donor"],
                    "head": head or row["donor"],
                    "recipe": head is None,
                    **{t: round(scores[t], 4) for t in REPORT},
                    "eval_s": round(time.perf_counter() - t, 2),
                }
            )
            print(f"{row['label']}: {scores}", file=sys.stderr, flush=True)
    return out


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| path | donor | " + " | ".join(REPORT) + " |",
        "|---|---|" + "---:|" * len(REPORT),
    ]
    for r in rows:
        donor = r["donor"] if r["recipe"] else f"{r['donor']} embeddings, {r['head']} norm + head"
        cells = " | ".join(f"{r[t]:.3f}" for t in REPORT)
        lines.append(f"| {r['path']} | {donor} | {cells} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import torch

    from splice.zoo import default_dir

    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--zoo", type=Path, default=None, help="zoo folder (default: the zoo)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=Path, default=RESULTS / "dfs_paths_zoo.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    zoo = (args.zoo or default_dir()).resolve()
    t = time.perf_counter()
    rows = score_paths(zoo, paths())
    wall = time.perf_counter() - t
    sources = {r["donor"]: r["zoo_math_lang"] for r in rows if r["label"].startswith("source:")}
    bar = max(sources["math"], sources["lang"])
    best = max((r for r in rows if r["recipe"]), key=lambda r: r["zoo_math_lang"])
    table = markdown(rows)
    print(table)
    cmd = "python examples/dfs_paths_zoo.py " + " ".join(sys.argv[1:] if argv is None else argv)
    meta: dict[str, Any] = {}
    with contextlib.suppress(OSError, ValueError):
        meta = json.loads((zoo / "zoo.json").read_text())
    result = {
        "command": cmd.strip(),
        "zoo": str(zoo),
        "zoo_stamp": f"{meta.get('stamp')} (v{meta.get('version')})" if meta else None,
        "threads": args.threads,
        "wall_s": round(wall, 1),
        "rows": rows,
        "best_recipe": best["label"],
        "beats_both_sources": best["zoo_math_lang"] > bar,
        "table": table,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"\nbest layer_path on zoo_math_lang: {best['label']} ({best['zoo_math_lang']:.3f}; "
        f"sources math {sources['math']:.3f}, lang {sources['lang']:.3f})",
        file=sys.stderr,
    )
    print(f"results in {args.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
