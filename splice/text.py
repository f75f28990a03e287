"""Wording shared by every message and report: a count with its noun, and its article."""

from __future__ import annotations


def plural(count: int, noun: str, nouns: str | None = None) -> str:
    """``1 layer``, ``2 layers``: a count with its noun (``nouns``: an irregular plural)."""
    return f"{count} {noun}" if count == 1 else f"{count} {nouns or noun + 's'}"


def an(count: int) -> str:
    """The indefinite article of ``count`` as spoken: "an" for 8, 11, 18, 80-89, 800-899,
    11 000..., else "a" (``f"{an(n)} {n}-layer model"``)."""
    digits = str(abs(int(count)))
    eleven = len(digits) % 3 == 2 and digits[:2] in ("11", "18")
    return "an" if digits.startswith("8") or eleven else "a"
