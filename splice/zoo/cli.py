"""``splice zoo build DIR`` and ``splice zoo eval MODEL...``: thin wrappers over splice.zoo."""

from __future__ import annotations

import argparse
import sys

from splice.cli import (
    Parser,
    add_json_option,
    add_model_options,
    add_scoring_options,
    checked,
    integer,
    print_json,
)
from splice.zoo.build import MAX_STEPS_SCALE, check_seed, check_steps_scale


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
        "--steps-scale",
        type=checked(check_steps_scale),
        default=1.0,
        help=f"multiply every step count, at most {MAX_STEPS_SCALE:g} (default 1)",
    )
    b.add_argument(
        "--seed",
        type=checked(check_seed, integer),
        help="seed of the build (default 0; without it a complete zoo of any seed is reused)",
    )
    b.add_argument("--force", action="store_true", help="rebuild even if DIR holds this zoo")
    b.add_argument(
        "--record-only",
        action="store_true",
        help="keep the zoo even if it misses an acceptance criterion (they are still "
        "measured, printed and recorded in zoo.json)",
    )
    b.add_argument("--no-progress", action="store_true", help="no progress output")
    b.set_defaults(func=_run_build)

    e = verbs.add_parser("eval", help="score models on the zoo's tasks (lm-eval, in process)")
    e.add_argument("models", nargs="+", metavar="MODEL", help="model folders")
    add_scoring_options(
        e,
        tasks="comma-separated: zoo_math, zoo_lang, zoo_math_lang (report splits), their "
        "*_fit fitness splits and *_gen twins, or all (default: the three report splits)",
        limit=True,
    )
    add_json_option(e, 'print {"<model>": {"<task>": acc}}')
    e.add_argument("--no-progress", action="store_true", help="no progress output")
    add_model_options(e, runs_models=True)
    e.set_defaults(func=_run_eval)


def _run_build(args: argparse.Namespace) -> None:
    import time

    from splice.errors import SpliceError
    from splice.zoo.build import build

    if args.dir is not None and not args.dir.strip():
        raise SpliceError("zoo build: the folder name is empty")
    t = time.perf_counter()
    out = build(
        args.dir,
        steps_scale=args.steps_scale,
        seed=args.seed,
        force=args.force,
        acceptance="record" if args.record_only else "enforce",
        show_progress=not args.no_progress,
    )
    from splice.zoo.build import read_stamp

    info = read_stamp(out) or {}
    report = info.get("acceptance") or {}
    verdict = (
        "every acceptance criterion met"
        if report.get("passed")
        else "acceptance criteria missed (kept: --record-only)"
    )
    print(f"zoo ready in {out} ({time.perf_counter() - t:.0f} s): {verdict}")


def _run_eval(args: argparse.Namespace) -> None:
    from splice.zoo.evaluate import evaluate, format_table, parse_tasks

    tasks = parse_tasks(args.tasks)
    scores = evaluate(
        args.models,
        tasks,
        zoo=args.zoo,
        limit=args.limit,
        show_progress=not args.no_progress,
        allow_pickle=args.allow_pickle,
        trust_remote_code=args.trust_remote_code,
    )
    if args.json:
        print_json(scores)
    else:
        print(format_table(scores))
    sys.stdout.flush()
