"""``build(dir)``: train the zoo (base, math, lang, moe) and write its tasks, atomically, cached.

A finished zoo holds ``zoo.json`` with the build stamp (hash of :class:`Settings` and
``ZOO_VERSION``); ``build`` returns at once when the folder already holds a complete zoo with the
same stamp. Everything is built in a hidden folder beside the target and renamed into place at
the end, so an interrupted build leaves nothing at ``dir``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from splice.errors import SpliceError
from splice.target import (
    check_target,
    clean_stale,
    commit,
    lock_target,
    replaceable_reason,
    staging_dir,
)
from splice.zoo.models import Shape

# Bump when a change to the zoo's code changes what a build produces (data, training, layout).
ZOO_VERSION = "1"
MODELS = ("base", "math", "lang", "moe")
STAMP_FILE = "zoo.json"


@dataclass(frozen=True)
class Settings:
    """Everything a build depends on besides the code (``ZOO_VERSION``)."""

    seed: int = 0
    shape: Shape = field(default_factory=Shape)
    documents: int = 60_000
    seq: int = 64
    pretrain_steps: int = 600
    pretrain_batch: int = 64
    pretrain_lr: float = 3e-3
    math_steps: int = 1000
    lang_steps: int = 100
    finetune_batch: int = 64
    finetune_lr: float = 1e-3
    moe_steps: int = 200
    moe_batch: int = 16
    moe_lr: float = 1e-3
    dtype: str = "bfloat16"
    # One thread: for models this small a second thread buys little, costs a lot on a shared
    # CPU (threads wait on each other), and one thread makes the bits independent of the machine.
    threads: int = 1

    def scaled(self, factor: float) -> Settings:
        """The same recipe with every step count multiplied by ``factor`` (at least 2 steps)."""
        if not (isinstance(factor, (int, float)) and math.isfinite(factor) and factor > 0):
            raise SpliceError(f"--steps-scale must be a positive finite number, got {factor}")

        def n(steps: int) -> int:
            return max(2, round(steps * factor))

        return dataclasses.replace(
            self,
            documents=max(200, round(self.documents * min(1.0, factor))),
            pretrain_steps=n(self.pretrain_steps),
            math_steps=n(self.math_steps),
            lang_steps=n(self.lang_steps),
            moe_steps=n(self.moe_steps),
        )

    def stamp(self) -> str:
        blob = json.dumps({"version": ZOO_VERSION, **dataclasses.asdict(self)}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def default_dir() -> Path:
    """Where the shared zoo lives: ``$SPLICE_ZOO_DIR``, else the committed ``assets/zoo`` of a
    source checkout, else ``~/.cache/splice/zoo``."""
    env = os.environ.get("SPLICE_ZOO_DIR")
    if env:
        return Path(env).expanduser()
    repo_assets = Path(__file__).resolve().parents[2] / "assets" / "zoo"
    if (repo_assets / STAMP_FILE).is_file():
        return repo_assets
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "splice" / "zoo"


def read_stamp(folder: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The ``zoo.json`` of a complete zoo, or ``None``."""
    folder = Path(folder)
    try:
        info = json.loads((folder / STAMP_FILE).read_text())
    except (OSError, ValueError):
        return None
    complete = all((folder / m / "config.json").is_file() for m in MODELS)
    return info if complete and (folder / "tasks").is_dir() else None


def is_built(folder: str | os.PathLike[str], settings: Settings | None = None) -> bool:
    info = read_stamp(folder)
    return info is not None and info.get("stamp") == (settings or Settings()).stamp()


def build(
    folder: str | os.PathLike[str] | None = None,
    *,
    steps_scale: float = 1.0,
    settings: Settings | None = None,
    force: bool = False,
    show_progress: bool = True,
) -> Path:
    """Build the zoo into ``folder`` (default :func:`default_dir`) unless it is already there.

    ``steps_scale`` shrinks or grows every training run (tests use a tiny one); ``force``
    rebuilds even a current zoo. Returns the folder.
    """
    settings = (settings or Settings()).scaled(steps_scale)
    folder = Path(folder) if folder is not None else default_dir()
    with lock_target(folder):
        clean_stale(folder)  # first: it may put back a zoo a killed rebuild set aside
        if folder.exists() and not folder.is_dir():
            raise SpliceError(f"{folder}: exists and is not a folder")
        if not force and is_built(folder, settings):
            return folder
        if folder.exists():
            reason = _not_a_zoo(folder)
            if reason is not None:
                raise SpliceError(
                    f"{folder}: refusing to replace it: {reason}; nothing was deleted"
                )
        check_target(folder, overwrite=True, allow=_ZOO_ENTRIES)
        tmp = staging_dir(folder, "zoo")
        try:
            info = _build_into(tmp, settings, show_progress)
            (tmp / STAMP_FILE).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
            commit(tmp, folder, tag="zoo")
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return folder


_ZOO_ENTRIES = (*MODELS, "tasks", STAMP_FILE)


