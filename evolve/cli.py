"""``splice evolve``: CMA-ES over merge recipes, scored by lm-eval, resumable.

splice evolve run CONFIG.yml --out RUN [--device cuda] [--max-fevals N | --generations N]
                 [--include-path DIR]
splice evolve resume RUN [--max-fevals N | --generations N]   (a budget extends the run)
splice evolve report RUN [--table]

``splice evolve CONFIG.yml --out RUN`` (no action) is ``run``. Progress goes to stderr: a bar on
a terminal, one line per generation elsewhere. SIGTERM / Ctrl-C: the line says which generation
is saved and the ``splice evolve resume RUN`` that continues it.
"""

from __future__ import annotations

import argparse
import shlex
import signal
import sys
from pathlib import Path

from splice.cli import (
    add_compute_options,
    add_deprecated_alias,
    add_json_option,
    add_scoring_options,
    positive_int,
    print_json,
)

ACTIONS = ("run", "resume", "report")


def add(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "evolve",
        help="evolve a merge recipe with CMA-ES, scored by lm-eval (mergekit-evolve configs run)",
        description="Search merge recipes with CMA-ES: candidates are merged into one resident "
        "model and scored by lm-eval in memory; RUN is written after every generation. "
        "`splice evolve run CONFIG --out RUN` starts (or continues) a search, `splice evolve "
        "resume RUN` continues a run (with --max-fevals or --generations: extends it to that "
        "budget), `splice evolve report RUN` shows it. `splice evolve CONFIG --out RUN` is `run`.",
    )
    p.add_argument(
        "config", metavar="run|resume|report", help="the action (or a config YAML: run it)"
    )
    p.add_argument(
        "run", nargs="?", metavar="CONFIG|RUN", help="run: the config YAML; resume / report: RUN"
    )
    p.add_argument("--out", help="run folder to write (a new one, or a run of the same config)")
    add_compute_options(
        p,
        device=None,
        device_help="device for merging and scoring (default: the config's)",
        threads=False,
    )
    p.add_argument(
        "--max-fevals",
        type=positive_int,
        metavar="N",
        help="stop after N candidates (whole generations); resume: extend the run to N",
    )
    p.add_argument(
        "--generations",
        type=positive_int,
        metavar="N",
        help="stop after N generations; resume: extend the run to N",
    )
    add_deprecated_alias(p, "--tasks-dir", "--include-path", metavar="DIR")
    p.add_argument(
        "--workers",
        type=positive_int,
        default=1,
        help="processes scoring candidates, one resident model each (same result; cuda: one "
        "GPU each); with --ray, the number of actors",
    )
    p.add_argument(
        "--ray",
        metavar="auto|ADDRESS",
        help="score candidates on Ray actors of the cluster at ADDRESS (the ray extra)",
    )
    p.add_argument("--top", type=positive_int, default=5, help="report: candidates to list")
    p.add_argument(
        "--table",
        action="store_true",
        help="report: score the sources, naive merges and the winner on the report tasks",
    )
    add_scoring_options(
        p, tasks="report --table: comma-separated report tasks", zoo=False, include_path=True
    )
    add_json_option(p, "print the result (run, resume) or the report as JSON")
    p.add_argument(
        "--no-progress",
        action="store_true",
        help="no progress (else a bar on a terminal, one line per generation elsewhere)",
    )
    p.add_argument(
        "--allow-pickle",
        action="store_true",
        help="read a run folder an older splice wrote (its state.pkl can run code: only for "
        "folders you trust) and pickled .bin source weights",
    )
    p.set_defaults(func=run_cli)


