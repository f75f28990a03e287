"""Overlap reading, computing and writing: a thread pool bounded by bytes in flight.

Reading (``preadv``), casting and arithmetic in torch, and writing (``pwrite``) all release the
GIL, so a few threads each doing read -> compute -> write on its own tensor keep the disk and
the cores busy at once. ``budget`` caps the bytes held by tasks in flight, so memory stays flat
whatever the model's size (one task larger than the budget still runs, alone).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")


def bounded_map(
    fn: Callable[[T], R],
    items: Iterable[T],
    *,
    cost: Callable[[T], int],
    workers: int = 2,
    budget: int = 512 * 2**20,
) -> Iterator[tuple[T, R]]:
    """Run ``fn`` over ``items`` on ``workers`` threads; yield ``(item, result)`` as they finish.

    A task is started only while the summed ``cost`` of running tasks stays within ``budget``
    (or nothing else runs). The first exception cancels what has not started and is re-raised.
    """
    if workers <= 1:
        for item in items:
            yield item, fn(item)
        return
    lock = threading.Lock()
    in_flight: dict[Future[R], tuple[T, int]] = {}
    used = 0
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="splice") as pool:
        try:
            for item in items:
                c = cost(item)
                while in_flight and (used + c > budget or len(in_flight) >= workers):
                    done, _ = wait(in_flight, return_when=FIRST_COMPLETED)
                    for fut in done:
                        finished, fc = in_flight.pop(fut)
                        with lock:
                            used -= fc
                        yield finished, fut.result()
                with lock:
                    used += c
                in_flight[pool.submit(fn, item)] = (item, c)
            while in_flight:
                done, _ = wait(in_flight, return_when=FIRST_COMPLETED)
                for fut in done:
                    finished, _c = in_flight.pop(fut)
                    yield finished, fut.result()
        except BaseException:
            for fut in in_flight:
                fut.cancel()
            raise
