"""``splice tokensurgeon MODEL DONOR OUT``: a thin layer over :mod:`splice.merge.tokensurgeon`."""

from __future__ import annotations

import argparse

from splice.cli import (
    add_compute_options,
    add_json_option,
    add_model_options,
    add_output_options,
    exec_options,
    integer,
    print_json,
)

#: the methods ``--method`` offers (the registry's names, in the order of the help text)
CHOICES = ("omp", "common_interpolation", "subword", "mean", "zero")


def add_tokensurgeon(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "tokensurgeon",
        help="give a model another model's tokenizer (mergekit-tokensurgeon)",
        description="Write MODEL with DONOR's tokenizer: DONOR's tokenizer files and vocab_size; "
        "tokens both vocabularies share keep MODEL's rows of the embedding and head exactly, "
        "the others are approximated by --method; every other tensor is copied.",
        epilog="omp: orthogonal matching pursuit over the shared tokens in DONOR's embedding "
        "space, the same k coefficients applied to MODEL's rows; common_interpolation: the k "
        "nearest shared tokens there, weighted by inverse distance; subword: the mean of MODEL's "
        "rows of the pieces MODEL's tokenizer makes of the token's text; mean: MODEL's mean row; "
        "zero: zeros. Only omp and common_interpolation read DONOR's weights.",
    )
    p.add_argument("model", help="model folder or hub id whose weights are kept")
    p.add_argument("donor", help="model folder or hub id whose tokenizer the output takes")
    p.add_argument("out", help="output folder (written atomically)")
    p.add_argument(
        "--method",
        choices=CHOICES,
        default="omp",
        help="how rows of tokens MODEL lacks are made (default omp)",
    )
    p.add_argument(
        "-k",
        "--k",
        type=integer,
        default=64,
        help="shared tokens per new token for omp and common_interpolation (default 64)",
    )
    p.add_argument("--dry-run", action="store_true", help="print the plan; write nothing")
    add_compute_options(p)
    add_json_option(p)
    add_output_options(p, dtype=False)
    add_model_options(p)
    p.set_defaults(func=run_tokensurgeon)


def run_tokensurgeon(args: argparse.Namespace) -> None:
    from splice.merge.tokensurgeon import tokensurgeon

    options = exec_options(args, device=args.device)
    result = tokensurgeon(
        args.model,
        args.donor,
        args.out,
        method=args.method,
        k=args.k,
        dry_run=args.dry_run,
        options=options,
        allow_pickle=args.allow_pickle,
    )
    if args.json:
        print_json(result.to_dict())
        return
    print(result.describe() if args.dry_run else result.summary())
    if result.out is not None:
        print(f"wrote {result.out}")
