"""The zoo's tiny world: English words, the toy language Zeta, and the facts both describe.

Zeta is a word-for-word substitution of English: every English word has one invented Zeta word,
word order, punctuation and digits are shared. Every noun has one fixed colour; the stories of
the pre-training corpus mention it in both languages, and the ``lang`` skill is to answer a
question about it asked in Zeta.
"""

from __future__ import annotations

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
    "plus",
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

SYLLABLES = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]


@dataclass(frozen=True)
class World:
    """Vocabulary, the English->Zeta dictionary and each noun's colour.

    ``lang_train_nouns`` are the nouns whose colour questions the ``lang`` specialist is
    trained on; the held-out test asks only about ``lang_test_nouns``.
    """

    english: tuple[str, ...]
    zeta: dict[str, str]
    colour_of: dict[str, str]
    lang_train_nouns: tuple[str, ...]
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
    """The world for ``seed``: Zeta words, colours (balanced) and the lang train/test nouns."""
    rng = random.Random(seed)
    english = tuple(dict.fromkeys([*FUNCTION, *COLOURS, *NAMES, *VERBS, *SIZES, *NOUNS]))
    zeta = dict(zip(english, _invent(rng, set(english), len(english)), strict=True))
    nouns = list(NOUNS)
    colours = [COLOURS[i % len(COLOURS)] for i in range(len(nouns))]
    rng.shuffle(colours)
    colour_of = dict(zip(nouns, colours, strict=True))
    order = nouns[:]
    rng.shuffle(order)
    half = len(order) // 2
    return World(
        english=english,
        zeta=zeta,
        colour_of=colour_of,
        lang_train_nouns=tuple(sorted(order[:half])),
        lang_test_nouns=tuple(sorted(order[half:])),
    )