def run_cli(args: argparse.Namespace) -> int | None:
    from splice.errors import SpliceError

    show = not args.no_progress
    if args.config != "report":
        used = [o for o in ("table", "tasks") if getattr(args, o)]
        if used:
            action = args.config if args.config in ACTIONS else "run"
            raise SpliceError(f"splice evolve {action}: --{used[0]} is an option of report")
    if args.config == "run":
        if not args.run:
            raise SpliceError("splice evolve run CONFIG --out RUN: give the config file")
        args.config, args.run = args.run, None
    elif args.config in ACTIONS:
        if not args.run:
            raise SpliceError(f"splice evolve {args.config} RUN: give the run folder")
        fixed = ["out", "device", "include_path"]
        if args.config == "report":
            fixed += ["max_fevals", "generations"]
        extra = [o for o in fixed if getattr(args, o)]
        if extra:
            raise SpliceError(
                f"splice evolve {args.config}: --{extra[0].replace('_', '-')} does not apply "
                "(a run keeps its configuration"
                + ("; only its budget can be raised)" if args.config == "resume" else ")")
            )
        if args.config == "report":
            from splice.evolve.report import format_report, report

            rep = report(args.run, top=args.top, allow_pickle=args.allow_pickle)
            if rep.history:
                try:
                    rep.plot(rep.run / "fitness.png")
                except OSError as e:  # a run folder on a read-only disk still reports
                    import warnings

                    from splice.errors import SpliceWarning

                    warnings.warn(
                        f"{rep.run}: fitness.png not written ({e.strerror or e})",
                        SpliceWarning,
                        stacklevel=1,
                    )
            table = table_data = None
            if args.table:  # scored before anything is printed: a failure prints nothing
                from splice.evolve.report import format_table, grid_standing, report_table

                tasks = [t for t in (args.tasks or "").split(",") if t.strip()] or None
                table_data = report_table(args.run, tasks)
                standing = grid_standing(table_data)
                table = "\n".join(
                    [format_table(table_data), *(["", *standing] if standing else [])]
                )
            if args.json:
                import dataclasses

                data = dataclasses.asdict(rep)
                data["table"] = table_data
                print_json(data)
                return
            print(format_report(rep))
            if table is not None:
                print("\nreport split:\n" + table)
            return
        from splice.evolve.search import resume

        try:
            result = resume(
                args.run,
                max_fevals=args.max_fevals,
                generations=args.generations,
                show_progress=show,
                workers=args.workers,
                ray=args.ray,
                allow_pickle=args.allow_pickle,
            )
        except KeyboardInterrupt as e:  # SIGTERM / SIGHUP too (splice.cli.Terminated)
            return _stopped(args.run, e)
        _summary(result, args.json)
        return None
    if args.run:
        raise SpliceError(f"unexpected argument {args.run!r}; give the run folder with --out")
    if not args.out:
        raise SpliceError("give the run folder with --out RUN")
    from splice.evolve.search import evolve

    try:
        result = evolve(
            args.config,
            args.out,
            max_fevals=args.max_fevals,
            generations=args.generations,
            device=args.device,
            tasks_dir=args.include_path,
            show_progress=show,
            workers=args.workers,
            ray=args.ray,
            allow_pickle=args.allow_pickle,
        )
    except KeyboardInterrupt as e:
        return _stopped(args.out, e)
    _summary(result, args.json)
    return None


def stopped_line(run: str | Path, why: str) -> str | None:
    """What a search stopped by ``why`` (``SIGTERM``) left: the generation saved in ``run``
    and the command that continues it; ``None`` when ``run`` holds no run (it never began)."""
    from splice.errors import SpliceError
    from splice.evolve.search import load_state

    try:
        state = load_state(run)
    except SpliceError:
        return None
    gen, total = state["generation"], state["generations"]
    saved = f"after generation {gen}/{total}" if gen else f"before generation 1/{total} finished"
    return (
        f"splice: stopped by {why} {saved} (saved in {run}); continue with: "
        f"splice evolve resume {shlex.quote(str(run))}"
    )


def _stopped(run: str, e: KeyboardInterrupt) -> int:
    """Print :func:`stopped_line` and return the exit code (128 + the signal's number); with no
    run to continue, ``splice.cli``'s own line."""
    signum = getattr(e, "signum", signal.SIGINT)  # splice.cli.Terminated has one
    line = stopped_line(run, signal.Signals(signum).name)
    if line is None:
        raise e
    print(line, file=sys.stderr)
    return 128 + signum


def _summary(result, as_json: bool = False) -> None:
    if as_json:
        import dataclasses

        data = dataclasses.asdict(result)
        data["best_recipe_path"] = str(result.run / "best.yml")
        print_json(data)
        return
    best = "none" if result.best_fitness is None else f"{result.best_fitness:.4f}"
    print(
        f"{result.run}: {result.generation}/{result.generations} generations, "
        f"{result.evaluations} candidates, best fitness {best}; best recipe {result.run / 'best.yml'}"
    )
