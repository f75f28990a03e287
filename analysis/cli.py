"""``splice analyze weights|experts|activations``: thin wrappers over splice.analysis.

Each verb calls one public function, saves the report into ``--out`` (JSON, CSV, PNG) and
prints its summary table (``--json``: the report's data).
"""

from __future__ import annotations

import argparse
import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

from splice.cli import (
    Parser,
    add_calibration_options,
    add_compute_options,
    add_deprecated_alias,
    add_json_option,
    add_model_options,
    positive_int,
    print_json,
)
from splice.errors import SpliceError


def add(sub: argparse._SubParsersAction) -> None:
    """Register ``splice analyze`` and its three sub-verbs."""
    p = sub.add_parser(
        "analyze",
        help="per-layer similarities (weights, MoE experts, activations) with null baselines",
        description="Compare weights across models, across layers, or MoE experts against a "
        "dense model; or measure layer redundancy on calibration text. Every number comes with "
        "a null baseline (a Gaussian matrix of the same shape and norm; an unrelated layer).",
    )
    verbs = p.add_subparsers(dest="analysis", metavar="ANALYSIS", parser_class=Parser)
    verbs.required = True

    w = verbs.add_parser(
        "weights",
        help="A vs B layer by layer, or (one model) every layer vs every layer",
        description="With two models: per-tensor metrics between A and B (same architecture). "
        "With one: a layers × layers matrix per tensor kind, and exact duplicate layers.",
    )
    w.add_argument("model", help="model folder (A)")
    w.add_argument("other", nargs="?", help="second model folder (B), same architecture")
    _common(w)
    w.add_argument("--kinds", help="comma-separated tensor kinds to compare (default: all)")
    add_model_options(w)
    w.set_defaults(func=_locked(_run_weights))

    e = verbs.add_parser(
        "experts",
        help="each MoE expert vs the dense MLP at its layer, and expert vs expert",
        description="Compare every expert of every layer of MOE with DENSE's MLP at the same "
        "layer (if given) and with the other experts of its layer.",
    )
    e.add_argument("moe", help="MoE model folder (e.g. Mixtral)")
    e.add_argument("dense", nargs="?", help="dense model folder the experts may come from")
    _common(e)
    add_model_options(e)
    e.set_defaults(func=_locked(_run_experts))

    t = verbs.add_parser(
        "tasks",
        help="task vectors of fine-tunes against their base: norms, cosine, sign conflicts",
        description="Per layer and tensor kind, the task vectors A - BASE, B - BASE, ...: their "
        "norms, pairwise cosine, sign-conflict fraction, overlap of the top-k largest entries, "
        "and (two or more) the fraction disagreeing with TIES's elected sign, each with the "
        "value for an independent Gaussian task vector as null.",
    )
    t.add_argument("base", help="base model folder")
    t.add_argument("models", nargs="*", help="fine-tuned model folders (same architecture)")
    t.add_argument(
        "--top-k",
        type=float,
        default=0.1,
        help="fraction of entries in each top-k set, in (0, 1] (default 0.1)",
    )
    t.add_argument("--kinds", help="comma-separated tensor kinds to compare (default: all)")
    t.add_argument("--no-baselines", action="store_true", help="skip the null baselines")
    _common(t, metrics=False)
    add_model_options(t)
    t.set_defaults(func=_locked(_run_tasks))

    a = verbs.add_parser(
        "activations",
        help="layer input/output cosine, block influence, angular distance on calibration text",
        description="Run MODEL on calibration text and report, per layer, the input/output "
        "hidden-state cosine (first token excluded), ShortGPT's block influence, and Gromov "
        "et al.'s angular distance between layers l and l+n on the last token, with the block "
        "to prune for each n and the range to duplicate for depth up-scaling.",
    )
    a.add_argument("model", help="model folder")
    add_calibration_options(
        a,
        required=True,
        help="a text file, 'lm-eval:TASK' (an lm-eval task's documents), 'zoo' (English) "
        "or 'zoo:both' (English and Zeta)",
        seq_len_type=_seq_len,
        seq_len_help="tokens per window, 2 or more (default 128)",
    )
    add_deprecated_alias(a, "--dtype", "--calibration-dtype")
    a.add_argument(
        "--last-before-norm",
        action="store_true",
        help="take the last layer's output before the final norm (default: after it, HF's "
        "hidden_states[-1], as PruneMe and ShortGPT)",
    )
    a.add_argument(
        "--compare",
        metavar="B",
        help="a second model (same tokenizer, depth and width): report the linear CKA and "
        "cosine of the two models' hidden states per layer instead",
    )
    _common(a, metrics=False)
    add_model_options(a, runs_models=True)
    a.set_defaults(func=_locked(_run_activations))


def _common(p: argparse.ArgumentParser, *, metrics: bool = True) -> None:
    p.add_argument("--out", help="folder for report.json, records.csv, matrices/ and PNGs")
    p.add_argument(
        "--overwrite", action="store_true", help="replace --out if it holds an earlier report"
    )
    if metrics:
        from splice.analysis.metrics import DEFAULT_METRICS, METRICS

        p.add_argument(
            "--metrics",
            help=f"comma-separated from {', '.join(METRICS.names())}, or 'all' "
            f"(default: {','.join(DEFAULT_METRICS)})",
        )
        p.add_argument(
            "--no-baselines", action="store_true", help="skip the null baselines (faster)"
        )
    add_compute_options(
        p,
        threads_help="torch CPU threads for every tensor (default: one for small tensors, "
        "torch's choice for large ones)",
    )
    add_json_option(p, "print the report as JSON instead of its table (--out still saved)")
    p.add_argument("--no-figures", action="store_true", help="write no PNG")
    p.add_argument(
        "--scale",
        choices=("shared", "fixed", "auto"),
        default="shared",
        help="heatmap colours: one range for all panels of a figure (shared, default), the "
        "metric's natural range, e.g. [-1, 1] for cosine (fixed), or each panel its own (auto)",
    )
    p.add_argument(
        "--no-progress",
        action="store_true",
        help="no progress output (a bar on a terminal, a line every 30 s elsewhere)",
    )


