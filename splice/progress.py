"""Progress bars for long work (tqdm on stderr), off when asked or when not useful."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")


def progress(items: Iterable[T], desc: str, *, enabled: bool = True, **kw: object) -> Iterator[T]:
    """Iterate ``items`` with a tqdm bar on stderr when ``enabled``."""
    if not enabled:
        yield from items
        return
    from tqdm import tqdm

    yield from tqdm(items, desc=desc, dynamic_ncols=True, leave=False, **kw)  # type: ignore[arg-type]
