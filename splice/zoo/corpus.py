"""Text of the zoo: the pre-training corpus, the specialists' training sets and the test items.

Everything is generated from a seed. Sentences are built in English word lists and translated to
Zeta word by word (:meth:`World.to_zeta`). Held-out data is disjoint from training data, and the
splits from each other, by construction: the operand pairs of the ``val`` (stopping criterion),
``fit`` (what a search may optimise on) and ``report`` splits are disjoint sets of unordered
pairs that ``math`` never trains on (in either order); the colour questions of each split ask
about their own nouns (:class:`World`), never one ``lang`` was asked about.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache, partial

from splice.calib.text import SOURCES
from splice.zoo.world import COLOURS, NAMES, OPS, SIZES, VERBS, World, apply_op

TWO_DIGIT = range(10, 100)


@dataclass(frozen=True)
class Example:
    """A prompt and its answer (the answer starts with a space: ``" 72"``)."""

    prompt: str
    answer: str


@dataclass(frozen=True)
class Item:
    """A multiple-choice test item: ``choices[gold]`` is the answer of ``prompt``."""

    prompt: str
    choices: tuple[str, ...]
    gold: int


# ---- sentences (English word lists) -----------------------------------------------------------
def _np(world: World, noun: str, rng: random.Random) -> list[str]:
    """A noun phrase that always shows the noun's true colour: ``the red apple``."""
    if rng.random() < 0.3:
        return ["the", rng.choice(SIZES), world.colour_of[noun], noun]
    return ["the", world.colour_of[noun], noun]


def story_sentence(world: World, rng: random.Random) -> list[str]:
    """One true sentence about the world (nouns keep their colours)."""
    n1, n2 = rng.sample(world.nouns, 2)
    kind = rng.randrange(6)
    if kind == 0:
        return [rng.choice(NAMES), rng.choice(VERBS), *_np(world, n1, rng), "."]
    if kind == 1:
        return [*_np(world, n1, rng), "is", "near", *_np(world, n2, rng), "."]
    if kind == 2:
        return ["the", n1, "is", world.colour_of[n1], "."]
    if kind == 3:
        return [*_np(world, n1, rng), "is", "very", rng.choice(SIZES), "."]
    if kind == 4:
        a, b = rng.sample(NAMES, 2)
        return [a, "and", b, rng.choice(VERBS), *_np(world, n1, rng), "."]
    return ["the", n1, "is", world.colour_of[n1], "and", "the", n2, "is", "too", "."]


def colour_question(noun: str) -> list[str]:
    return ["question", ":", "what", "colour", "is", "the", noun, "?"]


def op_question(a: int, op: str, b: int) -> list[str]:
    return ["question", ":", "what", "is", str(a), op, str(b), "?"]


def _say(world: World, words: list[str], zeta: bool) -> str:
    return " ".join(world.to_zeta(words) if zeta else words)


# ---- pre-training -----------------------------------------------------------------------------
def answered_colour_question(world: World, noun: str) -> list[str]:
    return [*colour_question(noun), "answer", ":", world.colour_of[noun]]


def story_document(
    world: World, rng: random.Random, nouns: Sequence[str] | None = None
) -> list[str]:
    """3-6 story sentences, a quarter of them followed by an answered colour question about one
    of ``nouns`` (default: any noun)."""
    words: list[str] = []
    for _ in range(rng.randint(3, 6)):
        if rng.random() < 0.25:
            words += answered_colour_question(world, rng.choice(nouns or world.nouns))
        words += story_sentence(world, rng)
    return words


def single_digit_document(rng: random.Random) -> list[str]:
    """3-6 single-digit facts of the four operations: ``3 plustwo 4 makes 9 .`` or answered
    questions."""
    words: list[str] = []
    for _ in range(rng.randint(3, 6)):
        a, b, op = rng.randrange(10), rng.randrange(10), rng.choice(OPS)
        r = str(apply_op(op, a, b))
        if rng.random() < 0.5:
            words += [str(a), op, str(b), "makes", r, "."]
        else:
            words += [*op_question(a, op, b), "answer", ":", r]
    return words