def _not_a_zoo(folder: Path) -> str | None:
    """Why ``folder`` is not a zoo splice may replace (``None``: empty, or a zoo and nothing else)."""
    entries = {p.name: p for p in folder.iterdir()}
    if not entries:
        return None
    if STAMP_FILE not in entries or read_stamp(folder) is None:
        return f"it is not a zoo (no {STAMP_FILE})"
    for name, path in sorted(entries.items()):
        if name not in _ZOO_ENTRIES:
            return f"it holds {name!r}, which is not part of a zoo"
        if name in MODELS and (why := replaceable_reason(path)) is not None:
            return f"{name}/: {why}"
        if name == "tasks" and path.is_dir():
            odd = [p.name for p in path.iterdir() if p.suffix not in (".jsonl", ".yaml")]
            if odd:
                return f"tasks/ holds {odd[0]!r}, which is not a zoo task file"
    return None


def _log(show: bool, msg: str) -> None:
    if show:
        print(f"zoo: {msg}", file=sys.stderr, flush=True)


def _build_into(out: Path, s: Settings, show: bool) -> dict[str, Any]:
    import torch

    from splice.zoo import corpus, train
    from splice.zoo.models import llama, save, upcycle
    from splice.zoo.tasks import test_items, write_data, write_tasks
    from splice.zoo.tokenizer import make_tokenizer, save_tokenizer
    from splice.zoo.world import make_world

    threads = torch.get_num_threads()
    torch.set_num_threads(s.threads)
    det = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    timings: dict[str, float] = {}
    losses: dict[str, float] = {}
    try:
        t0 = time.perf_counter()
        world = make_world(s.seed)
        tok = make_tokenizer(world)
        tok_dir = out / ".tokenizer"
        save_tokenizer(world, tok_dir)
        write_data(test_items(world, s.seed), out / "tasks")
        write_tasks(out / "tasks")
        stream = train.token_stream(tok, corpus.pretraining_texts(world, s.documents, s.seed))
        timings["data"] = time.perf_counter() - t0

        def run(name: str, model: Any, batches: Any, steps: int, lr: float, **kw: Any) -> None:
            t = time.perf_counter()
            _log(show, f"training {name} ({steps} steps)")
            hist = train.train(
                model, batches, steps, lr=lr, desc=f"zoo {name}", show_progress=show, **kw
            )
            timings[name] = time.perf_counter() - t
            losses[name] = sum(hist[-20:]) / len(hist[-20:])

        def card(name: str, text: str) -> str:
            return f"# zoo/{name}\n\n{text}\n\nBuilt by `splice zoo build` (stamp {s.stamp()}).\n"

        base = llama(s.shape, tok.get_vocab_size(), s.seed)
        run(
            "base",
            base,
            train.stream_batches(stream, s.pretrain_batch, s.seq, s.seed),
            s.pretrain_steps,
            s.pretrain_lr,
        )
        save(base, out / "base", tok_dir, card("base", BASE_CARD), s.dtype)
        base_state = {k: v.clone() for k, v in base.state_dict().items()}

        def finetuned(examples: list[corpus.Example], steps: int, seed: int, name: str) -> None:
            model = llama(s.shape, tok.get_vocab_size(), s.seed)
            model.load_state_dict(base_state)
            batches = train.example_batches(
                train.encode_examples(tok, examples), s.finetune_batch, seed
            )
            run(name, model, batches, steps, s.finetune_lr, trainable=_not_embedding)
            save(model, out / name, tok_dir, card(name, CARDS[name]), s.dtype)

        finetuned(corpus.math_training_set(world, s.seed), s.math_steps, s.seed + 1, "math")
        finetuned(corpus.lang_training_set(world, s.seed), s.lang_steps, s.seed + 2, "lang")

        moe = upcycle(base, s.shape, s.seed + 3)
        moe.config.output_router_logits = True
        sources = [
            train.stream_batches(stream, s.moe_batch, s.seq, s.seed + 4),
            train.example_batches(
                train.encode_examples(tok, corpus.math_training_set(world, s.seed)),
                s.moe_batch,
                s.seed + 5,
            ),
            train.example_batches(
                train.encode_examples(tok, corpus.lang_training_set(world, s.seed)),
                s.moe_batch,
                s.seed + 6,
            ),
        ]
        run(
            "moe",
            moe,
            train.mixed_batches(sources),
            s.moe_steps,
            s.moe_lr,
            trainable=_not_embedding,
        )
        save(moe, out / "moe", tok_dir, card("moe", MOE_CARD), s.dtype)
        shutil.rmtree(tok_dir)
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(det)
    return {
        "stamp": s.stamp(),
        "version": ZOO_VERSION,
        "settings": dataclasses.asdict(s),
        "seconds": {k: round(v, 1) for k, v in timings.items()},
        "final_loss": {k: round(v, 4) for k, v in losses.items()},
    }


def _not_embedding(name: str) -> bool:
    """Fine-tunes keep the (tied) embeddings frozen: both specialists then change only the
    transformer layers, so their task vectors can be added without overwriting each other's rows."""
    return "embed_tokens" not in name and "lm_head" not in name


BASE_CARD = (
    "Tiny Llama (8 layers) pre-trained on the zoo's synthetic corpus: stories in English and in "
    "the toy language Zeta (a word-for-word substitution), parallel sentences, a dictionary and "
    "single-digit addition."
)
CARDS = {
    "math": "`base` fine-tuned on two-digit addition asked in English (embeddings frozen).",
    "lang": "`base` fine-tuned on colour questions asked in Zeta (embeddings frozen).",
}
MOE_CARD = (
    "Mixtral (4 experts, top-2) up-cycled from `base` (every expert starts as its MLP plus "
    "noise) and trained on a mix of the corpus, the math and the lang training sets."
)
