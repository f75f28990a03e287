"""Layer maps: which source layer each output layer is, for every depth operation.

Pure functions on layer indices (no model is opened): a map is a list ``[s_0, s_1, ...]`` where
output layer ``j`` is a copy of source layer ``s_j``. Every bad index is a one-line
:class:`SpliceError` naming the option, so the library and the CLI refuse the same things.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from splice.errors import SpliceError


def _whole(value: object, option: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise SpliceError(f"{option}: {value!r} is not a whole number")
    return value


def solar(n: int, m: int) -> list[int]:
    """SOLAR depth up-scaling: two copies of the ``n`` layers, the first without its last ``m``
    layers, the second without its first ``m``: ``[0, n-m) + [m, n)`` (``1 <= m < n``)."""
    m = _whole(m, "--solar")
    if not 1 <= m < n:
        raise SpliceError(
            f"--solar {m}: M must be between 1 and {n - 1} (the model has {n} layers)"
        )
    return list(range(n - m)) + list(range(m, n))


def duplicate(n: int, start: int, stop: int, option: str = "--duplicate") -> list[int]:
    """Layers ``[start, stop)`` repeated in place: ``[0, stop) + [start, n)``."""
    start, stop = _whole(start, option), _whole(stop, option)
    if not 0 <= start < stop <= n:
        raise SpliceError(
            f"{option} {start}:{stop}: need 0 <= A < B <= {n} (the model has {n} layers, 0-{n - 1})"
        )
    return list(range(stop)) + list(range(start, n))


def expand_after(n: int, count: int) -> list[int]:
    """LLaMA-Pro: the source layers after which a new block goes, ``count`` of them spread
    evenly (after every ``n / count``-th layer; ``n = 32, count = 8``: after 3, 7, ..., 31)."""
    count = _whole(count, "--expand")
    if not 1 <= count <= n:
        raise SpliceError(
            f"--expand {count}: N must be between 1 and {n} (one new block per layer at most; "
            f"the model has {n} layers)"
        )
    return [(k + 1) * n // count - 1 for k in range(count)]


def expand(n: int, count: int) -> tuple[list[int], list[int]]:
    """``(layer map, output positions of the new blocks)`` for :func:`expand_after`."""
    after = set(expand_after(n, count))
    layers: list[int] = []
    new: list[int] = []
    for i in range(n):
        layers.append(i)
        if i in after:
            new.append(len(layers))
            layers.append(i)
    return layers, new


def parse_ranges(spec: str, n: int, option: str = "--layers") -> list[int]:
    """``"0:24,8:32"`` (half-open ranges) or single indices ``"0:4,2,3"`` -> a layer map."""
    out: list[int] = []
    parts = [p.strip() for p in str(spec).split(",")]
    if not any(parts):
        raise SpliceError(f"{option}: no layers given")
    for part in parts:
        if not part:
            raise SpliceError(f"{option} {spec}: an empty item between commas")
        try:
            if ":" in part:
                a_text, b_text = part.split(":", 1)
                a, b = int(a_text), int(b_text)
            else:
                a = int(part)
                b = a + 1
        except ValueError:
            raise SpliceError(
                f"{option} {spec}: {part!r} is not A:B (a half-open range) or a layer index"
            ) from None
        if not 0 <= a < b <= n:
            raise SpliceError(
                f"{option} {spec}: {part} is out of range (need 0 <= A < B <= {n}; the model "
                f"has {n} layers, 0-{n - 1})"
            )
        out += range(a, b)
    return out


def parse_range(spec: str, n: int, option: str = "--duplicate") -> tuple[int, int]:
    """``"A:B"`` -> ``(A, B)``, checked against ``n`` layers."""
    text = str(spec).strip()
    try:
        a_text, b_text = text.split(":")
        a, b = int(a_text), int(b_text)
    except ValueError:
        raise SpliceError(f"{option} {spec}: expected A:B, a half-open range of layers") from None
    duplicate(n, a, b, option)
    return a, b


def parse_indices(spec: str | Iterable[int], n: int, option: str = "--drop") -> list[int]:
    """``"3,4,7"`` (or a list) -> sorted distinct layer indices, each in ``[0, n)``."""
    if isinstance(spec, str):
        items = [p.strip() for p in spec.split(",")]
        try:
            values = [int(p) for p in items if p]
        except ValueError:
            raise SpliceError(f"{option} {spec}: not a comma-separated list of layers") from None
    else:
        values = [_whole(v, option) for v in spec]
    if not values:
        raise SpliceError(f"{option}: no layers given")
    bad = [v for v in values if not 0 <= v < n]
    if bad:
        raise SpliceError(
            f"{option}: layer {bad[0]} is out of range (the model has {n} layers, 0-{n - 1})"
        )
    dup = sorted({v for v in values if values.count(v) > 1})
    if dup:
        raise SpliceError(f"{option}: layer {dup[0]} is given twice")
    return sorted(values)


def without(n: int, drop: Sequence[int], option: str = "--drop") -> list[int]:
    """The map that removes the layers ``drop``; at least one layer must stay."""
    if len(set(drop)) >= n:
        raise SpliceError(
            f"{option}: removing {len(set(drop))} layers of a {n}-layer model leaves none "
            f"(remove at most {n - 1})"
        )
    gone = set(drop)
    return [i for i in range(n) if i not in gone]


def repeats(layers: Sequence[int]) -> list[int]:
    """Output positions whose source layer already appeared earlier: the added copies."""
    seen: set[int] = set()
    out = []
    for j, s in enumerate(layers):
        if s in seen:
            out.append(j)
        seen.add(s)
    return out


def format_ranges(layers: Iterable[int]) -> str:
    """``[0, 1, 2, 5, 6, 2]`` -> ``"0-2, 5-6, 2"`` (runs of consecutive layers, in order)."""
    runs: list[list[int]] = []
    for x in layers:
        if runs and x == runs[-1][1] + 1:
            runs[-1][1] = x
        else:
            runs.append([x, x])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs) or "(none)"
