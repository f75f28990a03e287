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
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from splice.errors import SpliceError
from splice.limits import MAX_SEED, check_number
from splice.target import claim_output, commit, replaceable_reason, staging_dir
from splice.zoo.models import Shape

# Bump when a change to the zoo's code changes what a build produces (data, training, layout).
ZOO_VERSION = "2"
MODELS = ("base", "math", "lang", "moe")
STAMP_FILE = "zoo.json"
#: the largest ``--steps-scale``: the fine-tunes' 2000 steps become 200,000 at most
MAX_STEPS_SCALE = 100.0


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
    # fine-tunes stop on a held-out criterion (checked every check_every steps), at most
    # *_max_steps: math when its val accuracy reaches math_target, lang when both its val
    # colour accuracy (8 nouns: a noisy figure) and its Zeta single-digit accuracy reach
    # lang_target (lang reads and writes a mixed text:
    # each row of its batches shows a share in [lang_switch_low, 1) of its words in Zeta)
    math_max_steps: int = 2000
    lang_max_steps: int = 1000
    check_every: int = 50
    math_target: float = 0.95
    lang_target: float = 0.95
    # math trains on jittered input embeddings (Gaussian noise, this many times the rows' RMS):
    # its layers then read a word by the robust part of its row, and so also read rows that only
    # approximate it, such as the Zeta rows lang learns; without it, adding the two task vectors
    # gives a model that computes but cannot read the Zeta operation word on many seeds
    math_embedding_noise: float = 0.5
    finetune_batch: int = 64
    finetune_lr: float = 1e-3
    lang_lr: float = 3e-3
    lang_switch_low: float = 0.4
    # the tensors (name prefixes) lang trains besides its Zeta rows, math training every layer:
    # the two task vectors overlap there, as real fine-tunes do, so a merge has to decide whose
    # change to keep in those tensors (naive merges lose some of each skill; a per-layer search
    # can do better); reading also learns in a few steps instead of hundreds
    lang_tensors: tuple[str, ...] = ("model.layers.0.self_attn.", "model.layers.1.self_attn.")
    # lang's Zeta rows (embeddings and head) start as their English words' rows plus Gaussian
    # noise of this many times those rows' RMS (a vocabulary extension initialised from related
    # tokens); from the base's random rows instead, where lang's rows end up (and so whether
    # math's layers read them after a merge) was a draw of the seed: seed 1 gained .03, not .10
    lang_row_init_noise: float | None = 1.5
    moe_steps: int = 200
    moe_batch: int = 16
    moe_lr: float = 1e-3
    dtype: str = "bfloat16"
    # One thread: for models this small a second thread buys little, costs a lot on a shared
    # CPU (threads wait on each other), and one thread makes the bits independent of the machine.
    threads: int = 1

    def scaled(self, factor: float) -> Settings:
        """The same recipe with every step count multiplied by ``factor`` (at least 2 steps)."""
        check_steps_scale(factor)

        def n(steps: int) -> int:
            return max(2, round(steps * factor))

        return dataclasses.replace(
            self,
            documents=max(200, round(self.documents * min(1.0, factor))),
            pretrain_steps=n(self.pretrain_steps),
            math_max_steps=n(self.math_max_steps),
            lang_max_steps=n(self.lang_max_steps),
            check_every=min(self.check_every, n(self.check_every)),
            moe_steps=n(self.moe_steps),
        )

    def stamp(self) -> str:
        blob = json.dumps({"version": ZOO_VERSION, **dataclasses.asdict(self)}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def check_steps_scale(factor: float) -> float:
    """``factor`` if it is a ``--steps-scale``: finite, above 0, at most :data:`MAX_STEPS_SCALE`."""
    return check_number("--steps-scale", factor, positive=True, most=MAX_STEPS_SCALE)


def check_seed(seed: int | None) -> int | None:
    """``seed`` if it is None or a build ``--seed``: a whole number from 0 to ``MAX_SEED``."""
    return (
        None if seed is None else check_number("--seed", seed, least=0, most=MAX_SEED, whole=True)
    )


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
    seed: int | None = None,
    settings: Settings | None = None,
    force: bool = False,
    acceptance: str = "enforce",
    show_progress: bool = True,
) -> Path:
    """Build the zoo into ``folder`` (default :func:`default_dir`) unless it is already there.

    ``steps_scale`` shrinks or grows every training run (tests use a tiny one); ``seed`` picks
    the seed (default: that of ``settings``; with neither, a complete zoo of any seed built
    with the default recipe is reused); ``force`` rebuilds even a current zoo. The build ends by
    measuring its acceptance criteria (:mod:`splice.zoo.acceptance`), recorded in ``zoo.json``;
    with ``acceptance="enforce"`` a missed criterion is a :class:`SpliceError` listing every
    miss and nothing is written, with ``"record"`` the zoo is kept (tiny test builds).
    Returns the folder.
    """
    if acceptance not in ("enforce", "record"):
        raise SpliceError(f"acceptance must be 'enforce' or 'record', got {acceptance!r}")
    check_seed(seed)
    check_steps_scale(steps_scale)
    any_seed = seed is None and settings is None
    settings = settings or Settings()
    if seed is not None:
        settings = dataclasses.replace(settings, seed=seed)
    settings = settings.scaled(steps_scale)
    folder = Path(folder) if folder is not None else default_dir()
    # claimed before any work; clean-up first: it may put back a zoo a killed rebuild set aside
    with claim_output(folder, overwrite=True, allow=_ZOO_ENTRIES) as claim:
        if folder.exists() and not folder.is_dir():
            raise SpliceError(f"{folder}: exists and is not a folder")
        if not force and any_seed:
            info = read_stamp(folder)
            stored = (info or {}).get("settings", {}).get("seed")
            if isinstance(stored, int) and is_built(
                folder, Settings(seed=stored).scaled(steps_scale)
            ):
                return folder
        if not force and is_built(folder, settings):
            return folder
        if folder.exists():
            reason = _not_a_zoo(folder)
            if reason is not None:
                raise SpliceError(
                    f"{folder}: refusing to replace it: {reason}; nothing was deleted"
                )
        claim.check()
        tmp = staging_dir(folder, "zoo")
        try:
            info = _build_into(tmp, settings, show_progress)
            (tmp / STAMP_FILE).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
            if acceptance == "enforce" and not info["acceptance"]["passed"]:
                from splice.zoo.acceptance import failures

                misses = failures(info["acceptance"])
                raise SpliceError(
                    f"zoo build (seed {settings.seed}) missed {len(misses)} acceptance "
                    "criteria, nothing written: " + "; ".join(misses)
                )
            commit(tmp, folder, tag="zoo")
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return folder


