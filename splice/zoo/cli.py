"""``splice zoo build DIR`` and ``splice zoo eval MODEL...``: thin wrappers over splice.zoo."""

from __future__ import annotations

import argparse
import sys

from splice.cli import Parser, print_json


def add(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "zoo",
        help="build the zoo of tiny trained models and score models on its tasks",
        description="The zoo: tiny Llama models (base, math, lang, moe) and lm-eval tasks.",
    )
    verbs = p.add_subparsers(dest="zoo_verb", metavar="VERB", parser_class=Parser)
    verbs.required = True

    b = verbs.add_parser("build", help="train the zoo into DIR (reused when already built)")
    b.add_argument("dir", nargs="?", help="output folder (default: splice.zoo.default_dir())")
    b.add_argument(
        "--steps-scale", type=float, default=1.0, help="multiply every step count (default 1)"
    )
    b.add_argument("--force", action="store_true", help="rebuild even if DIR holds this zoo")
    b.add_argument("--no-progress", action="store_true", help="no progress output")
    b.set_defaults(func=_run_build)

    e = verbs.add_parser("eval", help="score models on the zoo's tasks (lm-eval, in process)")
    e.add_argument("models", nargs="+", metavar="MODEL", help="model folders")
    e.add_argument(
        "--tasks",
        help="comma-separated: zoo_math, zoo_lang, zoo_math_lang, their *_gen twins, or all "
        "(default: the three multiple-choice tasks)",
    )
    e.add_argument("--zoo", help="built zoo whose tasks to use (default: the shared zoo)")
    e.add_argument("--limit", type=int, help="score only the first N items of each task")
    e.add_argument("--json", action="store_true", help='print {"<model>": {"<task>": acc}}')
    e.add_argument("--no-progress", action="store_true", help="no progress output")
    e.set_defaults(func=_run_eval)


def _run_build(args: argparse.Namespace) -> None:
    import time

    from splice.zoo.build import build

    t = time.perf_counter()
    out = build(
        args.dir, steps_scale=args.steps_scale, force=args.force, show_progress=not args.no_progress
    )
    print(f"zoo ready in {out} ({time.perf_counter() - t:.0f} s)")


def _run_eval(args: argparse.Namespace) -> None:
    from splice.zoo.evaluate import evaluate, format_table, parse_tasks

    tasks = parse_tasks(args.tasks)
    scores = evaluate(
        args.models, tasks, zoo=args.zoo, limit=args.limit, show_progress=not args.no_progress
    )
    if args.json:
        print_json(scores)
    else:
        print(format_table(scores))
    sys.stdout.flush()
