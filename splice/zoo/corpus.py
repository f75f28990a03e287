"""Text of the zoo: the pre-training corpus, the specialists' training sets and the test items.

Everything is generated from a seed. Sentences are built in English word lists and translated to
Zeta word by word (:meth:`World.to_zeta`). Held-out data is disjoint from training data by
construction: the addition pairs of the tests (in either order) never appear in ``math``'s
training set, and the colour questions of the tests ask about nouns ``lang`` was never trained on.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from splice.zoo.world import COLOURS, NAMES, SIZES, VERBS, World

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


def sum_question(a: int, b: int) -> list[str]:
    return ["question", ":", "what", "is", str(a), "plus", str(b), "?"]


def _say(world: World, words: list[str], zeta: bool) -> str:
    return " ".join(world.to_zeta(words) if zeta else words)


# ---- pre-training -----------------------------------------------------------------------------
def pretraining_document(world: World, rng: random.Random) -> str:
    """One document of the general corpus (no BOS/EOS; see :func:`pretraining_texts`).

    Mix: 55% stories in one language with unanswered colour questions, 20% parallel sentences,
    10% dictionary entries, 15% single-digit addition (facts and answered questions).
    """
    r = rng.random()
    zeta = rng.random() < 0.5
    if r < 0.55:
        words: list[str] = []
        for _ in range(rng.randint(3, 6)):
            if rng.random() < 0.15:
                words += colour_question(rng.choice(world.nouns))
            words += story_sentence(world, rng)
        return _say(world, words, zeta)
    if r < 0.75:
        parts = []
        for _ in range(rng.randint(1, 3)):
            s = story_sentence(world, rng)
            first, second = ("zeta", "english") if zeta else ("english", "zeta")
            parts.append(f"{first} : {_say(world, s, zeta)} {second} : {_say(world, s, not zeta)}")
        return " ".join(parts)
    if r < 0.85:
        entries = []
        for w in rng.sample(world.english, 6):
            entries.append(
                f"english {w} means {world.zeta[w]} in zeta ."
                if not zeta
                else f"zeta {world.zeta[w]} means {w} in english ."
            )
        return " ".join(entries)
    parts = []
    for _ in range(rng.randint(3, 6)):
        a, b = rng.randrange(10), rng.randrange(10)
        if rng.random() < 0.5:
            words = [str(a), "plus", str(b), "makes", str(a + b), "."]
        else:
            words = [*sum_question(a, b), "answer", ":", str(a + b)]
        parts.append(_say(world, words, zeta))
    return " ".join(parts)


def pretraining_texts(world: World, count: int, seed: int) -> list[str]:
    """``count`` documents for pre-training."""
    rng = random.Random(seed)
    return [pretraining_document(world, rng) for _ in range(count)]


def calibration_text(documents: int = 200, *, world_seed: int = 0, seed: int = 99_991) -> str:
    """Fresh documents from the zoo's pre-training distribution, one per line, for activation
    analysis (``--calibration zoo``); drawn with another seed than the training corpus."""
    from splice.zoo.world import make_world

    return "\n".join(pretraining_texts(make_world(world_seed), documents, seed))


# ---- skills -----------------------------------------------------------------------------------
def math_test_pairs(seed: int, count: int = 500) -> list[tuple[int, int]]:
    """Held-out two-digit addition pairs (``a + b``); neither order is ever trained on."""
    rng = random.Random(seed + 101)
    pairs = [(a, b) for a in TWO_DIGIT for b in TWO_DIGIT if a <= b]
    rng.shuffle(pairs)
    out = [(a, b) if rng.random() < 0.5 else (b, a) for a, b in pairs[:count]]
    return out


def math_train_pairs(seed: int, count: int = 500) -> list[tuple[int, int]]:
    """Every ordered two-digit pair that is not a test pair (in either order)."""
    test = {tuple(sorted(p)) for p in math_test_pairs(seed, count)}
    return [(a, b) for a in TWO_DIGIT for b in TWO_DIGIT if tuple(sorted((a, b))) not in test]


def math_example(world: World, a: int, b: int, zeta: bool) -> Example:
    prompt = _say(world, [*sum_question(a, b), "answer", ":"], zeta)
    return Example(prompt, f" {a + b}")


def lang_example(world: World, noun: str, rng: random.Random) -> Example:
    """A colour question in Zeta, after a context sentence half of the time."""
    words = story_sentence(world, rng) if rng.random() < 0.5 else []
    words += [*colour_question(noun), "answer", ":"]
    return Example(_say(world, words, True), " " + world.zeta[world.colour_of[noun]])


def math_training_set(world: World, seed: int) -> list[Example]:
    return [math_example(world, a, b, False) for a, b in math_train_pairs(seed)]


def lang_training_set(world: World, seed: int, count: int = 4000) -> list[Example]:
    rng = random.Random(seed + 202)
    return [lang_example(world, rng.choice(world.lang_train_nouns), rng) for _ in range(count)]


# ---- test items -------------------------------------------------------------------------------
def _sum_choices(total: int, rng: random.Random) -> tuple[tuple[str, ...], int]:
    """The answer and three wrong ones that differ only in the last digit."""
    tens = total - total % 10
    wrong = rng.sample([tens + d for d in range(10) if tens + d != total], 3)
    choices = [total, *wrong]
    rng.shuffle(choices)
    return tuple(f" {c}" for c in choices), choices.index(total)


def math_items(world: World, seed: int, zeta: bool) -> list[Item]:
    """Held-out addition asked in English (``zoo_math``) or in Zeta (``zoo_math_lang``)."""
    rng = random.Random(seed + 303)
    items = []
    for a, b in math_test_pairs(seed):
        choices, gold = _sum_choices(a + b, rng)
        items.append(Item(math_example(world, a, b, zeta).prompt, choices, gold))
    return items


def lang_items(world: World, seed: int, per_noun: int = 8) -> list[Item]:
    """Held-out colour questions in Zeta about nouns ``lang`` never saw asked (``zoo_lang``)."""
    rng = random.Random(seed + 404)
    items = []
    for noun in world.lang_test_nouns:
        prompts = set()
        while len(prompts) < per_noun:
            prompts.add(lang_example(world, noun, rng).prompt)
        for prompt in sorted(prompts):
            right = world.colour_of[noun]
            wrong = rng.sample([c for c in COLOURS if c != right], 3)
            choices = [right, *wrong]
            rng.shuffle(choices)
            items.append(
                Item(prompt, tuple(" " + world.zeta[c] for c in choices), choices.index(right))
            )
    return items
