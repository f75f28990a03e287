"""``splice upscale``, ``splice prune`` and ``splice heal``: thin layers over splice.surgery."""

from __future__ import annotations

import argparse
from typing import Any

from splice.cli import (
    add_calibration_options,
    add_compute_options,
    add_deprecated_alias,
    add_json_option,
    add_model_options,
    add_output_options,
    add_scoring_options,
    exec_options,
    integer,
    number,
    positive_int,
    print_json,
)


def _calibration_options(p: argparse.ArgumentParser, used_by: str) -> None:
    add_calibration_options(
        p,
        used_by=used_by,
        seq_len_help="tokens per window, of the calibration and of --ppl (default 128)",
    )


def _last_layer_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--last-before-norm",
        action="store_true",
        help="measure the last layer's output before the final norm (default: after it, HF's "
        "hidden_states[-1], as PruneMe and ShortGPT)",
    )


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="model folder or hub id")
    p.add_argument("out", nargs="?", help="output folder (written atomically)")
    p.add_argument("--dry-run", action="store_true", help="print the plan; write nothing")
    _score_options(p)
    add_compute_options(p)
    add_json_option(p)
    add_output_options(p)
    add_model_options(p, runs_models=True)


def _score_options(p: argparse.ArgumentParser) -> None:
    add_scoring_options(
        p,
        ppl="after writing, score the source and the output: perplexity on this text",
        tasks="after writing, score the source and the output on these zoo tasks",
    )


def add_upscale(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "upscale",
        help="grow a model in depth: SOLAR, Yi, duplicate, LLaMA-Pro expand, any layer list",
        description="Depth up-scaling of one model, with exactly one mode. Several models' "
        "layers in one stack: a mergekit `slices` recipe through `splice merge` does that.",
    )
    _common(p)
    m = p.add_argument_group("modes (exactly one)")
    m.add_argument(
        "--solar",
        type=int,
        metavar="M",
        help="SOLAR: two copies, the first without its last M layers, the second without its "
        "first M (n=32, M=8: 0:24,8:32)",
    )
    m.add_argument(
        "--yi",
        type=int,
        metavar="K",
        help="Yi: duplicate the K consecutive layers whose mean input/output cosine on "
        "--calibration is highest",
    )
    m.add_argument("--duplicate", metavar="A:B", help="duplicate layers [A, B) in place")
    m.add_argument(
        "--expand",
        type=int,
        metavar="N",
        help="LLaMA-Pro: N new blocks spread evenly, copies with o_proj/down_proj zeroed "
        "(the output computes the source's function)",
    )
    m.add_argument(
        "--layers",
        metavar="SPEC",
        help="explicit layer list of this model: comma-separated indices and half-open ranges "
        "A:B (B not included), in output order, repeats allowed, e.g. 0:24,8:32",
    )
    _calibration_options(p, "--yi")
    _last_layer_option(p)
    p.set_defaults(func=_run_upscale)


def add_prune(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "prune",
        help="remove layers: by angular distance, block influence, or as given",
        description="Remove N layers chosen on calibration text (--by angular: the contiguous "
        "block with the smallest angular distance between its input and output, last token; "
        "--by influence: the N layers of lowest block influence 1 - cos(in, out)), or the "
        "layers of --drop.",
    )
    _common(p)
    p.add_argument("--n", type=positive_int, metavar="N", help="number of layers to remove")
    p.add_argument("--by", choices=("angular", "influence"), help="metric (default angular)")
    p.add_argument(
        "--drop",
        metavar="LAYERS",
        help="remove exactly these layers: comma-separated indices and half-open ranges A:B "
        "as upscale --layers takes them (B not included: 3:5,7 removes 3, 4 and 7)",
    )
    _calibration_options(p, "--n")
    _last_layer_option(p)
    p.set_defaults(func=_run_prune)


