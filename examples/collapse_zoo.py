"""Expert collapsing on the zoo's MoE, scored on held-out text and the zoo's tasks (the README table).

    python examples/collapse_zoo.py [--zoo DIR] [--moe DIR] [--calibration zoo] [--out DIR]
                                    [--tasks mc|none|LIST] [--limit N] [--json FILE]

Rows: the MoE itself; ``uniform``; ``frequency``; ``slice`` at I and at 2·I neurons; uniform
and frequency with ``--align``; the best single expert per layer (``--keep-experts 1 --prune
--top-k 1``: NAEE's choice of the one expert that reconstructs each layer best, an MoE of one
expert, i.e. dense); ``--keep-experts 2`` merged (HC-SMoE); ``--keep-experts 2`` and ``3``
pruned by each criterion (NAEE's reconstruction, routing frequency, REAP's saliency).
``--only`` runs the rows whose names start with the given prefixes.
Everything goes through ``splice.surgery.collapse`` and ``splice.scoring.evaluate``
(perplexity with sliding windows of the zoo's training length; the zoo's tasks through
``splice.zoo.evaluate``). Calibration is ``--calibration`` (default ``zoo:both``: the zoo's
stories in English and Zeta, as the MoE was trained); the held-out text is the built zoo's ``text/heldout.txt`` when it
ships one, else zoo text drawn with its own seed. Prints a markdown table (with each row's mean
relative reconstruction error) and writes ``benchmarks/results/collapse_zoo.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(var, "1")

HELDOUT_SEED = 777_001


def heldout_text(zoo: Path) -> str:
    """The zoo's held-out text: one document per line, English and Zeta alternately."""
    shipped = zoo / "text" / "heldout.txt"
    if shipped.is_file():
        return shipped.read_text()
    from splice.zoo import calibration_text

    return calibration_text(400, seed=HELDOUT_SEED, language="both") + "\n"


def halves(heldout: str) -> dict[str, str]:
    """The held-out text's English and Zeta documents."""
    from splice.zoo.build import by_language

    docs = heldout.splitlines()
    return {lang: "\n".join(by_language(docs, lang)) + "\n" for lang in ("en", "zeta")}


