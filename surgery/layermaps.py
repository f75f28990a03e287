"""Layer maps: which source layer each output layer is, for every depth operation.

Pure functions on layer indices (no model is opened): a map is a list ``[s_0, s_1, ...]`` where
output layer ``j`` is a copy of source layer ``s_j``. Every bad index is a one-line
:class:`SpliceError` naming the option, so the library and the CLI refuse the same things.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from splice.errors import SpliceError
from splice.text import an, plural


def _whole(value: object, option: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise SpliceError(f"{option}: {value!r} is not a whole number")
    return value


def _layer_span(n: int) -> str:
    """``"the model has 8 layers, 0-7"`` (one layer: ``"the model has 1 layer, 0"``)."""
    return f"the model has {plural(n, 'layer')}, " + ("0" if n == 1 else f"0-{n - 1}")


def solar(n: int, m: int) -> list[int]:
    """SOLAR depth up-scaling: two copies of the ``n`` layers, the first without its last ``m``
    layers, the second without its first ``m``: ``[0, n-m) + [m, n)`` (``1 <= m < n``)."""
    m = _whole(m, "--solar")
    if not 1 <= m < n:
        raise SpliceError(
            f"--solar {m}: M must be between 1 and {n - 1} (the model has {plural(n, 'layer')})"
        )
    return list(range(n - m)) + list(range(m, n))


def duplicate(n: int, start: int, stop: int, option: str = "--duplicate") -> list[int]:
    """Layers ``[start, stop)`` repeated in place: ``[0, stop) + [start, n)``."""
    start, stop = _whole(start, option), _whole(stop, option)
    if not 0 <= start < stop <= n:
        raise SpliceError(f"{option} {start}:{stop}: need 0 <= A < B <= {n} ({_layer_span(n)})")
    return list(range(stop)) + list(range(start, n))


def expand_after(n: int, count: int) -> list[int]:
    """LLaMA-Pro: the source layers after which a new block goes, ``count`` of them spread
    evenly (after every ``n / count``-th layer; ``n = 32, count = 8``: after 3, 7, ..., 31)."""
    count = _whole(count, "--expand")
    if not 1 <= count <= n:
        raise SpliceError(
            f"--expand {count}: N must be between 1 and {n} (one new block per layer at most; "
            f"the model has {plural(n, 'layer')})"
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


#: what a layer list is, for help texts: the syntax :func:`parse_ranges` reads
LAYER_LIST_HELP = "comma-separated layers and half-open ranges A:B (B not included: 3:5 is 3,4)"


def parse_ranges(spec: str, n: int, option: str = "--layers") -> list[int]:
    """``"0:24,8:32"`` (half-open ranges) or single indices ``"0:4,2,3"`` -> a layer map, in
    the order given (repeats kept). The one parser of a layer list: ``upscale --layers``,
    ``prune --drop`` and ``heal --train-layers`` (the last two through
    :func:`parse_indices`)."""
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
                f"{option} {spec}: not a comma-separated list of layers: {part!r} is not A:B "
                "(a half-open range) or a layer index"
            ) from None
        if ":" not in part and not 0 <= a < n:
            raise SpliceError(f"{option}: layer {a} is out of range ({_layer_span(n)})")
        if not 0 <= a < b <= n:
            raise SpliceError(
                f"{option} {spec}: {part} is out of range (need 0 <= A < B <= {n}; "
                f"{_layer_span(n)})"
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
    """``"3,4,7"``, ``"3:5,7"`` (the :func:`parse_ranges` syntax) or a list -> sorted distinct
    layer indices, each in ``[0, n)``."""
    if isinstance(spec, str):
        values = parse_ranges(spec, n, option)
    else:
        values = [_whole(v, option) for v in spec]
    if not values:
        raise SpliceError(f"{option}: no layers given")
    bad = [v for v in values if not 0 <= v < n]
    if bad:
        raise SpliceError(f"{option}: layer {bad[0]} is out of range ({_layer_span(n)})")
    dup = sorted({v for v in values if values.count(v) > 1})
    if dup:
        raise SpliceError(f"{option}: layer {dup[0]} is given twice")
    return sorted(values)


def without(n: int, drop: Sequence[int], option: str = "--drop") -> list[int]:
    """The map that removes the layers ``drop``; at least one layer must stay."""
    if len(set(drop)) >= n:
        raise SpliceError(
            f"{option}: removing {plural(len(set(drop)), 'layer')} of {an(n)} {n}-layer model "
            f"leaves none (remove at most {n - 1})"
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


def format_map(layers: Sequence[int]) -> str:
    """``[0, 1, 2, 1, 2, 3]`` -> ``"out 0-2 <- 0-2; out 3-5 <- 1-3"``: runs of output positions
    that copy consecutive source layers, each with the source layers it copies."""
    runs: list[list[int]] = []  # [first output, last output, first source]
    for j, s in enumerate(layers):
        if runs and s == runs[-1][2] + j - runs[-1][0]:
            runs[-1][1] = j
        else:
            runs.append([j, j, s])

    def span(a: int, b: int) -> str:
        return str(a) if a == b else f"{a}-{b}"

    return "; ".join(f"out {span(a, b)} <- {span(s, s + b - a)}" for a, b, s in runs) or "(none)"


def format_spec(layers: Iterable[int]) -> str:
    """``[0, 1, 2, 5, 2]`` -> ``"0:3,5,2"``: a layer list in the syntax :func:`parse_ranges`
    reads back (runs of consecutive layers as half-open ranges, in order)."""
    runs: list[list[int]] = []
    for x in layers:
        if runs and x == runs[-1][1]:
            runs[-1][1] = x + 1
        else:
            runs.append([x, x + 1])
    return ",".join(str(a) if b == a + 1 else f"{a}:{b}" for a, b in runs)