def add_heal(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "heal",
        help="short causal-LM fine-tune after surgery (full, new layers only, or LoRA merged)",
        description="Fine-tune MODEL on a text for a few steps and write a standard checkpoint "
        "(LoRA adapters merged back).",
    )
    p.add_argument("model", help="model folder")
    p.add_argument("out", help="output folder (written atomically)")
    add_calibration_options(
        p,
        help="training text (required): a file, 'lm-eval:TASK' or 'zoo'",
        seq_len_help="tokens per window (128)",
        batch_help="windows per step (8)",
        max_samples=False,
        include_path=False,
        calibration_dtype=False,
    )
    add_deprecated_alias(p, "--text", "--calibration", metavar="FILE")
    p.add_argument("--steps", type=positive_int, required=True, help="optimizer steps")
    p.add_argument("--lr", type=number, default=1e-4, help="peak learning rate, at most 1 (1e-4)")
    p.add_argument("--warmup", type=integer, help="warm-up steps (default: a tenth of --steps)")
    p.add_argument("--weight-decay", type=number, default=0.0, help="AdamW weight decay, 0-1 (0)")
    p.add_argument("--seed", type=integer, default=0, help="seed for windows and LoRA init (0)")
    p.add_argument(
        "--only-new-layers",
        action="store_true",
        help="train only the blocks up-scaling added (from the input's splice_surgery.json)",
    )
    p.add_argument(
        "--train-layers",
        metavar="LAYERS",
        help="train only these layers: indices and half-open ranges A:B, e.g. 4,5 or 4:6",
    )
    p.add_argument(
        "--lora",
        type=positive_int,
        metavar="R",
        help="rank-R LoRA (peft), merged back; R at most the smallest side of the adapted matrices",
    )
    p.add_argument("--lora-alpha", type=number, help="LoRA alpha (default 2R)")
    p.add_argument(
        "--max-tokens", type=positive_int, default=2_000_000, help="text tokens read (2M)"
    )
    p.add_argument("--train-dtype", default="float32", help="dtype to train in (float32)")
    _score_options(p)
    add_compute_options(p)
    add_json_option(p)
    add_output_options(p)
    add_model_options(p, runs_models=True)
    p.set_defaults(func=_run_heal)


# ---- handlers ---------------------------------------------------------------------------------
def _calibration(args: argparse.Namespace) -> Any:
    if args.calibration is None:
        return None
    from splice.surgery.calibration import Calibration

    return Calibration(
        seq_len=args.seq_len,
        max_samples=args.max_samples,
        batch_size=args.batch_size,
        device=args.device,
        dtype=args.calibration_dtype,
        include_path=args.include_path,
        show_progress=not args.no_progress,
        final_norm=not getattr(args, "last_before_norm", False),
    )


def _scoring(args: argparse.Namespace) -> dict[str, Any]:
    """What ``--ppl`` / ``--tasks`` / ``--zoo`` ask :func:`splice.scoring.evaluate` for."""
    return dict(
        text=args.ppl_text,
        tasks=args.tasks,
        zoo=args.zoo,
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        allow_pickle=args.allow_pickle,
        trust_remote_code=args.trust_remote_code,
        text_name=f"--ppl {args.ppl}: the text",
    )


def _check_scoring(args: argparse.Namespace) -> None:
    """``--ppl`` / ``--tasks`` / ``--zoo`` score the output once it is written: check them on
    the source (:func:`splice.scoring.check_scoring`: the file, its length in windows, the task
    names, the zoo) before any work, so a bad one never leaves a written OUT behind."""
    args.ppl_text = None
    if args.dry_run or not (args.ppl or args.tasks):
        return
    from splice.scoring import check_scoring, read_text

    if args.ppl:
        args.ppl_text = read_text(args.ppl)
    check_scoring({"source": args.model}, **_scoring(args))


def _finish(result: Any, args: argparse.Namespace) -> None:
    if not args.dry_run and (args.ppl or args.tasks):
        result.score(device=args.device, **_scoring(args))
    if args.json:
        data = result.report.to_dict()
        data["out"] = str(result.out) if result.out is not None else None
        print_json(data)
        return
    print(result.describe() if args.dry_run else result.report.summary())
    if result.out is not None:
        print(f"wrote {result.out}")