def runs(width: int) -> dict[str, dict]:
    """Row name -> keyword arguments of ``collapse``."""
    return {
        "uniform": dict(method="uniform"),
        "uniform --align": dict(method="uniform", align=True),
        "frequency": dict(method="frequency"),
        "frequency --align": dict(method="frequency", align=True),
        f"slice I={width}": dict(method="slice"),
        f"slice 2I={2 * width}": dict(method="slice", intermediate_size=2 * width),
        "best single expert": dict(keep_experts=1, prune=True, top_k=1),
        "keep 2 merge": dict(keep_experts=2),
        "keep 2 merge --align": dict(keep_experts=2, align=True),
        "keep 2 prune": dict(keep_experts=2, prune=True),  # NAEE
        "keep 2 prune --by frequency": dict(keep_experts=2, prune=True, by="frequency"),
        "keep 2 prune --by reap": dict(keep_experts=2, prune=True, by="reap"),
        "keep 3 prune": dict(keep_experts=3, prune=True),
        "keep 3 prune --by frequency": dict(keep_experts=3, prune=True, by="frequency"),
        "keep 3 prune --by reap": dict(keep_experts=3, prune=True, by="reap"),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--zoo", type=Path, help="built zoo (default: splice.zoo.default_dir())")
    ap.add_argument("--moe", type=Path, help="the MoE to collapse (default: the zoo's moe)")
    ap.add_argument(
        "--calibration",
        default="zoo:both",
        help="calibration text (default zoo:both: English and Zeta, as the MoE was trained)",
    )
    ap.add_argument("--out", type=Path, default=Path("/tmp/splice-collapse-zoo"))
    ap.add_argument("--seq-len", type=int, default=64, help="window length (zoo training: 64)")
    ap.add_argument("--max-samples", type=int, default=128, help="calibration windows (128)")
    ap.add_argument("--limit", type=int, help="score only the first N items of each task")
    ap.add_argument("--tasks", default="mc", help="'mc' (the multiple-choice ones), a list, 'none'")
    ap.add_argument(
        "--json",
        type=Path,
        default=Path(__file__).parents[1] / "benchmarks/results/collapse_zoo.json",
    )
    ap.add_argument("--only", help="comma-separated row-name prefixes: run only those rows")
    args = ap.parse_args()

    import torch

    from splice.execute import ExecOptions
    from splice.scoring import evaluate, format_table
    from splice.surgery import Calibration, collapse
    from splice.zoo import MC_TASKS, default_dir

    torch.set_num_threads(1)
    start = time.perf_counter()
    zoo = args.zoo or default_dir()
    moe = args.moe or zoo / "moe"
    if not (moe / "config.json").is_file():
        sys.exit(f"{moe}: no model here; build the zoo first (`splice zoo build {zoo}`)")
    work = args.out
    work.mkdir(parents=True, exist_ok=True)
    heldout = heldout_text(zoo)
    cfg = json.loads((moe / "config.json").read_text())
    width = int(cfg["intermediate_size"])
    opts = ExecOptions(overwrite=True, show_progress=False)
    calib = Calibration(seq_len=args.seq_len, max_samples=args.max_samples, batch_size=16)

    models: dict[str, str] = {"moe": str(moe)}
    errors: dict[str, float | None] = {"moe": 0.0}
    seconds: dict[str, float] = {}
    reports: dict[str, dict] = {}
    chosen = runs(width)
    if args.only:
        prefixes = tuple(p.strip() for p in args.only.split(","))
        chosen = {k: v for k, v in chosen.items() if k.startswith(prefixes)}
    for name, kw in chosen.items():
        t = time.perf_counter()
        r = collapse(moe, work / name.replace(" ", "_").replace("=", ""),
                     calibration=args.calibration, calib=calib, options=opts, **kw)  # fmt: skip
        seconds[name] = time.perf_counter() - t
        models[name] = str(r.out)
        errors[name] = r.report.mean_error()
        reports[name] = r.report.to_dict()

    tasks = None if args.tasks == "none" else list(MC_TASKS) if args.tasks == "mc" else args.tasks
    scores = evaluate(models, text=heldout, tasks=tasks, seq_len=args.seq_len,
                      stride=args.seq_len // 2, batch_size=16, limit=args.limit,
                      zoo=zoo if tasks else None)  # fmt: skip
    for lang, text in halves(heldout).items():
        part = evaluate(models, text=text, seq_len=args.seq_len, stride=args.seq_len // 2,
                        batch_size=16)  # fmt: skip
        for name, row in part.items():
            scores[name][f"ppl {lang}"] = row["ppl"]
    for name, row in scores.items():
        row["recon error"] = errors[name] if errors[name] is not None else float("nan")
    print(format_table(scores, markdown=True))
    dense = {
        k: v["ppl"] for k, v in scores.items() if k.startswith(("uniform", "frequency", "slice"))
    }
    if "uniform" in dense:
        best = min(dense, key=dense.get)  # type: ignore[arg-type]
        print(f"\nbest dense collapse: {best} (ppl {dense[best]:.3f} vs uniform "
              f"{dense['uniform']:.3f}, {100 * (1 - dense[best] / dense['uniform']):.1f}% lower); "
              f"MoE ppl {scores['moe']['ppl']:.3f}")  # fmt: skip
    for k in (2, 3):
        pruned = {n: v["ppl"] for n, v in scores.items() if n.startswith(f"keep {k} prune")}
        if pruned:
            best = min(pruned, key=pruned.get)  # type: ignore[arg-type]
            print(f"keep {k}, pruned: lowest ppl {best} ({pruned[best]:.3f}; "
                  + ", ".join(f"{n} {v:.3f}" for n, v in pruned.items()) + ")")  # fmt: skip
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(
        json.dumps(
            dict(
                moe=str(moe),
                calibration=args.calibration,
                seq_len=args.seq_len,
                max_samples=args.max_samples,
                scores=scores,
                seconds=seconds,
                reports=reports,
                total_seconds=time.perf_counter() - start,
            ),
            indent=2,
            default=float,
        )
        + "\n"
    )
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