def pretraining_document(
    world: World, rng: random.Random, nouns: Sequence[str] | None = None
) -> str:
    """One English document (no BOS/EOS; see :func:`pretraining_texts`): 50% stories with
    answered colour questions, 12% lists of answered colour questions, 38% single-digit
    arithmetic. No Zeta word ever occurs: the base cannot read Zeta. ``nouns`` limits the colour
    questions (``lang``'s training text asks only about its training nouns)."""
    x = rng.random()
    if x < 0.5:
        return " ".join(story_document(world, rng, nouns))
    if x < 0.62:
        asked = rng.sample(list(nouns or world.nouns), 5)
        return " ".join(w for n in asked for w in answered_colour_question(world, n))
    return " ".join(single_digit_document(rng))


def pretraining_texts(world: World, count: int, seed: int) -> list[str]:
    """``count`` documents for pre-training."""
    rng = random.Random(seed)
    return [pretraining_document(world, rng) for _ in range(count)]


def lang_texts(world: World, count: int, seed: int) -> list[str]:
    """``count`` English documents for ``lang``'s training, whose words training shows in Zeta
    at random (:func:`splice.zoo.train.code_switched`); its colour questions ask only about
    ``lang_train_nouns``, so the held-out colour questions are about nouns never asked."""
    rng = random.Random(seed + 202)
    return [pretraining_document(world, rng, world.lang_train_nouns) for _ in range(count)]


def calibration_text(
    documents: int = 200, *, world_seed: int = 0, seed: int = 99_991, language: str = "en"
) -> str:
    """Fresh documents from the zoo's pre-training distribution, one per line, for activation
    analysis; drawn with another seed than the training corpus. ``language="en"``
    (``--calibration zoo``): English, what ``base`` and ``math`` read; ``"both"``
    (``--calibration zoo:both``): English and Zeta alternately, the held-out text's distribution
    and what ``lang`` and ``moe`` were trained on; ``"zeta"``: Zeta only."""
    from splice.zoo.world import make_world

    world = make_world(world_seed)
    if language == "en":
        return "\n".join(pretraining_texts(world, documents, seed))
    if language not in ("both", "zeta"):
        raise ValueError(f"language {language!r}: expected en, both or zeta")
    rng = random.Random(seed + 606)
    docs = [story_document(world, rng) for _ in range(documents)]
    zeta = [language == "zeta" or i % 2 == 1 for i in range(documents)]
    return "\n".join(_say(world, d, zeta=z) for d, z in zip(docs, zeta, strict=True))


#: calibration sources drawn from the zoo's corpus (``--calibration zoo``): name -> language;
#: registered in :data:`splice.calib.text.SOURCES` when this module is imported (the core
#: imports it on first use of a ``zoo`` source: :data:`splice.calib.text.PROVIDERS`)
ZOO_SOURCES = {"zoo": "en", "zoo:en": "en", "zoo:both": "both", "zoo:zeta": "zeta"}
for _name, _language in ZOO_SOURCES.items():
    SOURCES.register(_name)(partial(calibration_text, language=_language))


def heldout_text(world: World, seed: int, documents: int = 400) -> str:
    """Held-out text for perplexity, one document per line: stories of the pre-training
    distribution, alternately in English and in Zeta, drawn with their own seed (the
    ``text/heldout.txt`` of a built zoo)."""
    rng = random.Random(seed + 505)
    docs = []
    for i in range(documents):
        docs.append(_say(world, story_document(world, rng), zeta=i % 2 == 1))
    return "\n".join(docs) + "\n"


# ---- skills -----------------------------------------------------------------------------------
#: sizes of the held-out splits of operand pairs (unordered, disjoint)
MATH_SPLITS = {"report": 500, "fit": 250, "val": 200}