def _check_out(args: argparse.Namespace) -> None:
    from splice.errors import SpliceError

    if not args.dry_run and not args.out:
        raise SpliceError("give an output folder OUT (or --dry-run)")
    if args.dry_run and (args.ppl or args.tasks):
        raise SpliceError("--ppl / --tasks score the written output; a --dry-run writes none")
    _check_scoring(args)


def _run_upscale(args: argparse.Namespace) -> None:
    from splice.surgery.upscale import upscale

    _check_out(args)
    result = upscale(
        args.model,
        args.out,
        dry_run=args.dry_run,
        options=exec_options(args),
        solar=args.solar,
        yi=args.yi,
        duplicate=args.duplicate,
        expand=args.expand,
        layers=args.layers,
        calibration=args.calibration,
        calib=_calibration(args),
        dtype=args.dtype,
        allow_pickle=args.allow_pickle,
        trust_remote_code=args.trust_remote_code,
    )
    _finish(result, args)


def _run_prune(args: argparse.Namespace) -> None:
    from splice.surgery.prune import prune

    _check_out(args)
    result = prune(
        args.model,
        args.out,
        dry_run=args.dry_run,
        options=exec_options(args),
        n=args.n,
        by=args.by,
        calibration=args.calibration,
        drop=args.drop,
        calib=_calibration(args),
        dtype=args.dtype,
        allow_pickle=args.allow_pickle,
        trust_remote_code=args.trust_remote_code,
    )
    _finish(result, args)


def _run_heal(args: argparse.Namespace) -> None:
    from splice.errors import SpliceError
    from splice.surgery.heal import heal

    if args.calibration is None:
        raise SpliceError("heal: give the training text with --calibration FILE")
    args.dry_run = False
    _check_scoring(args)
    result = heal(
        args.model,
        args.out,
        text=args.calibration,
        steps=args.steps,
        lr=args.lr,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        warmup=args.warmup,
        weight_decay=args.weight_decay,
        seed=args.seed,
        only_new_layers=args.only_new_layers,
        train_layers=args.train_layers,
        lora=args.lora,
        lora_alpha=args.lora_alpha,
        max_tokens=args.max_tokens,
        device=args.device,
        train_dtype=args.train_dtype,
        dtype=args.dtype,
        options=exec_options(args),
        allow_pickle=args.allow_pickle,
        trust_remote_code=args.trust_remote_code,
        show_progress=not args.no_progress,
    )
    _finish(result, args)


# ---- splice slice -------------------------------------------------------------------------
def add_slice(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "slice",
        help="SliceGPT: rotate the residual stream into its PCA basis, delete trailing dims",
        description="Fold the RMSNorm scales into the linears they feed, rotate the residual "
        "stream into the PCA basis of its normed activations on --calibration, and delete the "
        "last dimensions. --basis per-layer is SliceGPT (a basis per block, shortcut matrices "
        "between blocks: load with splice.surgery.load_sliced); --basis shared writes a "
        "standard checkpoint of the same family with a smaller hidden_size.",
    )
    _common(p)
    p.add_argument(
        "--sparsity",
        type=number,
        default=0.25,
        help="fraction of the hidden dims to delete, in [0, 1) (default 0.25)",
    )
    p.add_argument(
        "--basis",
        choices=("per-layer", "shared"),
        default="per-layer",
        help="a PCA basis per block input (SliceGPT) or one for the whole stream (default "
        "per-layer)",
    )
    p.add_argument(
        "--pca-of",
        choices=("normed", "raw"),
        default="normed",
        help="PCA of the stream with each token scaled to rms 1 (what the readers see; "
        "default) or as it is (SliceGPT)",
    )
    _calibration_options(p, "required")
    p.set_defaults(func=_run_slice)


