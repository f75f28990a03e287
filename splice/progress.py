"""Progress of long work, by one rule: a tqdm bar on a terminal; anywhere else (a log file,
``nohup``, a pipe) plain lines with the count and the elapsed time, one every ``every_s``
seconds (:data:`EVERY_S`) and a last one when work that printed any ends, never a carriage
return: work shorter than that prints nothing, and work that fails prints no last line. Off
when the caller says so (``--no-progress``)."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any, TextIO, TypeVar

T = TypeVar("T")

#: seconds between two plain progress lines
EVERY_S = 30.0


def is_terminal(stream: Any) -> bool:
    """``stream`` is an interactive terminal (tqdm's bar redraws in place only there)."""
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


class Progress:
    """``total`` steps of ``desc`` (None: unknown) on ``stream`` (default: stderr), shown by the
    module's rule; ``update(n, status=...)`` after each step, ``close()`` at the end (or use it
    as a context manager). ``line(text)`` prints one line of the caller's own instead of the
    plain count (evolve's generation summaries), as a bar's description on a terminal."""

    def __init__(
        self,
        total: int | None,
        desc: str,
        *,
        unit: str = "it",
        initial: int = 0,
        stream: TextIO | None = None,
        enabled: bool = True,
        every_s: float | None = None,
    ) -> None:
        self.total, self.desc, self.unit = total, desc, unit
        self.done, self.enabled = initial, enabled
        self.every_s = EVERY_S if every_s is None else every_s
        self.printed = False
        self.stream = sys.stderr if stream is None else stream
        self.t0 = self.last = time.monotonic()
        self.bar: Any = None
        self.shown = initial
        if enabled and is_terminal(self.stream):
            from tqdm import tqdm

            self.bar = tqdm(
                total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True,
                leave=False, file=self.stream,
            )  # fmt: skip

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def _count(self) -> str:
        of = f"/{self.total}" if self.total is not None else ""
        pct = f" ({100 * self.done / self.total:.0f}%)" if self.total else ""
        return f"{self.desc}: {self.done}{of} {self.unit}{pct}, {self.elapsed:.0f} s"

    def _print(self, text: str) -> None:
        print(text, file=self.stream, flush=True)
        self.last, self.shown, self.printed = time.monotonic(), self.done, True

    def update(self, n: int = 1, *, status: str = "") -> None:
        """``n`` more steps done; ``status``: a short note (a loss, a best score)."""
        self.done += n
        if not self.enabled:
            return
        if self.bar is not None:
            if status:
                self.bar.set_postfix_str(status, refresh=False)
            self.bar.update(n)
        elif time.monotonic() - self.last >= self.every_s:
            self._print(self._count() + (f", {status}" if status else ""))

    def line(self, text: str) -> None:
        """One line of the caller's (plain mode), or the bar's status (a terminal)."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.set_postfix_str(text, refresh=True)
        else:
            self._print(text)

    def close(self, *, failed: bool = False) -> None:
        """End the display: a bar is cleared; plain lines end with a last count when any was
        printed (and the work did not fail)."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        elif self.enabled and self.printed and not failed and self.done != self.shown:
            self._print(self._count() + " done")

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, kind: object, *exc: object) -> None:
        self.close(failed=kind is not None)


def progress(
    items: Iterable[T],
    desc: str,
    *,
    enabled: bool = True,
    total: int | None = None,
    unit: str = "it",
    stream: TextIO | None = None,
    every_s: float | None = None,
) -> Iterator[T]:
    """Iterate ``items``, showing :class:`Progress` (``total``: default ``len(items)``)."""
    if not enabled:
        yield from items
        return
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    with Progress(total, desc, unit=unit, stream=stream, every_s=every_s) as p:
        for item in items:
            yield item
            p.update()