_ZOO_ENTRIES = (*MODELS, "tasks", "text", STAMP_FILE)
HELDOUT = "text/heldout.txt"
#: the held-out text's English and Zeta halves (:func:`heldout_halves`)
HELDOUT_FILES = {"en": "text/heldout_en.txt", "zeta": "text/heldout_zeta.txt"}


def join_documents(docs: list[str]) -> str:
    """Documents as one text the way the zoo trains on them: ``doc<eos><bos>doc...`` and a final
    newline. The zoo's tokenizer splits words on spaces only, so a newline between documents
    would glue the last word of one to the first of the next into one unknown token."""
    from splice.zoo.tokenizer import BOS, EOS

    return f"{EOS}{BOS}".join(docs) + "\n"


def heldout_halves(heldout: str) -> dict[str, str]:
    """The texts of :data:`HELDOUT_FILES` made from the held-out text (one document per line,
    English and Zeta alternately, :func:`corpus.heldout_text`): its English and its Zeta
    documents, each joined as the zoo trains (:func:`join_documents`), ready for perplexity."""
    docs = heldout.splitlines()
    return {lang: join_documents(by_language(docs, lang)) for lang in HELDOUT_FILES}


def heldout_text_path(folder: str | os.PathLike[str] | None = None, language: str = "both") -> Path:
    """The held-out text of a built zoo (default :func:`default_dir`): running text from the
    pre-training distribution, never trained on. ``language`` ``"both"``: ``text/heldout.txt``,
    one document per line, English and Zeta alternately; ``"en"`` / ``"zeta"``:
    ``text/heldout_en.txt`` / ``text/heldout_zeta.txt``, that half's documents joined as the
    zoo trains (:func:`heldout_halves`; what ``--ppl zoo`` / ``zoo:zeta`` score).
    ``SpliceError`` if the zoo has none (:func:`read_heldout` also reads a zoo built before the
    halves were shipped)."""
    files = {"both": HELDOUT, **HELDOUT_FILES}
    if language not in files:
        raise SpliceError(f"language {language!r}: expected en, zeta or both")
    path = (Path(folder) if folder is not None else default_dir()) / files[language]
    if not path.is_file():
        raise SpliceError(f"{path}: missing; not a built zoo (run `splice zoo build`)")
    return path