@cache
def math_split_pairs(seed: int) -> dict[str, tuple[tuple[int, int], ...]]:
    """Held-out ordered two-digit operand pairs per split (``report``, ``fit``, ``val``): their
    unordered pairs are disjoint, and none is ever trained on, in either order."""
    rng = random.Random(seed + 101)
    pairs = [(a, b) for a in TWO_DIGIT for b in TWO_DIGIT if a <= b]
    rng.shuffle(pairs)
    out: dict[str, tuple[tuple[int, int], ...]] = {}
    at = 0
    for split, n in MATH_SPLITS.items():
        chosen = pairs[at : at + n]
        at += n
        out[split] = tuple((a, b) if rng.random() < 0.5 else (b, a) for a, b in chosen)
    return out


def math_train_pairs(seed: int) -> list[tuple[int, int]]:
    """Every ordered two-digit pair none of whose orders is in a held-out split."""
    held = {tuple(sorted(p)) for ps in math_split_pairs(seed).values() for p in ps}
    return [(a, b) for a in TWO_DIGIT for b in TWO_DIGIT if tuple(sorted((a, b))) not in held]


def math_example(world: World, a: int, op: str, b: int, zeta: bool) -> Example:
    prompt = _say(world, [*op_question(a, op, b), "answer", ":"], zeta)
    return Example(prompt, f" {apply_op(op, a, b)}")


def math_training_set(world: World, seed: int) -> list[Example]:
    """Two-digit arithmetic asked in English: every training pair with every operation."""
    return [math_example(world, a, op, b, False) for a, b in math_train_pairs(seed) for op in OPS]


# ---- test items -------------------------------------------------------------------------------
def _op_items(
    world: World, pairs: Sequence[tuple[int, int]], zeta: bool, rng: random.Random
) -> list[Item]:
    """One item per pair, the operations in turn; the four choices are the four operations'
    results on the same operands (four consecutive numbers), so a model must both read the
    operation and compute the sum."""
    items = []
    for i, (a, b) in enumerate(pairs):
        op = OPS[i % len(OPS)]
        results = [apply_op(o, a, b) for o in OPS]
        rng.shuffle(results)
        items.append(
            Item(
                math_example(world, a, op, b, zeta).prompt,
                tuple(f" {r}" for r in results),
                results.index(apply_op(op, a, b)),
            )
        )
    return items


def math_items(world: World, seed: int, zeta: bool, split: str = "report") -> list[Item]:
    """Held-out arithmetic asked in English (``zoo_math``) or in Zeta (``zoo_math_lang``, the
    same questions), on the operand pairs of ``split`` (``report``, ``fit`` or ``val``)."""
    rng = random.Random(seed + 303 + 7 * list(MATH_SPLITS).index(split))
    return _op_items(world, math_split_pairs(seed)[split], zeta, rng)


def lang_digit_items(world: World, seed: int) -> list[Item]:
    """Single-digit arithmetic asked in Zeta (every pair): the base can compute it in English,
    so this measures whether the operation words are read; half of ``lang``'s stopping check."""
    pairs = [(a, b) for a in range(10) for b in range(10)]
    return _op_items(world, pairs, True, random.Random(seed + 606))


LANG_SPLITS = {"report": 16, "fit": 8, "val": 8}  # prompts per noun


def lang_items(world: World, seed: int, split: str = "report") -> list[Item]:
    """Held-out colour questions asked in Zeta, answered in English, about the nouns of
    ``split`` (``zoo_lang``: report), after a story sentence half of the time."""
    nouns = {
        "report": world.lang_test_nouns,
        "fit": world.lang_fit_nouns,
        "val": world.lang_val_nouns,
    }[split]
    rng = random.Random(seed + 404 + 7 * list(LANG_SPLITS).index(split))
    items = []
    for noun in nouns:
        prompts: set[str] = set()
        while len(prompts) < LANG_SPLITS[split]:
            words = story_sentence(world, rng) if rng.random() < 0.5 else []
            prompts.add(_say(world, [*words, *colour_question(noun), "answer", ":"], True))
        for prompt in sorted(prompts):
            right = world.colour_of[noun]
            wrong = rng.sample([c for c in COLOURS if c != right], 3)
            choices = [right, *wrong]
            rng.shuffle(choices)
            items.append(Item(prompt, tuple(" " + c for c in choices), choices.index(right)))
    return items