def _run_slice(args: argparse.Namespace) -> None:
    from splice.surgery.slicing import slice_model

    _check_out(args)
    result = slice_model(
        args.model,
        args.out,
        sparsity=args.sparsity,
        calibration=args.calibration,
        basis=args.basis,
        stream=args.pca_of,
        dry_run=args.dry_run,
        options=exec_options(args),
        calib=_calibration(args),
        dtype=args.dtype,
        allow_pickle=args.allow_pickle,
        trust_remote_code=args.trust_remote_code,
    )
    _finish(result, args)


# ---- splice collapse ----------------------------------------------------------------------
def add_collapse(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "collapse",
        help="MoE -> dense MLP (uniform, frequency, slice refit) or MoE -> k experts",
        description="Collapse every MoE layer (Mixtral, Qwen2/3-MoE, Qwen3-Next, OLMoE, "
        "DeepSeek-V2/V3, GLM-4-MoE, dots1, ERNIE-4.5-MoE): into one dense MLP (written as the "
        "dense sibling where the family has one, Mixtral -> Mistral, else the family with one "
        "routed expert) by the experts' mean "
        "(uniform), their mean weighted by routing probability on --calibration (frequency), "
        "or the E experts' most contributing neurons with the down projection refit by ridge "
        "least squares (slice); or into k experts (--keep-experts: merged by output "
        "similarity, or --prune: the k that reconstruct the layer best).",
    )
    _common(p)
    p.add_argument("--method", choices=("uniform", "frequency", "slice"), default="uniform",
                   help="how a dense MLP is made (default uniform)")  # fmt: skip
    p.add_argument("--intermediate-size", type=positive_int, metavar="I",
                   help="slice: neurons to keep (default the experts' width)")  # fmt: skip
    p.add_argument("--keep-experts", type=positive_int, metavar="K",
                   help="a smaller MoE of K experts instead of a dense model")  # fmt: skip
    p.add_argument("--top-k", type=positive_int, metavar="N",
                   help="experts per token of the --keep-experts result (default the source's)")  # fmt: skip
    p.add_argument("--prune", action="store_true",
                   help="--keep-experts: keep the K best experts instead of merging groups")  # fmt: skip
    p.add_argument("--by", choices=("naee", "frequency", "reap"),
                   help="--prune: naee (the K that reconstruct the layer best, default), "
                        "frequency (the K routed to most often) or reap (the K of highest "
                        "router-weighted output norm, REAP)")  # fmt: skip
    p.add_argument("--shared-gate", choices=("keep", "mean"), default="keep",
                   help="Qwen2-MoE's sigmoid shared-expert gate: keep it exact (the family with "
                        "one routed expert) or fold it at its calibration mean into a dense Qwen2")  # fmt: skip
    p.add_argument("--align", action="store_true",
                   help="permute each expert's neurons to a reference expert before averaging")  # fmt: skip
    p.add_argument("--ridge", type=number, default=1e-6,
                   help="slice: ridge, relative to the Gram matrix's mean diagonal, at most 100 (1e-6)")  # fmt: skip
    p.add_argument("--max-rows", type=positive_int, default=4096,
                   help="calibration rows per layer used to select and fit (4096)")  # fmt: skip
    _calibration_options(p, "frequency, slice, --keep-experts")
    p.set_defaults(func=_run_collapse)


def _run_collapse(args: argparse.Namespace) -> None:
    from splice.malloc import pin_mmap_threshold
    from splice.surgery.collapse import collapse

    _check_out(args)
    pin_mmap_threshold()  # per-layer float64 temporaries of many sizes: keep the heap from growing
    result = collapse(
        args.model,
        args.out,
        dry_run=args.dry_run,
        options=exec_options(args),
        method=args.method,
        calibration=args.calibration,
        intermediate_size=args.intermediate_size,
        keep_experts=args.keep_experts,
        top_k=args.top_k,
        prune=args.prune,
        by=args.by,
        shared_gate=args.shared_gate,
        align=args.align,
        ridge=args.ridge,
        max_rows=args.max_rows,
        calib=_calibration(args),
        dtype=args.dtype,
        allow_pickle=args.allow_pickle,
    )
    _finish(result, args)
