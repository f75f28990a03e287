"""CPU threads for small tensors: torch's default threads make tiny-matrix work slower.

:func:`threads_for` runs a block on one thread when the tensors it works on are small
(:data:`SMALL_NUMEL`) and on torch's setting otherwise. The analysis metrics and the calibration
pass of the surgery verbs (:mod:`splice.layer_metrics`) use it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

#: tensors with fewer elements than this are measured on one CPU thread: torch's default
#: threads make their small eigensolvers and dot products slower, not faster (on a loaded
#: 2-core machine a 192x96 matrix's default metrics take 10 ms on 2 threads, 1.2 ms on one;
#: benchmarks/analyze_threads.py measures it per size)
SMALL_NUMEL = 1 << 20


@contextlib.contextmanager
def threads_for(numel: int, threads: int | None = None) -> Iterator[None]:
    """Run the block on ``threads`` CPU threads, or (None) on one thread for a tensor of fewer
    than :data:`SMALL_NUMEL` elements and torch's current setting otherwise; restored after."""
    import torch

    old = torch.get_num_threads()
    want = threads if threads is not None else (1 if numel < SMALL_NUMEL else old)
    if want == old:
        yield
        return
    torch.set_num_threads(want)
    try:
        yield
    finally:
        torch.set_num_threads(old)
