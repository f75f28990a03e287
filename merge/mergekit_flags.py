"""mergekit-yaml's flags on ``splice merge``: one table, :data:`FLAGS`, from which both the
options (:func:`add_options`) and the documentation table (:func:`markdown_table`) are made.

A script written for ``mergekit-yaml RECIPE OUT --cuda --out-shard-size 2B ...`` runs as
``splice merge RECIPE OUT --cuda --out-shard-size 2B ...``. Each mergekit flag is one of:

* **same**: ``splice merge`` has the option under that name (``--device``, ``--allow-crimes``,
  ``--trust-remote-code``);
* **mapped**: it sets a splice option (``--cuda`` is ``--device cuda``, ``-j`` ``--threads``,
  ``--random-seed`` ``--seed``, ``--out-shard-size`` ``--max-shard-size``, ``--quiet``
  ``--no-progress``);
* **ignored**: splice always does it, never does it, or it has no meaning here; accepted, with
  one ``splice: note:`` line on stderr saying what splice does instead;
* **refused**: splice cannot honour it safely; one ``splice: error:`` line and exit code 2.

The mergekit flags are hidden from ``splice merge --help`` (whose epilog names them), and an
unknown flag is still a usage error.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from splice.cli import thread_count
from splice.errors import SpliceError


@dataclass(frozen=True)
class Flag:
    """What one mergekit-yaml flag does on ``splice merge``.

    ``does``: the documentation's words for a same or mapped flag; ``dest``: the
    ``splice merge`` argument a mapped flag sets, to ``value`` (a switch) or to its argument
    parsed by ``parse`` (a flag with a ``metavar``); ``note``: the stderr line's reason for an
    ignored flag (or a mapped one's caveat); ``refused``: the flag is an error, ``note`` why.
    """

    does: str = ""
    dest: str | None = None
    value: Any = True
    parse: Callable[[str], Any] | None = None
    metavar: str | None = None
    note: str = ""
    refused: bool = False

    @property
    def kind(self) -> str:
        """``same``, ``mapped``, ``ignored`` or ``refused``."""
        if self.refused:
            return "refused"
        if self.dest is not None:
            return "mapped"
        return "ignored" if self.note else "same"


def same(does: str, metavar: str | None = None) -> Flag:
    return Flag(does=does, metavar=metavar)


def mapped(does: str, dest: str, value: Any = True, *, note: str = "") -> Flag:
    return Flag(does=does, dest=dest, value=value, note=note)


def mapped_value(does: str, dest: str, parse: Callable[[str], Any], metavar: str) -> Flag:
    return Flag(does=does, dest=dest, parse=parse, metavar=metavar)


def ignored(why: str, metavar: str | None = None) -> Flag:
    return Flag(note=why, metavar=metavar)


def refused(why: str, metavar: str | None = None) -> Flag:
    return Flag(note=why, metavar=metavar, refused=True)


#: the largest shard mergekit's ``--out-shard-size 0`` (no limit) becomes
NO_LIMIT = sys.maxsize


def kmb_size(text: str) -> int:
    """argparse ``type=`` for ``--out-shard-size``: mergekit's sizes, a whole number with an
    optional K, M or B (thousand, million, billion; any case). They count bytes (mergekit's
    writer compares them with ``numel · element_size``), so ``2B`` is splice's ``2GB``; 0 is
    mergekit's "no limit", one shard."""
    units = {"k": 10**3, "m": 10**6, "b": 10**9}
    digits, scale = (
        (text[:-1], units[text[-1].lower()]) if text[-1:].lower() in units else (text, 1)
    )
    if not digits.isdigit():
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a size like 500M or 2B (mergekit's; --max-shard-size takes 2GB)"
        )
    return int(digits) * scale or NO_LIMIT


STREAMING = "splice streams the merge tensor by tensor within --memory, keeping no results"
ONE_DEVICE = "splice reads each tensor onto --device and merges there, on one device"
WRITES = "splice writes each tensor to its shard as soon as it is merged"
NO_LORA = (
    "splice applies a model+lora reference's adapter tensor by tensor as it reads the base (in "
    "float32, cast to the base's dtype), so no merged copy is cached on disk"
)
TOKENIZER = (
    "splice always copies the tokenizer (the recipe's tokenizer_source's, else the base "
    "model's or the first model's)"
)
CARD = "splice always writes a model card (README.md) with the recipe"
SAFETENSORS = "splice always writes safetensors shards"
LAZY = (
    "splice always reads tensors lazily, one at a time (pickled .bin weights need --allow-pickle)"
)
LOGS = "splice logs nothing more than its progress bar and its warnings"
CLONES = "splice writes every output tensor on its own, a layer used twice included"

#: every flag of mergekit-yaml (mergekit/options.py), by mergekit's categories, and older
#: mergekit-yaml's --verbose: flag -> what it does on ``splice merge``
FLAGS: dict[str, Flag] = {
    # Dangerous Options
    "--allow-crimes": same("the same: merge models of different architectures"),
    "--no-allow-crimes": mapped("the default: architectures must match", "allow_crimes", False),
    "--trust-remote-code": same(
        "the same: a moe recipe's router may run the base model's own code (a plain merge "
        "runs no model code: splice reads config.json as data)"
    ),
    "--no-trust-remote-code": mapped("the default: no model code runs", "trust_remote_code", False),
    "--unsafe-truncate-embeddings": refused(
        "splice does not drop embedding rows; to merge vocabularies of different sizes, name "
        "a tokenizer_source (base, union or a model) in the recipe"
    ),
    "--no-unsafe-truncate-embeddings": ignored("splice never drops embedding rows"),
    # Storage
    "--transformers-cache": refused(
        "splice downloads hub models into Hugging Face's cache; set HF_HUB_CACHE=DIR instead",
        "DIR",
    ),
    "--lora-merge-cache": ignored(NO_LORA, "DIR"),
    "--lora-merge-dtype": ignored(NO_LORA, "DTYPE"),
    # Performance
    "--cuda": mapped(
        "`--device cuda` (a --device other than cpu wins, as mergekit's --device does)", "cuda"
    ),
    "--no-cuda": mapped("the default: `--device cpu`", "cuda", False),
    "--device": same("the same: cpu, cuda, cuda:1, ... or auto (default cpu)", "DEVICE"),
    "--low-cpu-memory": ignored(STREAMING),
    "--no-low-cpu-memory": ignored(STREAMING),
    "--read-to-gpu": ignored(ONE_DEVICE),
    "--no-read-to-gpu": ignored(ONE_DEVICE),
    "--multi-gpu": ignored(ONE_DEVICE),
    "--no-multi-gpu": ignored(ONE_DEVICE),
    "--num-threads": mapped_value("`--threads N`", "threads", thread_count, "N"),
    "-j": mapped_value("`--threads N`", "threads", thread_count, "N"),
    "--gpu-rich": mapped(
        "`--device cuda`; the rest of it (--low-cpu-memory, --read-to-gpu, --multi-gpu) "
        "ignored, with a note",
        "cuda",
        note="its --cuda is --device cuda; its --low-cpu-memory, --read-to-gpu and --multi-gpu "
        "are ignored (" + STREAMING + ", on one device)",
    ),
    "--lazy-unpickle": ignored(LAZY),
    "--no-lazy-unpickle": ignored(LAZY),
    "--async-write": ignored(WRITES),
    "--no-async-write": ignored(WRITES),
    "--write-threads": ignored(WRITES, "N"),
    # Output Settings
    "--out-shard-size": mapped_value(
        "`--max-shard-size`, read as mergekit reads it: bytes, K/M/B = 10^3/10^6/10^9 (2B = "
        "2GB; 0 = one shard)",
        "max_shard_size",
        kmb_size,
        "SIZE",
    ),
    "--copy-tokenizer": ignored(TOKENIZER),
    "--no-copy-tokenizer": ignored(TOKENIZER),
    "--clone-tensors": ignored(CLONES),
    "--no-clone-tensors": ignored(CLONES),
    "--write-model-card": ignored(CARD),
    "--no-write-model-card": ignored(CARD),
    "--safe-serialization": ignored(SAFETENSORS),
    "--no-safe-serialization": ignored(SAFETENSORS),
    # Miscellaneous
    "--random-seed": mapped_value("`--seed N`", "seed", int, "N"),
    "-v": ignored(LOGS),
    "--verbose": ignored(LOGS),  # older mergekit-yaml
    "--no-verbose": ignored(LOGS),  # older mergekit-yaml
    "--quiet": mapped("`--no-progress`", "no_progress", True),
    "--no-quiet": mapped("the default: a progress bar", "no_progress", False),
}

#: flags of older mergekit-yaml versions (not defined by the installed mergekit's parser)
OLDER = ("--verbose", "--no-verbose")

#: where :func:`add_options` records the ignored and refused flags given, in order
GIVEN = "mergekit_flags"


class _MergekitFlag(argparse.Action):
    """One flag of :data:`FLAGS`: sets its splice option and records itself if it has a note."""

    def __init__(self, option_strings: list[str], dest: str, flag: Flag, **kw: Any) -> None:
        self.flag = flag
        super().__init__(option_strings, dest, **kw)

    def __call__(self, parser: Any, namespace: Any, values: Any, option: Any = None) -> None:
        f = self.flag
        if f.dest is not None:
            setattr(namespace, f.dest, f.value if f.parse is None else values)
        if f.note:
            setattr(namespace, GIVEN, [*getattr(namespace, GIVEN, ()), option])


def add_options(p: argparse.ArgumentParser) -> None:
    """Add to ``splice merge``'s parser every flag of :data:`FLAGS` but the ones it has under
    the same name, each hidden from ``--help``."""
    p.set_defaults(**{GIVEN: (), "cuda": False})
    for name, f in FLAGS.items():
        if f.kind == "same":
            continue
        p.add_argument(
            name,
            action=_MergekitFlag,
            flag=f,
            dest=f.dest or GIVEN,
            nargs=None if f.metavar else 0,
            type=f.parse,
            metavar=f.metavar,
            default=argparse.SUPPRESS,
            help=argparse.SUPPRESS,
        )


def notes(given: Iterable[str]) -> list[str]:
    """The note lines for the mergekit flags ``given`` (each once, in order); the first refused
    one raises :class:`SpliceError`."""
    lines: list[str] = []
    for name in dict.fromkeys(given):
        f = FLAGS[name]
        if f.refused:
            raise SpliceError(f"{name} (mergekit-yaml's) is not supported: {f.note}")
        lines.append(f"{name} ignored: {f.note}" if f.kind == "ignored" else f"{name}: {f.note}")
    return lines


def markdown_table() -> str:
    """The documentation table: one row per flag, a ``--x`` / ``--no-x`` pair (or any run of
    flags) meaning the same thing in one row."""
    rows: list[tuple[list[str], str]] = []
    for name, f in FLAGS.items():
        shown = f"`{name}{f' {f.metavar}' if f.metavar else ''}`"
        if name in OLDER:
            shown += " (older mergekit)"
        if f.kind == "ignored":
            text = f"ignored, with a note: {f.note}"
        elif f.kind == "refused":
            text = f"refused: {f.note}"
        else:
            text = f.does
        if rows and rows[-1][1] == text:
            rows[-1][0].append(shown)
        else:
            rows.append(([shown], text))
    lines = ["| mergekit-yaml flag | on `splice merge` |", "|---|---|"]
    lines += [f"| {', '.join(names)} | {text} |" for names, text in rows]
    return "\n".join(lines) + "\n"
