"""The evolve path on the zoo: what one candidate costs to merge, next to what it costs to score.

An evolutionary search merges each candidate into one resident model (``merge_into`` from
``ResidentCheckpoint`` sources, a prepared plan) and then scores it on a zoo task. This measures
the first merge (reads the sources from disk), the later ones (read nothing), a re-planned
candidate (new weights: plans again on the resident sources) and one evaluation of one zoo task.

    python benchmarks/evolve_path.py [--repeat 10] [--task zoo_math_lang] [--device cpu]

Writes benchmarks/results/evolve_path.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from splice.merge import MergeOptions, merge_into, plan
from splice.resident import ResidentCheckpoint, empty_model
from splice.zoo import evaluate
from splice.zoo.build import default_dir

RESULTS = Path(__file__).parent / "results"


def ties(zoo: Path, w_lang: float) -> dict:
    return {
        "merge_method": "ties",
        "base_model": str(zoo / "base"),
        "models": [
            {"model": str(zoo / "math"), "parameters": {"weight": 1.0, "density": 0.7}},
            {"model": str(zoo / "lang"), "parameters": {"weight": w_lang, "density": 0.7}},
        ],
        "parameters": {"normalize": False},
        "dtype": "float32",
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=10)
    ap.add_argument("--task", default="zoo_math_lang")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    zoo = default_dir()
    opts = MergeOptions(device=args.device, show_progress=False, threads=args.threads)
    sources = {
        str(zoo / n): ResidentCheckpoint(zoo / n, device=args.device)
        for n in ("base", "math", "lang")
    }
    p = plan(ties(zoo, 1.0), opts, sources)
    model = empty_model(p.config, device=args.device)

    t = time.perf_counter()
    merge_into(model, p, options=opts)
    first = time.perf_counter() - t
    read_after_first = sum(s.bytes_read for s in sources.values())
    later = []
    for _ in range(args.repeat):
        t = time.perf_counter()
        merge_into(model, p, options=opts)
        later.append(time.perf_counter() - t)
    replanned = []
    for i in range(args.repeat):
        t = time.perf_counter()
        merge_into(model, ties(zoo, 0.5 + i / (2 * args.repeat)), sources, options=opts)
        replanned.append(time.perf_counter() - t)
    t = time.perf_counter()
    scores = evaluate({"candidate": model}, [args.task], zoo=zoo, show_progress=False)
    score_s = time.perf_counter() - t

    result = {
        "zoo": str(zoo),
        "device": args.device,
        "threads": args.threads,
        "recipe": "ties, 3 zoo models, float32",
        "first_merge_s": first,
        "later_merge_s_median": statistics.median(later),
        "replanned_merge_s_median": statistics.median(replanned),
        "bytes_read_by_later_merges": sum(s.bytes_read for s in sources.values())
        - read_after_first,
        "eval_task": args.task,
        "eval_s": score_s,
        "eval_score": scores["candidate"][args.task],
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "evolve_path.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"first merge_into      {first:7.3f} s (reads the sources)")
    print(f"later merge_into      {result['later_merge_s_median']:7.3f} s (median, reads nothing)")
    print(f"re-planned candidate  {result['replanned_merge_s_median']:7.3f} s (median)")
    print(f"one {args.task} eval {score_s:7.3f} s (score {result['eval_score']:.3f})")


if __name__ == "__main__":
    main()