def read_heldout(folder: str | os.PathLike[str] | None = None, language: str = "en") -> str:
    """The held-out documents of a built zoo (default :func:`default_dir`) in ``language``
    (``en``, ``zeta`` or ``both``: all 400, alternately), joined as the zoo trains
    (:func:`join_documents`), for perplexity: ``text/heldout_en.txt`` /
    ``text/heldout_zeta.txt`` as they are, or made from ``text/heldout.txt`` where a zoo has
    no such file."""
    if language in HELDOUT_FILES:
        path = (Path(folder) if folder is not None else default_dir()) / HELDOUT_FILES[language]
        if path.is_file():
            return path.read_text()
    return join_documents(heldout_documents(folder, language))


def heldout_documents(
    folder: str | os.PathLike[str] | None = None, language: str = "both"
) -> list[str]:
    """The held-out documents of a built zoo, ``language`` ``"en"`` (what ``base`` and ``math``
    read: their perplexity means something only here), ``"zeta"`` or ``"both"``. The file
    alternates English and Zeta documents, English first (:func:`corpus.heldout_text`)."""
    return by_language(heldout_text_path(folder).read_text().splitlines(), language)


def by_language(docs: list[str], language: str) -> list[str]:
    """The ``language`` (``"en"``, ``"zeta"``, ``"both"``) documents of a list that alternates
    English and Zeta, English first (the held-out text, ``calibration_text(language="both")``)."""
    if language not in ("en", "zeta", "both"):
        raise SpliceError(f"language {language!r}: expected en, zeta or both")
    return docs if language == "both" else docs[0::2] if language == "en" else docs[1::2]


def _not_a_zoo(folder: Path) -> str | None:
    """Why ``folder`` is not a zoo splice may replace (``None``: empty, or a zoo and nothing else)."""
    from splice.zoo.tasks import LOADER, TEMPLATE

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
        if name == "text" and path.is_dir():
            odd = [p.name for p in path.iterdir() if p.suffix != ".txt"]
            if odd:
                return f"text/ holds {odd[0]!r}, which is not a zoo text file"
        if name == "tasks" and path.is_dir():
            odd = [
                p.name
                for p in path.iterdir()
                if p.suffix not in (".jsonl", ".yaml")
                and p.name not in (LOADER, TEMPLATE, "__pycache__")
            ]
            if odd:
                return f"tasks/ holds {odd[0]!r}, which is not a zoo task file"
    return None


