"""``splice merge RECIPE OUT``: run a mergekit-style YAML recipe."""

from __future__ import annotations

import argparse
import sys

from splice.cli import (
    add_compute_options,
    add_json_option,
    add_model_options,
    add_output_options,
    positive_int,
)
from splice.merge import mergekit_flags


def add(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "merge",
        help="merge models as a YAML recipe says (mergekit recipes run unchanged)",
        description="Merge models from a YAML recipe, streaming tensor by tensor into OUT.",
        epilog="mergekit-yaml's flags are accepted too (--cuda, --out-shard-size, -j, "
        "--random-seed, --lazy-unpickle, --copy-tokenizer, ...): each sets its splice option, "
        "is ignored with a note, or is refused; see docs/merging.md",
    )
    p.add_argument(
        "recipe",
        help="YAML recipe (mergekit's schema, plus layer_path and seed; mergekit-moe's and "
        "mergekit-multi's files too)",
    )
    p.add_argument("out", nargs="?", help="output folder (written atomically)")
    # cpu, not the other verbs' auto: a seeded DARE/DELLA merge draws its masks on the tensors'
    # device and cuda's draws differ from cpu's, so a recipe and seed give one checkpoint anywhere
    add_compute_options(
        p,
        device="cpu",
        device_help="device for the arithmetic: cpu, cuda, cuda:1, ... or auto (default cpu: "
        "the same seeded merge on any machine)",
        threads_help="torch threads for the arithmetic",
    )
    p.add_argument("--workers", type=positive_int, default=2, help="tensors in flight (default 2)")
    p.add_argument("--memory", default="1GiB", help="cap on bytes held by tensors in flight")
    p.add_argument("--seed", type=int, help="seed for DARE/DELLA (overrides the recipe's)")
    p.add_argument(
        "--allow-crimes", action="store_true", help="merge models of different architectures"
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="validate and print the plan only: its tensors, then the resolved parameters (t, "
        "weight, density, ...) by layer range and tensor group",
    )
    add_json_option(
        p,
        "with --dry-run: print every tensor's resolved parameters as JSON; after a merge, "
        'the same with "out"',
    )
    p.add_argument(
        "--keep-intermediates",
        metavar="DIR",
        help="multi-document recipes (mergekit-multi): write each named document's merge to "
        "DIR/NAME and keep it (default: a temporary folder beside OUT, removed at the end)",
    )
    add_output_options(p)  # --dtype: the output's quantization (the recipe sets float dtypes)
    add_model_options(p, runs_models=True)  # a moe recipe's router runs the base model
    mergekit_flags.add_options(p)  # mergekit-yaml's, hidden from --help
    p.set_defaults(func=run_cli)


def run_cli(args: argparse.Namespace) -> None:
    from splice.cli import print_json
    from splice.errors import SpliceError
    from splice.merge.runner import MergeOptions, describe, describe_json, run

    for line in mergekit_flags.notes(args.mergekit_flags):  # a refused one raises
        print(f"splice: note: {line}", file=sys.stderr)
    device = args.device
    if args.cuda and device == "cpu":  # mergekit's --cuda; another --device wins, as mergekit's
        device = "cuda"
    if args.dtype is not None:
        raise SpliceError(
            f"--dtype {args.dtype}: a merge's float dtype is the recipe's dtype / out_dtype; "
            "--dtype takes fp8, mxfp4, keep or none here (the output's quantization)"
        )
    opts = MergeOptions(  # checks the options before the recipe is read
        device=device,
        threads=args.threads,
        workers=args.workers,
        memory_budget=_size("--memory", args.memory),
        max_shard_size=_size("--max-shard-size", args.max_shard_size),
        overwrite=args.overwrite,
        verify=not args.no_verify,
        show_progress=not args.no_progress,
        allow_pickle=args.allow_pickle,
        allow_crimes=args.allow_crimes,
        seed=args.seed,
        trust_remote_code=args.trust_remote_code,
        quantize=args.quantize,
        block_size=args.block_size,
    )
    keep = args.keep_intermediates
    if args.dry_run and args.json:
        print_json(describe_json(args.recipe, opts, keep_intermediates=keep))
        return
    if args.dry_run:
        print(describe(args.recipe, opts, keep_intermediates=keep))
        return
    if not args.out:
        raise SpliceError("give an output folder OUT (or --dry-run)")
    if args.json:  # planned before the merge: a recipe that cannot run fails first
        data = describe_json(args.recipe, opts, keep_intermediates=keep)
        out = run(args.recipe, args.out, opts, keep_intermediates=keep)
        print_json({"out": str(out), **data})
        return
    print(f"wrote {run(args.recipe, args.out, opts, keep_intermediates=keep)}")


def _size(option: str, text: str) -> int:
    """``parse_size`` with the option named in its message."""
    from splice.dtypes import parse_size
    from splice.errors import SpliceError

    try:
        return parse_size(text)
    except SpliceError as e:
        raise SpliceError(f"{option} {text}: {e}") from None
