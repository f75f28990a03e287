"""``splice extract-lora FINETUNE BASE OUT``: a fine-tune's change as a PEFT LoRA adapter."""

from __future__ import annotations

import argparse

from splice.cli import add_compute_options, add_json_option, add_model_options, integer, number


def add_extract_lora(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "extract-lora",
        help="extract a fine-tune's difference from its base as a PEFT LoRA adapter",
        description="Stream FINETUNE and BASE one weight at a time; every changed Linear weight's "
        "delta becomes a rank-R LoRA (truncated SVD: B = U*sqrt(S), A = sqrt(S)*V^T, lora_alpha "
        "= r so the scale is 1); changed embeddings, head and other modules are saved whole "
        "(modules_to_save). OUT is a folder that peft.PeftModel.from_pretrained(base, OUT) "
        "loads. The options are mergekit-extract-lora's (its long names work too).",
    )
    p.add_argument("finetune", help="fine-tuned model folder or hub id")
    p.add_argument("base", help="its base model folder or hub id")
    p.add_argument("out", help="adapter folder to write (atomically)")
    p.add_argument(
        "--rank", "--max-rank", type=integer, required=True, metavar="R", help="LoRA rank"
    )
    p.add_argument(
        "--sv-epsilon",
        type=number,
        default=0.0,
        metavar="E",
        help="keep only singular values above E (absolute, as mergekit): modules get ranks "
        "below R, written in PEFT's rank_pattern (default 0)",
    )
    p.add_argument(
        "--distribute-scale",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="sqrt(S) on both factors (default); --no-distribute-scale: B = U, A = S*V^T",
    )
    p.add_argument(
        "--embed-lora",
        action="store_true",
        help="low-rank embeddings and head too (default: saved whole if changed)",
    )
    p.add_argument(
        "--save-module",
        action="append",
        metavar="M",
        help="save module M whole (a full name, or a last name part like lm_head); repeatable",
    )
    p.add_argument(
        "--include",
        "--include-regex",
        action="append",
        metavar="RE",
        help="consider only modules whose name matches RE (re.search); repeatable",
    )
    p.add_argument(
        "--exclude",
        "--exclude-regex",
        action="append",
        metavar="RE",
        help="leave out modules whose name matches RE; repeatable",
    )
    p.add_argument(
        "--skip-undecomposable",
        action="store_true",
        help="leave out changed modules that are neither Linear nor embeddings (norms, ...) "
        "instead of saving them whole",
    )
    p.add_argument(
        "--svd",
        choices=("auto", "exact", "randomized"),
        default="auto",
        help="auto (default): randomized SVD for large matrices at small rank, else exact",
    )
    p.add_argument(
        "--adapter-dtype",
        metavar="DTYPE",
        help="the adapter's dtype: bfloat16, float16, float32 (default: the fine-tune's)",
    )
    add_compute_options(p)
    add_json_option(p, "print the per-module report as JSON")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it is an adapter")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_model_options(p)
    p.set_defaults(func=_run_extract_lora)


def _run_extract_lora(args: argparse.Namespace) -> None:
    from splice.cli import print_json
    from splice.merge.extract_lora import extract_lora

    report = extract_lora(
        args.finetune,
        args.base,
        args.out,
        rank=args.rank,
        sv_epsilon=args.sv_epsilon,
        embed_lora=args.embed_lora,
        save_modules=args.save_module or (),
        include=args.include or (),
        exclude=args.exclude or (),
        distribute_scale=args.distribute_scale,
        skip_undecomposable=args.skip_undecomposable,
        svd=args.svd,
        dtype=args.adapter_dtype,
        device=args.device,
        threads=args.threads,
        overwrite=args.overwrite,
        show_progress=not args.no_progress,
        allow_pickle=args.allow_pickle,
    )
    if args.json:
        print_json(report.to_dict())
    else:
        print(report.summary())
        print(f"wrote {args.out}")