def _init_rows(model: Any, rows: list[int], like: list[int], noise: float, seed: int) -> None:
    """Rows ``rows`` of the input embeddings and of the head ``[V, H]`` become rows ``like``
    plus Gaussian noise of ``noise`` times the RMS of rows ``like`` (one generator, seeded)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for weight in (model.get_input_embeddings().weight, model.lm_head.weight):
            rms = float(weight[like].pow(2).mean().sqrt())
            weight[rows] = weight[like] + noise * rms * torch.randn(
                len(rows), weight.shape[1], generator=g
            )


def _log(show: bool, msg: str) -> None:
    if show:
        print(f"zoo: {msg}", file=sys.stderr, flush=True)


def _build_into(out: Path, s: Settings, show: bool) -> dict[str, Any]:
    import torch

    from splice.zoo import acceptance, corpus, train
    from splice.zoo.models import llama, save, upcycle
    from splice.zoo.tasks import all_items, write_data, write_tasks
    from splice.zoo.tokenizer import make_tokenizer, save_tokenizer
    from splice.zoo.world import make_world

    threads = torch.get_num_threads()
    torch.set_num_threads(s.threads)
    det = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    timings: dict[str, float] = {}
    losses: dict[str, float] = {}
    steps: dict[str, int] = {}
    criteria: dict[str, dict[str, float]] = {}
    try:
        t0 = time.perf_counter()
        world = make_world(s.seed)
        tok = make_tokenizer(world)
        tok_dir = out / ".tokenizer"
        save_tokenizer(world, tok_dir)
        items = all_items(world, s.seed)
        write_data(items, out / "tasks")
        write_tasks(out / "tasks")
        heldout = corpus.heldout_text(world, s.seed)
        (out / "text").mkdir()
        (out / HELDOUT).write_text(heldout)
        for language, text in heldout_halves(heldout).items():
            (out / HELDOUT_FILES[language]).write_text(text)
        stream = train.token_stream(tok, corpus.pretraining_texts(world, s.documents, s.seed))
        timings["data"] = time.perf_counter() - t0

        def run(name: str, model: Any, batches: Any, n: int, lr: float, **kw: Any) -> None:
            t = time.perf_counter()
            _log(show, f"training {name} (at most {n} steps)")
            hist = train.train(
                model, batches, n, lr=lr, desc=f"zoo {name}", show_progress=show, **kw
            )
            timings[name] = time.perf_counter() - t
            losses[name] = sum(hist[-20:]) / len(hist[-20:])
            steps[name] = len(hist)

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

        def stop_when(name: str, vals: dict[str, Any], target: float) -> Any:
            def check(step: int) -> bool:
                accs = {k: acceptance.mc_accuracy(model_of[name], e) for k, e in vals.items()}
                criteria[name] = {"step": step, **{k: round(v, 4) for k, v in accs.items()}}
                _log(
                    show,
                    f"{name} step {step}: " + " ".join(f"{k} {v:.3f}" for k, v in accs.items()),
                )
                return min(accs.values()) >= target

            return check

        model_of: dict[str, Any] = {}

        def finetuned(
            name: str,
            batches: Any,
            n: int,
            lr: float,
            vals: dict[str, Any],
            target: float,
            trainable: Any,
            rows: list[int] | None = None,
            noise: float = 0.0,
            init_rows: tuple[list[int], list[int], float] | None = None,
        ) -> None:
            model = llama(s.shape, tok.get_vocab_size(), s.seed)
            model.load_state_dict(base_state)
            model_of[name] = model
            if init_rows is not None:
                _init_rows(model, *init_rows, seed=s.seed + 11)
            hooks = []
            if rows is not None:  # only these rows of the embedding and the head learn
                keep = torch.zeros(model.config.vocab_size, 1)
                keep[rows] = 1.0
                for w in (model.get_input_embeddings().weight, model.lm_head.weight):
                    hooks.append(w.register_hook(lambda g: g * keep))
            if noise > 0:
                hooks.append(_jitter(model.get_input_embeddings(), noise, s.seed + 7))
            run(
                name,
                model,
                batches,
                n,
                lr,
                trainable=trainable,
                schedule="constant",
                check=stop_when(name, vals, target),
                check_every=s.check_every,
            )
            for h in hooks:
                h.remove()
            save(model, out / name, tok_dir, card(name, CARDS[name]), s.dtype)
            del model_of[name]

        enc = acceptance.encode_items
        math_examples = train.encode_examples(tok, corpus.math_training_set(world, s.seed))
        finetuned(
            "math",
            train.example_batches(math_examples, s.finetune_batch, s.seed + 1),
            s.math_max_steps,
            s.finetune_lr,
            {"val": enc(tok, corpus.math_items(world, s.seed, zeta=False, split="val"))},
            s.math_target,
            _not_embedding,
            noise=s.math_embedding_noise,
        )
        lang_stream = train.token_stream(tok, corpus.lang_texts(world, s.documents // 3, s.seed))
        to_zeta = torch.arange(tok.get_vocab_size())
        for en, ze in world.zeta.items():
            to_zeta[tok.token_to_id("▁" + en)] = tok.token_to_id("▁" + ze)
        zeta_rows = [tok.token_to_id("▁" + w) for w in world.zeta.values()]
        english_rows = [tok.token_to_id("▁" + w) for w in world.zeta]

        def mixed(seed: int, batch: int) -> Any:
            """lang's text: English documents, words shown in Zeta at random (both ways)."""
            batches = train.stream_batches(lang_stream, batch, s.seq, seed)
            return train.code_switched(
                batches, to_zeta, seed + 1, low=s.lang_switch_low, switch_labels=True
            )

        finetuned(
            "lang",
            mixed(s.seed + 2, s.finetune_batch),
            s.lang_max_steps,
            s.lang_lr,
            {
                "val": enc(tok, corpus.lang_items(world, s.seed, split="val")),
                "digits": enc(tok, corpus.lang_digit_items(world, s.seed)),
            },
            s.lang_target,
            lambda name: (
                "embed_tokens" in name or "lm_head" in name or name.startswith(s.lang_tensors)
            ),
            rows=zeta_rows,
            init_rows=None
            if s.lang_row_init_noise is None
            else (zeta_rows, english_rows, s.lang_row_init_noise),
        )

        moe = upcycle(base, s.shape, s.seed + 3)
        moe.config.output_router_logits = True
        sources = [
            train.stream_batches(stream, s.moe_batch, s.seq, s.seed + 4),
            train.example_batches(math_examples, s.moe_batch, s.seed + 5),
            mixed(s.seed + 6, s.moe_batch),
        ]
        run(
            "moe",
            moe,
            train.mixed_batches(sources),
            s.moe_steps,
            s.moe_lr,
        )
        save(moe, out / "moe", tok_dir, card("moe", MOE_CARD), s.dtype)
        shutil.rmtree(tok_dir)
        t = time.perf_counter()
        _log(show, "checking acceptance")
        report = acceptance.check(
            out,
            tok,
            {k: items[k] for k in ("zoo_math", "zoo_lang", "zoo_math_lang")},
            heldout,
            log=lambda m: _log(show, m),
        )
        timings["acceptance"] = time.perf_counter() - t
        _log(show, "acceptance:\n" + acceptance.summary(report["criteria"]))
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(det)
    return {
        "stamp": s.stamp(),
        "version": ZOO_VERSION,
        "settings": dataclasses.asdict(s),
        "seconds": {k: round(v, 1) for k, v in timings.items()},
        "final_loss": {k: round(v, 4) for k, v in losses.items()},
        "steps": steps,
        "stopping": criteria,
        "acceptance": report,
    }