def _seq_len(text: str) -> int:
    value = positive_int(text)
    if value < 2:
        raise argparse.ArgumentTypeError(f"{text!r} must be 2 or more")
    return value


def _locked(run: Callable[[argparse.Namespace], Any]) -> Callable[[argparse.Namespace], Any]:
    """``run`` holding ``--out``'s lock (:func:`splice.target.lock_target`) from its check to the
    report's save: a second run into the same folder is refused at once, before any work."""

    @functools.wraps(run)
    def locked(args: argparse.Namespace) -> Any:
        if args.out is None:
            return run(args)
        if not args.out.strip():
            raise SpliceError("--out is empty: give a folder name")
        from splice.target import lock_target

        with lock_target(args.out):
            return run(args)

    return locked


def _setup(args: argparse.Namespace) -> str:
    """Check ``--out`` and ``--device`` before any work; set threads; the device to use."""
    import torch

    from splice.analysis.report import check_out
    from splice.devices import resolve_device
    from splice.malloc import pin_mmap_threshold
    from splice.target import clean_stale

    if args.out is not None:
        clean_stale(Path(args.out))  # first: it may put back a report a killed run set aside
        check_out(args.out, overwrite=args.overwrite)
    device = resolve_device(args.device)
    pin_mmap_threshold()  # many temporaries of varied sizes: keep the heap from fragmenting
    if args.threads:
        torch.set_num_threads(args.threads)
    return device


def _finish(report: Any, args: argparse.Namespace, summary: Any = None) -> None:
    if args.out is not None:
        report.save(
            args.out,
            figures=not args.no_figures,
            overwrite=args.overwrite,
            scale=getattr(args, "scale", "shared"),
        )
    if args.json:
        data = report.to_dict()
        data["out"] = args.out
        print_json(data)
        return
    print(summary(report) if summary is not None else report.summary())
    if args.out is not None:
        print(f"wrote {args.out}")


def _run_weights(args: argparse.Namespace) -> None:
    from splice.analysis.weights import compare_layers, compare_models

    device = _setup(args)
    kinds = [k.strip() for k in args.kinds.split(",")] if args.kinds is not None else None
    common = dict(
        metrics=args.metrics,
        device=device,
        baselines=not args.no_baselines,
        kinds=kinds,
        show_progress=not args.no_progress,
        allow_pickle=args.allow_pickle,
        threads=args.threads,
    )
    if args.other:
        report = compare_models(args.model, args.other, **common)
    else:
        report = compare_layers(args.model, **common)
    _finish(report, args)


def _run_experts(args: argparse.Namespace) -> None:
    from splice.analysis.weights import compare_experts

    device = _setup(args)
    report = compare_experts(
        args.moe,
        args.dense,
        metrics=args.metrics,
        device=device,
        baselines=not args.no_baselines,
        show_progress=not args.no_progress,
        allow_pickle=args.allow_pickle,
        threads=args.threads,
    )
    _finish(report, args)


def _run_activations(args: argparse.Namespace) -> None:
    from splice.analysis.activations import analyze_activations

    if args.compare:
        return _run_compare(args)
    device = _setup(args)
    report = analyze_activations(
        args.model,
        args.calibration,
        seq_len=args.seq_len,
        max_samples=args.max_samples,
        batch_size=args.batch_size,
        device=device,
        dtype=args.calibration_dtype,
        trust_remote_code=args.trust_remote_code,
        allow_pickle=args.allow_pickle,
        include_path=args.include_path,
        show_progress=not args.no_progress,
        final_norm=not args.last_before_norm,
        threads=args.threads,
    )
    _finish(report, args)


def _run_tasks(args: argparse.Namespace) -> None:
    from splice.analysis import tasks

    device = _setup(args)
    kinds = [k.strip() for k in args.kinds.split(",")] if args.kinds is not None else None
    report = tasks.task_vectors(
        args.base,
        args.models,
        top_k=args.top_k,
        device=device,
        baselines=not args.no_baselines,
        kinds=kinds,
        show_progress=not args.no_progress,
        allow_pickle=args.allow_pickle,
        threads=args.threads,
    )
    _finish(report, args, tasks.summary)


def _run_compare(args: argparse.Namespace) -> None:
    from splice.analysis import compare

    device = _setup(args)
    report = compare.compare_activations(
        args.model,
        args.compare,
        args.calibration,
        seq_len=args.seq_len,
        max_samples=args.max_samples,
        batch_size=args.batch_size,
        device=device,
        dtype=args.calibration_dtype,
        trust_remote_code=args.trust_remote_code,
        allow_pickle=args.allow_pickle,
        include_path=args.include_path,
        show_progress=not args.no_progress,
        threads=args.threads,
    )
    _finish(report, args, compare.summary)
