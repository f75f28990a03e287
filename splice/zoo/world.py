"""The zoo's tiny world: English words, the toy language Zeta, and the facts both describe.

Zeta is a word-for-word substitution of English: every English word has one invented Zeta word,
word order, punctuation and digits are shared. Every noun has one fixed colour, which the
English stories of the pre-training corpus mention and the ``lang`` skill asks about in Zeta;
the ``math`` skill is two-digit arithmetic with the four operations of :data:`OPS`.
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass, field
from functools import cache

NOUNS = tuple(
    [
        "cat",
        "dog",
        "bird",
        "fish",
        "cow",
        "pig",
        "horse",
        "sheep",
        "duck",
        "goat",
        "frog",
        "bee",
        "ant",
        "fox",
        "wolf",
        "bear",
        "lion",
        "mouse",
        "rat",
        "owl",
        "hen",
        "crab",
        "seal",
        "deer",
        "apple",
        "pear",
        "plum",
        "lemon",
        "grape",
        "melon",
        "cherry",
        "peach",
        "bean",
        "corn",
        "rice",
        "bread",
        "cake",
        "egg",
        "milk",
        "tea",
        "nut",
        "pie",
        "soup",
        "jam",
        "cup",
        "bowl",
        "pot",
        "pan",
        "box",
        "bag",
        "hat",
        "shoe",
        "coat",
        "sock",
        "ball",
        "kite",
        "drum",
        "bell",
        "lamp",
        "book",
        "pen",
        "key",
        "door",
        "boat",
        "car",
        "bus",
        "ship",
        "tree",
        "rock",
        "leaf",
        "flower",
        "chair",
        "table",
        "bed",
        "sofa",
        "clock",
        "rug",
        "vase",
        "fan",
        "cap",
        "ring",
        "coin",
        "map",
        "card",
        "tent",
        "flag",
        "rope",
        "net",
        "sled",
        "wagon",
        "cart",
        "drill",
        "saw",
        "nail",
        "brush",
        "comb",
        "fork",
        "spoon",
        "knife",
        "plate",
        "jar",
        "jug",
        "can",
        "mug",
        "shell",
        "star",
        "moon",
        "cloud",
        "hill",
        "lake",
        "road",
        "gate",
        "wall",
        "roof",
        "tower",
        "bridge",
        "wheel",
        "horn",
        "pipe",
        "bone",
        "tile",
        "kettle",
        "glove",
        "scarf",
        "bench",
        "stool",
        "fence",
        "pillow",
    ]
)
COLOURS = ("red", "blue", "green", "yellow", "black", "white", "pink", "brown")
NAMES = ("tom", "ann", "bob", "sue", "max", "eva", "leo", "mia")
VERBS = ("sees", "likes", "has", "finds", "wants", "takes", "draws", "hides")
SIZES = ("big", "small", "old", "new")
FUNCTION = [
    "the",
    "is",
    "and",
    "near",
    "what",
    "colour",
    "question",
    "answer",
    "makes",
    "word",
    "for",
    "in",
    "english",
    "zeta",
    "means",
    "then",
    "it",
    "very",
    "too",
    "not",
    "knows",
]
PUNCT = (".", "?", ":")
#: the math skill's operations: ``a op b`` is ``a + b + OPS.index(op)``. The four results of one
#: pair of operands are consecutive numbers, so nothing but the operation word says which one is
#: meant, and no shortcut (the biggest, an operand) picks it without computing the sum.
OPS = ("plus", "plusone", "plustwo", "plusthree")


def apply_op(op: str, a: int, b: int) -> int:
    """``a op b``: the sum plus the operation's offset (``plustwo``: ``a + b + 2``)."""
    try:
        return a + b + OPS.index(op)
    except ValueError:
        raise ValueError(f"unknown operation {op!r}") from None


SYLLABLES = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]


@dataclass(frozen=True)
class World:
    """Vocabulary, the English->Zeta dictionary and each noun's colour.

    The nouns are split four ways, disjoint: ``lang_train_nouns`` (the ``lang`` specialist is
    trained on their colour questions), ``lang_val_nouns`` (its stopping criterion),
    ``lang_fit_nouns`` (the ``zoo_lang_fit`` split a search may optimise on) and
    ``lang_test_nouns`` (the ``zoo_lang`` report split).
    """

    english: tuple[str, ...]
    zeta: dict[str, str]
    colour_of: dict[str, str]
    lang_train_nouns: tuple[str, ...]
    lang_val_nouns: tuple[str, ...]
    lang_fit_nouns: tuple[str, ...]
    lang_test_nouns: tuple[str, ...]
    nouns: tuple[str, ...] = field(default=NOUNS)

    def to_zeta(self, words: list[str]) -> list[str]:
        """Translate a list of English tokens (digits and punctuation stay)."""
        return [self.zeta.get(w, w) for w in words]

    def words(self) -> list[str]:
        """Every word token of both languages, in a fixed order (no digits, no punctuation)."""
        return list(self.english) + [self.zeta[w] for w in self.english]


def _invent(rng: random.Random, taken: set[str], count: int) -> list[str]:
    out: list[str] = []
    while len(out) < count:
        n = rng.choice((2, 2, 3))
        w = "".join(rng.choice(SYLLABLES) for _ in range(n))
        if w not in taken:
            taken.add(w)
            out.append(w)
    return out


@cache
def make_world(seed: int = 0) -> World:
    """The world for ``seed``: Zeta words, colours (balanced) and the noun splits."""
    rng = random.Random(seed)
    english = tuple(dict.fromkeys([*FUNCTION, *OPS, *COLOURS, *NAMES, *VERBS, *SIZES, *NOUNS]))
    zeta = dict(zip(english, _invent(rng, set(english), len(english)), strict=True))
    nouns = list(NOUNS)
    colours = [COLOURS[i % len(COLOURS)] for i in range(len(nouns))]
    rng.shuffle(colours)
    colour_of = dict(zip(nouns, colours, strict=True))
    order = nouns[:]
    rng.shuffle(order)
    cuts = (0, 56, 64, 96, len(order))  # train 56, val 8, fit 32, report 32
    train, val, fit, test = (tuple(sorted(order[a:b])) for a, b in itertools.pairwise(cuts))
    return World(
        english=english,
        zeta=zeta,
        colour_of=colour_of,
        lang_train_nouns=train,
        lang_val_nouns=val,
        lang_fit_nouns=fit,
        lang_test_nouns=test,
    )