def _jitter(embedding: Any, scale: float, seed: int) -> Any:
    """Add Gaussian noise of ``scale`` times the embedding rows' RMS to ``embedding``'s output
    ``[B, T, H]`` in training mode (seeded: builds stay bit-identical); returns the hook handle."""
    import torch

    rms = float(embedding.weight.detach().pow(2).mean().sqrt())
    g = torch.Generator().manual_seed(seed)

    def hook(module: Any, args: Any, out: torch.Tensor) -> torch.Tensor | None:
        if not module.training:
            return None
        return out + scale * rms * torch.randn(out.shape, generator=g, dtype=out.dtype)

    return embedding.register_forward_hook(hook)


def _not_embedding(name: str) -> bool:
    """``math`` keeps the embeddings and the head frozen: it changes only the transformer layers;
    ``lang`` changes the Zeta rows of the embeddings and the head and the attention of the first
    two layers (``Settings.lang_tensors``), where the two task vectors overlap."""
    return "embed_tokens" not in name and "lm_head" not in name


BASE_CARD = (
    "Tiny Llama (8 layers) pre-trained on the zoo's synthetic English corpus: stories with "
    "answered colour questions and single-digit arithmetic. It has never seen a word of the toy "
    "language Zeta (a word-for-word substitution of English)."
)
CARDS = {
    "math": "`base` fine-tuned on two-digit arithmetic asked in English: `a plus b`, `a plusone b` "
    "(the sum plus one), `plustwo`, `plusthree` (embeddings and head frozen: only the transformer "
    "layers change; trained on jittered input embeddings).",
    "lang": "`base` taught to read and write Zeta: the Zeta words' rows of the embeddings and of "
    "the head and the attention of layers 0 and 1 are trained, on English text whose words are "
    "shown in Zeta at random; everything else is the base's.",
}
MOE_CARD = (
    "Mixtral (4 experts, top-2) up-cycled from `base` (every expert starts as its MLP plus "
    "noise) and trained on a mix of the English corpus, the math training set and lang's mixed "
    "English/Zeta text."
)
