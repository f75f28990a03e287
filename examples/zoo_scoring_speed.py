"""How fast lm-eval scores a zoo model in process: loglikelihood requests per second.

    python examples/zoo_scoring_speed.py [--task zoo_math_lang] [--model math]
        [--batch-sizes 16,64,256,1024] [--threads 1]

The path a search takes (:class:`splice.zoo.Scorer`): the task is loaded once, the model is a
live module (here loaded from the zoo; a search merges into one with ``merge_into``), and
``HFLM`` wraps it for every scoring. One request is one (prompt, choice) pair; the figure is
the best of 3 runs per batch size after a warm-up. The README's throughput figure comes from
here.
"""

from __future__ import annotations

import argparse
import os

for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(var, "1")


def main() -> None:
    from splice.modeling import load_causal_lm
    from splice.zoo import default_dir, throughput

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--task", default="zoo_math_lang")
    ap.add_argument("--model", default="math", help="a zoo model (base, math, lang, moe)")
    ap.add_argument("--batch-sizes", default="16,64,256,1024")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    zoo = default_dir()
    model = load_causal_lm(zoo / args.model)
    rows = throughput(
        model,
        args.task,
        batch_sizes=[int(b) for b in args.batch_sizes.split(",")],
        zoo=zoo,
        threads=args.threads,
    )
    print(f"{args.model} on {args.task}, {args.threads} thread(s), in process (HFLM, live module)")
    print("| batch size | requests | seconds | requests/s | items/s |")
    print("|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['batch_size']} | {r['requests']} | {r['seconds']} | {r['requests_per_s']} "
            f"| {r['items_per_s']} |"
        )


if __name__ == "__main__":
    main()
