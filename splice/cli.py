"""``splice <verb>``: a thin command line over the public functions.

:data:`VERBS` is the table of splice's verbs: each names, as ``"module:function"``, a function
``add(subparsers)`` that adds one subparser and sets ``func`` to a handler
``(args) -> int | None``. Only the verb being run is imported (by name: the core imports no
subpackage). Other installed packages may add verbs through the ``splice.commands`` entry-point
group; a built-in name cannot be taken.

Any :class:`SpliceError` becomes one line on stderr and exit code 2; a Python warning, one
``splice: warning:`` line. SIGTERM and SIGHUP are
handled like Ctrl-C: the running verb unwinds (its temporary output is removed) and the exit
code is 128 + the signal number (143 for SIGTERM).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import warnings
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from splice.errors import SpliceError

#: the verbs, in the order ``splice --help`` lists them: name -> "module:function" adding its
#: subparser (imported only when that verb runs)
VERBS: dict[str, str] = {
    "inspect": "splice.cli:add_inspect",
    "convert": "splice.cli:add_convert",
    "merge": "splice.merge.cli:add",
    "extract-lora": "splice.merge.extract_lora_cli:add_extract_lora",
    "analyze": "splice.analysis.cli:add",
    "upscale": "splice.surgery.cli:add_upscale",
    "prune": "splice.surgery.cli:add_prune",
    "heal": "splice.surgery.cli:add_heal",
    "slice": "splice.surgery.cli:add_slice",
    "collapse": "splice.surgery.cli:add_collapse",
    "eval": "splice.cli:add_eval",
    "zoo": "splice.zoo.cli:add",
    "evolve": "splice.evolve.cli:add",
    "tokensurgeon": "splice.merge.tokensurgeon_cli:add_tokensurgeon",
}
#: entry-point group through which other packages add verbs
GROUP = "splice.commands"


class Parser(argparse.ArgumentParser):
    """ArgumentParser whose usage errors are one line and exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class Terminated(KeyboardInterrupt):
    """Raised in the main thread when splice receives SIGTERM or SIGHUP."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _on_signal(signum: int, frame: object) -> None:
    for s in (signal.SIGTERM, signal.SIGHUP):  # one clean-up at a time; SIGKILL still works
        signal.signal(s, signal.SIG_IGN)
    raise Terminated(signum)


def _install_signal_handlers() -> dict[int, Any]:
    """Route SIGTERM/SIGHUP to :class:`Terminated`; returns the handlers to restore."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        return {}
    return {s: signal.signal(s, _on_signal) for s in (signal.SIGTERM, signal.SIGHUP)}


def _show_warning(message: Warning | str, *_: Any, **__: Any) -> None:
    """Python warnings, from splice or a library, as one ``splice: warning:`` line each."""
    print(f"splice: warning: {message}", file=sys.stderr)


class _Verb:
    """A verb of :data:`VERBS`, loaded on demand (the interface of an entry point's ``load``)."""

    def __init__(self, target: str) -> None:
        self.target = target

    def load(self) -> Callable[[argparse._SubParsersAction], None]:
        import importlib

        module, _, name = self.target.partition(":")
        return getattr(importlib.import_module(module), name)


def _verbs() -> dict[str, Any]:
    """Every verb: :data:`VERBS`, then those other packages declare (``splice.commands``)."""
    from splice.registry import entry_points_of

    verbs: dict[str, Any] = {name: _Verb(target) for name, target in VERBS.items()}
    for name, ep in entry_points_of(GROUP).items():
        verbs.setdefault(name, ep)
    return verbs


