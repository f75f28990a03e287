"""Depth surgery on the zoo's base model, scored on held-out text and the zoo's tasks.

    python examples/surgery_zoo.py [--model base] [--out DIR] [--steps 100] [--limit N] [--json F]

Rows: the base; the base pruned by 1, 2 and 3 layers chosen by angular distance, by block
influence, the last layers, and at random (the mean of --draws draws); Solar / Yi / LLaMA-Pro
expand up-scaling (to 1.5x the depth) before and after ``heal``, next to the base healed for the
same number of steps (Solar, Yi and the base: every parameter; expand: only its new blocks, as
LLaMA-Pro does). Everything goes through ``splice.surgery`` and ``splice.scoring.evaluate``
(perplexity with sliding windows; the zoo's tasks through ``splice.zoo.evaluate``). Three texts
of the zoo's pre-training distribution, drawn with their own seeds: calibration (which layers),
healing, and the held-out text the perplexity is measured on (the English documents of a built
zoo's ``text/heldout.txt`` when it has one: base and math never saw Zeta). Prints a markdown table and writes
``benchmarks/results/surgery_zoo.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(var, "1")

SEEDS = {"calibration": 99_991, "heal": 424_242, "heldout": 777_001}


def texts(zoo: Path, work: Path, args: argparse.Namespace) -> dict[str, Path]:
    """The three texts as files (the held-out one from the zoo when it ships one). Generated
    documents are joined as the zoo's training stream has them, ``doc <eos><bos> doc``, so no
    separator the models never saw (a newline) is scored."""
    from splice.modeling import load_tokenizer
    from splice.zoo import calibration_text, heldout_documents

    tok = load_tokenizer(zoo / "base")
    joiner = f"{tok.eos_token or ''}{tok.bos_token or ''}" or "\n"
    out = {}
    sizes = {"calibration": 200, "heal": args.heal_documents, "heldout": 400}
    for name, seed in SEEDS.items():
        path = work / f"{name}.txt"
        if name == "heldout" and (zoo / "text" / "heldout.txt").is_file():
            docs = heldout_documents(zoo, "en")  # base and math never saw Zeta
        else:
            docs = calibration_text(sizes[name], seed=seed).splitlines()
        path.write_text(joiner.join(docs) + "\n")
        out[name] = path
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--zoo", type=Path, help="built zoo (default: splice.zoo.default_dir())")
    ap.add_argument("--model", default="base", help="the zoo model to operate on (default base)")
    ap.add_argument("--out", type=Path, default=Path("/tmp/splice-surgery-zoo"))
    ap.add_argument("--steps", type=int, default=100, help="heal steps (default 100)")
    ap.add_argument("--lr", type=float, default=3e-4, help="heal learning rate (default 3e-4)")
    ap.add_argument("--heal-documents", type=int, default=3000, help="documents of heal text")
    ap.add_argument("--draws", type=int, default=5, help="random prunes per depth (default 5)")
    ap.add_argument("--limit", type=int, help="score only the first N items of each task")
    ap.add_argument(
        "--tasks", default="mc", help="zoo tasks: 'mc' (the multiple-choice ones), a list, 'none'"
    )
    ap.add_argument(
        "--json",
        type=Path,
        default=Path(__file__).parents[1] / "benchmarks/results/surgery_zoo.json",
    )
    args = ap.parse_args()

    import torch

    from splice.execute import ExecOptions
    from splice.scoring import evaluate, format_table
    from splice.surgery import Calibration, heal, prune, upscale
    from splice.zoo import MC_TASKS, default_dir

    torch.set_num_threads(1)
    start = time.perf_counter()
    zoo = args.zoo or default_dir()
    me = args.model
    base = zoo / me
    if not (base / "config.json").is_file() or not (zoo / "tasks").is_dir():
        sys.exit(f"{zoo}: not a built zoo; run `splice zoo build {zoo}` first")
    work = args.out
    work.mkdir(parents=True, exist_ok=True)
    text = texts(zoo, work, args)
    heldout = text["heldout"].read_text()
    opts = ExecOptions(overwrite=True, show_progress=False)
    calib = Calibration(seq_len=64, max_samples=64, batch_size=16)
    n_layers = json.loads((base / "config.json").read_text())["num_hidden_layers"]
    models: dict[str, Path] = {me: base}
    layers: dict[str, list[int]] = {me: list(range(n_layers))}

    def keep(name: str, result) -> None:
        models[name] = result.out
        layers[name] = result.report.layers

    # ---- pruning -------------------------------------------------------------------------------
    for n in (1, 2, 3):
        for by in ("angular", "influence"):
            r = prune(
                base,
                work / f"prune{n}-{by}",
                n=n,
                by=by,
                calibration=text["calibration"],
                calib=calib,
                options=opts,
            )
            keep(f"prune {n} {by}", r)
        keep(
            f"prune {n} last",
            prune(
                base,
                work / f"prune{n}-last",
                drop=list(range(n_layers - n, n_layers)),
                options=opts,
            ),
        )
        rng = random.Random(n)
        for d in range(args.draws):
            drop = sorted(rng.sample(range(n_layers), n))
            keep(
                f"prune {n} random#{d}",
                prune(base, work / f"prune{n}-rand{d}", drop=drop, options=opts),
            )

    # ---- up-scaling and healing ------------------------------------------------------------------
    heal_kw = dict(
        text=text["heal"],
        steps=args.steps,
        lr=args.lr,
        batch_size=16,
        seq_len=64,
        options=opts,
    )
    grown = {
        "solar": upscale(base, work / "solar", solar=max(1, n_layers // 4), options=opts),
        "yi": upscale(
            base,
            work / "yi",
            yi=n_layers // 2,
            calibration=text["calibration"],
            calib=calib,
            options=opts,
        ),
        "expand": upscale(base, work / "expand", expand=n_layers // 2, options=opts),
    }
    heal_seconds = {}
    for name, r in grown.items():
        keep(name, r)
        t = time.perf_counter()
        h = heal(r.out, work / f"{name}-healed", only_new_layers=name == "expand", **heal_kw)
        heal_seconds[name] = time.perf_counter() - t
        keep(f"{name} healed", h)
    t = time.perf_counter()
    keep(f"{me} healed", heal(base, work / f"{me}-healed", **heal_kw))
    heal_seconds[me] = time.perf_counter() - t

    # ---- scores ------------------------------------------------------------------------------------
    scores = evaluate(
        {k: str(v) for k, v in models.items()},
        text=heldout,
        tasks=None
        if args.tasks == "none"
        else list(MC_TASKS)
        if args.tasks == "mc"
        else args.tasks,
        seq_len=64,  # the zoo's training windows: positions past 64 were never trained
        stride=32,
        batch_size=16,
        limit=args.limit,
        zoo=zoo,
    )
    rows: dict[str, dict[str, float]] = {}
    for name, row in scores.items():
        if "random#" in name:
            continue
        rows[name] = row
        if name.endswith(" last"):
            n = name.split()[1]
            draws = [scores[f"prune {n} random#{d}"] for d in range(args.draws)]
            rows[f"prune {n} random (mean of {args.draws})"] = {
                k: statistics.mean(dr[k] for dr in draws) for k in row
            }
            # a draw that removes layer 0 is catastrophic and dominates the mean
            rows[f"prune {n} random (median of {args.draws})"] = {
                k: statistics.median(dr[k] for dr in draws) for k in row
            }
    order = [me] + [
        f"prune {n} {by}"
        for n in (1, 2, 3)
        for by in (
            "angular",
            "influence",
            "last",
            f"random (mean of {args.draws})",
            f"random (median of {args.draws})",
        )
    ]
    order += [f"{me} healed"] + [f"{g}{h}" for g in grown for h in ("", " healed")]
    table = {k: rows[k] for k in order}

    def depth(name: str) -> int:
        return len(layers[name]) if name in layers else n_layers - int(name.split()[1])

    shown = {f"{k} ({depth(k)} layers)": v for k, v in table.items()}
    print(format_table(shown, markdown=True))
    checks = []
    for n in (1, 2, 3):
        rand = rows[f"prune {n} random (mean of {args.draws})"]["ppl"]
        median = rows[f"prune {n} random (median of {args.draws})"]["ppl"]
        for by in ("angular", "influence"):
            ppl = rows[f"prune {n} {by}"]["ppl"]
            checks.append(
                {
                    "n": n,
                    "by": by,
                    "ppl": ppl,
                    "random_mean_ppl": rand,
                    "random_median_ppl": median,
                    "no_worse_than_random": ppl <= rand,
                    "no_worse_than_random_median": ppl <= median,
                }
            )
    print()
    for c in checks:
        mark = "ok" if c["no_worse_than_random"] else "WORSE"
        print(
            f"prune {c['n']} by {c['by']}: ppl {c['ppl']:.3f} vs random mean "
            f"{c['random_mean_ppl']:.3f} ({mark}), median {c['random_median_ppl']:.3f}"
        )
    seconds = time.perf_counter() - start
    print(
        f"\n{seconds:.0f} s in all (heal: {', '.join(f'{k} {v:.0f} s' for k, v in heal_seconds.items())})"
    )
    result = {
        "zoo": str(zoo),
        "model": me,
        "settings": {
            "heal_steps": args.steps,
            "heal_lr": args.lr,
            "heal_batch": 16,
            "heal_seq_len": 64,
            "heal_documents": args.heal_documents,
            "draws": args.draws,
            "limit": args.limit,
            "calibration": {"seq_len": 64, "max_samples": 64},
            "ppl": {"seq_len": 64, "stride": 32},
            "texts": {k: str(v) for k, v in text.items()},
            "seeds": SEEDS,
        },
        "layers": layers,
        "scores": scores,
        "table": table,
        "checks": checks,
        "seconds": seconds,
        "heal_seconds": heal_seconds,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.json}", file=sys.stderr)


if __name__ == "__main__":
    main()