def build_parser(only: str | None = None) -> Parser:
    """The full parser, or one with just the verb ``only`` loaded (faster start)."""
    from splice import __version__

    parser = Parser(
        prog="splice",
        description="Model merging and layer surgery for LLMs.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"splice {__version__}")
    sub = parser.add_subparsers(dest="verb", metavar="VERB", parser_class=Parser)
    sub.required = True
    verbs = _verbs()
    for name in list(verbs) if only is None or only not in verbs else [only]:
        verbs[name].load()(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``splice`` script; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    first = next((a for a in argv if not a.startswith("-")), None)
    previous = _install_signal_handlers()
    try:
        try:
            args = build_parser(first).parse_args(argv)
        except SystemExit as e:  # a usage error (its one line is printed), --help, --version
            return e.code if isinstance(e.code, int) else 0
        with warnings.catch_warnings():
            warnings.showwarning = _show_warning
            return int(args.func(args) or 0)
    except SpliceError as e:  # one line per problem
        for line in str(e).splitlines() or [type(e).__name__]:
            print(f"splice: error: {line}", file=sys.stderr)
        return 2
    except Terminated as e:
        print(f"splice: stopped by {e} (temporary output removed)", file=sys.stderr)
        return 128 + e.signum
    except (MemoryError, RuntimeError) as e:
        if not isinstance(e, MemoryError) and type(e).__name__ != "OutOfMemoryError":
            raise  # torch's CUDA / CPU out-of-memory errors only
        where = "GPU" if type(e).__name__ == "OutOfMemoryError" else "host"
        print(
            f"splice: error: out of {where} memory (temporary output removed); lower "
            "--batch-size, --seq-len or --max-samples, or use a machine with more memory",
            file=sys.stderr,
        )
        return 2
    except KeyboardInterrupt:
        print("splice: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `splice inspect M | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


# ---- shared options ---------------------------------------------------------------------------
def positive_int(text: str) -> int:
    """argparse ``type=`` for counts (threads, workers, layers): an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be 1 or more")
    return value


#: the most torch CPU threads ``--threads`` takes (torch overflows, or tries to start them all)
MAX_THREADS = max(1024, os.cpu_count() or 1)


def thread_count(text: str) -> int:
    """argparse ``type=`` for ``--threads``: an integer from 1 to :data:`MAX_THREADS`."""
    value = positive_int(text)
    if value > MAX_THREADS:
        raise argparse.ArgumentTypeError(f"{text!r} must be at most {MAX_THREADS}")
    return value


def number(text: str) -> float:
    """argparse ``type=`` for a real number, any value (nan and inf too): the function the verb
    calls checks its range (:func:`splice.limits.check_number`), for Python callers as well."""
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None


def integer(text: str) -> int:
    """argparse ``type=`` for an integer, any value: the function the verb calls checks it."""
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None


def checked(check: Callable[[Any], Any], parse: Callable[[str], Any] = number) -> Any:
    """argparse ``type=`` that parses the text and passes it to the library's ``check``, whose
    :class:`SpliceError` becomes the usage error: one check for the CLI and Python callers."""

    def convert(text: str) -> Any:
        value = parse(text)
        try:
            return check(value)
        except SpliceError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    return convert


class _DtypeAction(argparse.Action):
    """``--dtype``: a float dtype casts (and writes the output unquantized); a quantized format
    (:data:`splice.quant.TARGETS`) sets ``quantize`` and leaves every tensor's dtype as
    planned (the quantization pass writes it, :func:`splice.quant.quantized_plan`)."""

    def __call__(self, parser: Any, namespace: Any, value: Any, option: Any = None) -> None:
        from splice.quant import TARGETS

        if value in TARGETS:
            namespace.dtype, namespace.quantize = None, value
        else:
            namespace.dtype, namespace.quantize = value, "none"


def _block_size(value: str) -> tuple[int, int]:
    rows, _, cols = value.lower().partition("x")
    if not (rows.isdigit() and cols.isdigit() and int(rows) > 0 and int(cols) > 0):
        raise argparse.ArgumentTypeError(f"{value!r}: give ROWSxCOLS, e.g. 128x128")
    return int(rows), int(cols)


def add_output_options(
    p: argparse.ArgumentParser, *, dtype: bool = True, verify: bool = True
) -> None:
    """``OUT``-writing verbs share these: shard size, overwrite, dtype, progress, and (verbs
    that make a new model) ``--no-verify``."""
    p.add_argument(
        "--max-shard-size", default="2GB", help="cap on each safetensors shard (default 2GB)"
    )
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    if verify:
        p.add_argument(
            "--no-verify",
            action="store_true",
            help="do not check that transformers accepts the output's config and tensors "
            "(for model types transformers does not know; nothing is lost either way)",
        )
    if dtype:
        p.add_argument(
            "--dtype",
            action=_DtypeAction,
            help="output dtype: bfloat16, float16, float32 (unquantized); fp8 (e4m3, block "
            "scales), mxfp4 (MoE experts), keep (each tensor in its input's quantization: "
            "the default when the inputs share one), or none (unquantized, dtypes as planned)",
        )
        p.add_argument(
            "--block-size",
            type=_block_size,
            help="--dtype fp8's block, ROWSxCOLS (default: the input's, else 128x128)",
        )
        p.set_defaults(quantize=None)
    p.add_argument(
        "--no-progress",
        action="store_true",
        help="no progress output (a bar on a terminal, a line every 30 s elsewhere)",
    )


def exec_options(args: argparse.Namespace, *, device: str = "cpu") -> Any:
    """The :class:`~splice.execute.ExecOptions` of a verb with :func:`add_output_options` and
    :func:`add_compute_options` (``--max-shard-size`` parsed, named in its error)."""
    from splice.dtypes import parse_size
    from splice.execute import ExecOptions

    try:
        shard = parse_size(args.max_shard_size)
    except SpliceError as e:
        raise SpliceError(f"--max-shard-size {args.max_shard_size}: {e}") from None
    return ExecOptions(
        device=device,
        threads=args.threads,
        max_shard_size=shard,
        overwrite=args.overwrite,
        verify=not args.no_verify,
        show_progress=not args.no_progress,
        quantize=getattr(args, "quantize", None),
        block_size=getattr(args, "block_size", None),
    )


def add_model_options(p: argparse.ArgumentParser, *, runs_models: bool = False) -> None:
    """Verbs that open models share these safety switches; ``runs_models`` verbs (those that
    build a transformers model) also get ``--trust-remote-code``."""
    p.add_argument(
        "--allow-pickle",
        action="store_true",
        help="accept pickled pytorch_model*.bin weights (loaded with weights_only=True)",
    )
    if runs_models:
        p.add_argument(
            "--trust-remote-code",
            action="store_true",
            help="allow a model's own Python code to run (never without this flag)",
        )


#: ``--device``'s default on every verb that runs tensors: cuda when there is one, else cpu.
#: Two verbs differ, each for a reason: ``merge`` keeps ``cpu`` (a seeded DARE/DELLA merge draws
#: its masks from a generator on the tensors' device, and cuda's draws differ from cpu's: the
#: same recipe and seed must give the same checkpoint on any machine, as mergekit's, which is
#: cpu unless asked), and ``evolve`` has none (its config says the device; the option overrides).
DEVICE_DEFAULT = "auto"


def add_compute_options(
    p: argparse.ArgumentParser,
    *,
    device: str | None = DEVICE_DEFAULT,
    device_help: str | None = None,
    threads: bool = True,
    threads_help: str = "torch CPU threads",
) -> None:
    """Where the tensors are computed: ``--device`` and ``--threads`` (:func:`thread_count`)."""
    if device_help is None:
        device_help = "cpu, cuda, cuda:1, ... or auto (default: cuda if any)"
        if device != DEVICE_DEFAULT:
            device_help = f"cpu, cuda, cuda:1, ... or auto (default {device})"
    p.add_argument("--device", default=device, help=device_help)
    if threads:
        p.add_argument("--threads", type=thread_count, help=threads_help)


def add_calibration_options(
    p: argparse.ArgumentParser,
    *,
    used_by: str = "",
    required: bool = False,
    help: str | None = None,
    seq_len_type: Callable[[str], int] = positive_int,
    seq_len_help: str = "tokens per window (default 128)",
    batch_help: str = "windows per batch (default 8)",
    max_samples: bool = True,
    include_path: bool = True,
    calibration_dtype: bool = True,
) -> None:
    """The text a model is run on: ``--calibration`` (a file, 'lm-eval:TASK', 'zoo' or
    'zoo:both'), ``--include-path``, ``--seq-len``, ``--max-samples``, ``--batch-size`` and
    ``--calibration-dtype``; a verb leaves out what it has no use for."""
    if help is None:
        help = (
            f"text to run the model on{f' ({used_by})' if used_by else ''}: a text file, "
            "'lm-eval:TASK', 'zoo' (English) or 'zoo:both' (English and Zeta)"
        )
    p.add_argument("--calibration", metavar="FILE", required=required, help=help)
    if include_path:
        p.add_argument("--include-path", metavar="DIR", help="folder of extra lm-eval task YAMLs")
    p.add_argument("--seq-len", type=seq_len_type, default=128, help=seq_len_help)
    if max_samples:
        p.add_argument(
            "--max-samples", type=positive_int, default=64, help="windows to run (default 64)"
        )
    p.add_argument("--batch-size", type=positive_int, default=8, help=batch_help)
    if calibration_dtype:
        p.add_argument(
            "--calibration-dtype",
            default="float32",
            help="dtype to run the model in on the calibration text (default float32)",
        )


def add_scoring_options(
    p: argparse.ArgumentParser,
    *,
    ppl: str | None = None,
    tasks: str = "comma-separated zoo tasks (zoo_math, zoo_lang, zoo_math_lang, ..., all)",
    zoo: bool = True,
    include_path: bool = False,
    limit: bool = False,
) -> None:
    """Scoring on text and lm-eval tasks: ``--ppl`` (when ``ppl`` gives its help),
    ``--tasks``, ``--zoo``, ``--include-path`` and ``--limit``."""
    if ppl is not None:
        p.add_argument("--ppl", metavar="FILE", help=ppl)
    p.add_argument("--tasks", help=tasks)
    if zoo:
        p.add_argument(
            "--zoo", metavar="DIR", help="built zoo whose tasks to use (default: the shared zoo)"
        )
    if include_path:
        p.add_argument("--include-path", metavar="DIR", help="folder of extra lm-eval task YAMLs")
    if limit:
        p.add_argument(
            "--limit", type=positive_int, help="score only the first N items of each task"
        )


def add_json_option(p: argparse.ArgumentParser, what: str = "print the report as JSON") -> None:
    p.add_argument("--json", action="store_true", help=what)


class _Deprecated(argparse.Action):
    """An old option name: stores into the new option's ``dest`` and says so on stderr."""

    def __init__(self, option_strings: list[str], dest: str, new: str = "", **kw: Any) -> None:
        self.new = new
        super().__init__(option_strings, dest, **kw)

    def __call__(self, parser: Any, namespace: Any, values: Any, option: Any = None) -> None:
        print(f"splice: warning: {option} is deprecated; use {self.new}", file=sys.stderr)
        setattr(namespace, self.dest, values)


def add_deprecated_alias(p: argparse.ArgumentParser, old: str, new: str, **kw: Any) -> None:
    """``old`` still works as ``new`` (hidden from --help), with one deprecation line."""
    dest = new.lstrip("-").replace("-", "_")
    p.add_argument(
        old, dest=dest, action=_Deprecated, new=new, default=argparse.SUPPRESS,
        help=argparse.SUPPRESS, **kw,
    )  # fmt: skip


def print_json(data: Any) -> None:
    json.dump(data, sys.stdout, indent=2, default=str)
    sys.stdout.write("\n")


# ---- core verbs -------------------------------------------------------------------------------
def add_inspect(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "inspect",
        help="show a checkpoint's architecture, layers, experts, parameters and shards",
        description="Read a model's headers (no tensor data) and print its layout.",
    )
    p.add_argument("model", help="model folder or hub id")
    add_json_option(p, "machine-readable output")
    p.add_argument("--all-layers", action="store_true", help="one table per layer")
    add_model_options(p)
    p.set_defaults(func=_run_inspect)


def _run_inspect(args: argparse.Namespace) -> None:
    from splice.checkpoint import open_checkpoint
    from splice.summary import format_summary, summarize

    ckpt = open_checkpoint(args.model, allow_pickle=args.allow_pickle)
    ckpt.validate()
    summary = summarize(ckpt)
    if args.json:
        print_json(summary.to_dict())
    else:
        print(format_summary(summary, all_layers=args.all_layers))


def add_convert(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "convert",
        help="re-shard and/or re-type a checkpoint",
        description="Copy MODEL to OUT with new shards and optionally a new dtype, streaming.",
    )
    p.add_argument("model", help="model folder or hub id")
    p.add_argument("out", help="output folder (written atomically)")
    add_output_options(p, verify=False)  # a conversion keeps the config and every tensor
    p.add_argument(
        "--text-only",
        action="store_true",
        help="a multimodal model's language model alone, as its text family (Gemma 3: "
        "gemma3_text), the vision tower and projector dropped",
    )
    add_model_options(p)
    p.set_defaults(func=_run_convert)


def _run_convert(args: argparse.Namespace) -> None:
    from splice.convert import convert

    out = convert(
        args.model,
        args.out,
        dtype=args.dtype,
        max_shard_size=args.max_shard_size,
        overwrite=args.overwrite,
        allow_pickle=args.allow_pickle,
        show_progress=not args.no_progress,
        text_only=args.text_only,
        quantize=args.quantize,
        block_size=args.block_size,
    )
    print(f"wrote {out}")


def add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="score models: perplexity on a text and/or lm-eval tasks (the zoo's or any)",
        description="Token-level perplexity on a text (sliding windows, batched) and/or lm-eval "
        "tasks run in process, one row per model. --ppl zoo is the zoo's held-out English text "
        "(text/heldout_en.txt; zoo:zeta its Zeta half, zoo:both both; the zoo's models train on "
        "windows of 64 tokens: --seq-len 64 is the README's setting). --tasks takes the zoo's "
        "tasks (zoo_math, ..., all), any lm-eval task, group or tag (hellaswag), and YAML task "
        "files or the tasks of --include-path DIR. A per-layer sliced model (splice slice) "
        "scores like any other.",
    )
    p.add_argument("models", nargs="+", metavar="MODEL", help="model folders")
    add_scoring_options(
        p,
        ppl="text to score: a file, 'lm-eval:TASK', or 'zoo' (the zoo's held-out English text), "
        "'zoo:zeta' (its Zeta half), 'zoo:both'",
        tasks="comma-separated tasks: the zoo's (zoo_math, zoo_lang, ..., all), lm-eval's "
        "(hellaswag, groups, tags), YAML files, or tasks of --include-path",
        include_path=True,
        limit=True,
    )
    p.add_argument(
        "--num-fewshot",
        type=integer,
        metavar="N",
        help="examples in each task's context (default: the task's own, else 0)",
    )
    p.add_argument(
        "--seq-len", type=positive_int, default=128, help="tokens per window (default 128)"
    )
    p.add_argument(
        "--stride", type=positive_int, help="tokens between window starts (default seq-len / 2)"
    )
    p.add_argument(
        "--batch-size", type=positive_int, default=8, help="windows per batch (default 8)"
    )
    p.add_argument("--max-tokens", type=positive_int, help="score only the first N tokens")
    add_compute_options(
        p, threads_help="torch CPU threads (default: one for a small model, torch's otherwise)"
    )
    p.add_argument(
        "--compute-dtype",
        default="float32",
        help="dtype to run the models in (default float32)",
    )
    add_deprecated_alias(p, "--dtype", "--compute-dtype")
    add_json_option(p, 'print {"<model>": {"ppl": ..., ...}}')
    p.add_argument("--no-progress", action="store_true", help="no progress output")
    add_model_options(p, runs_models=True)
    p.set_defaults(func=_run_eval)


def _run_eval(args: argparse.Namespace) -> None:
    from splice.scoring import evaluate, format_table, read_text

    text = (
        read_text(args.ppl, zoo=args.zoo, include_path=args.include_path)
        if args.ppl is not None
        else None
    )
    scores = evaluate(
        args.models,
        text=text,
        tasks=args.tasks,
        seq_len=args.seq_len,
        stride=args.stride,
        batch_size=args.batch_size,
        max_tokens=args.max_tokens,
        device=args.device,
        dtype=args.compute_dtype,
        zoo=args.zoo,
        limit=args.limit,
        include_path=args.include_path,
        num_fewshot=args.num_fewshot,
        show_progress=not args.no_progress,
        allow_pickle=args.allow_pickle,
        trust_remote_code=args.trust_remote_code,
        text_name=f"--ppl {args.ppl}: the text",
        threads=args.threads,
    )
    if args.json:
        print_json(scores)
    else:
        print(format_table(scores))


if __name__ == "__main__":
    sys.exit(main())
