"""Where candidates are scored: in this process (default), in ``N`` worker processes on one
machine (``--workers N``) or in ``N`` Ray actors (``--ray auto|ADDRESS``), each worker with its
own resident model, sources and loaded tasks.

A generation's candidates are handed out in order and their records come back in order, and
every candidate's merge and score depend on its genes alone (each merge overwrites the whole
module; DARE/DELLA masks are seeded per tensor), so the same seed gives the same run on any
number of workers. With ``device: cuda`` worker ``i`` runs on ``cuda:i`` (modulo the devices
present); a worker runs torch on one thread on the CPU.
"""

from __future__ import annotations

import multiprocessing
import signal
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from splice.evolve.config import EvolveConfig
    from splice.evolve.search import Candidates


class InProcess:
    """Candidates scored one after the other on the resident model of this process."""

    def __init__(self, candidates: Candidates) -> None:
        self.candidates = candidates

    def map(
        self, xs: Sequence[np.ndarray], context: dict[str, Any] | None = None
    ) -> list[dict[str, Any]]:
        return [self.candidates.evaluate(np.asarray(x), context) for x in xs]

    def close(self) -> None:
        pass


def worker_devices(device: str, n: int) -> list[str]:
    """One device per worker: ``cuda`` spreads them over the GPUs, anything else is shared."""
    if device != "cuda":
        return [device] * n
    import torch

    count = max(1, torch.cuda.device_count())
    return [f"cuda:{i % count}" for i in range(n)]


class Workers:
    """``n`` spawned processes, each with a resident model (see the module docstring)."""

    def __init__(self, config: EvolveConfig, n: int) -> None:
        from concurrent.futures import ProcessPoolExecutor

        ctx = multiprocessing.get_context("spawn")
        slots = ctx.Queue()
        for dev in worker_devices(config.device, n):
            slots.put(dev)
        self.pool = ProcessPoolExecutor(
            max_workers=n,
            mp_context=ctx,
            initializer=_init,
            initargs=(config.model_dump(mode="json"), slots),
        )

    def map(
        self, xs: Sequence[np.ndarray], context: dict[str, Any] | None = None
    ) -> list[dict[str, Any]]:
        futures = [self.pool.submit(_evaluate, [float(v) for v in x], context) for x in xs]
        return [f.result() for f in futures]

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


_WORKER: Any = None


def _init(config: dict[str, Any], slots: Any) -> None:
    """In a worker: this worker's device, then sources, module and tasks, once."""
    import os
    import threading

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and SIGTERM
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    from splice.evolve.config import EvolveConfig
    from splice.evolve.search import Candidates, open_scorer, prepare

    device = slots.get()
    cfg = EvolveConfig.model_validate({**config, "device": device})
    if device == "cpu":
        import torch

        torch.set_num_threads(1)
    genome, sources, options = prepare(cfg)
    global _WORKER
    _WORKER = Candidates(cfg, genome, sources, open_scorer(cfg), options)


def _evaluate(x: list[float], context: dict[str, Any] | None = None) -> dict[str, Any]:
    return _WORKER.evaluate(np.asarray(x), context)


class RayActors:
    """``n`` Ray actors, each with a resident model (``--ray auto|ADDRESS``; the ``ray`` extra).

    Joins the Ray instance this process already started (``ray.init(...)``), else connects to
    ``address`` (``auto``: the running cluster). An actor asks Ray for one GPU when the config's
    device is a CUDA device, else one CPU. Candidates are handed out in order and come back in
    order (``ActorPool.map``), so the run is the in-process run.
    """

    def __init__(self, config: EvolveConfig, n: int, address: str = "auto") -> None:
        try:
            import ray
            from ray.util import ActorPool
        except ImportError:
            from splice.errors import SpliceError

            raise SpliceError("--ray needs Ray: pip install 'splice[ray]'") from None
        if not ray.is_initialized():
            check_ray_address(address, reach=True)
            try:
                ray.init(address=address, log_to_driver=False)
            except (ConnectionError, RuntimeError, ValueError, TimeoutError) as e:
                from splice.errors import SpliceError, first_line

                raise SpliceError(
                    f"--ray {address}: cannot join the cluster ({first_line(e)})"
                ) from None
        gpu = config.device.startswith("cuda")
        device = "cuda" if gpu else config.device
        actor = ray.remote(num_cpus=1, num_gpus=1 if gpu else 0)(_RayWorker)
        data = config.model_dump(mode="json")
        self.actors = [actor.remote(data, device) for _ in range(n)]
        self.pool = ActorPool(self.actors)
        self._ray = ray

    def map(
        self, xs: Sequence[np.ndarray], context: dict[str, Any] | None = None
    ) -> list[dict[str, Any]]:
        genes = [[float(v) for v in x] for x in xs]
        return list(self.pool.map(lambda a, x: a.evaluate.remote(x, context), genes))

    def close(self) -> None:
        for a in self.actors:
            self._ray.kill(a)


#: seconds to wait for a Ray head's port to answer before giving up
RAY_CONNECT_TIMEOUT = 10.0


def check_ray_address(address: str, *, reach: bool = False) -> None:
    """``address`` is ``auto``, ``local`` or ``[ray://]HOST:PORT``; with ``reach``, a
    ``HOST:PORT`` must accept a TCP connection within :data:`RAY_CONNECT_TIMEOUT` seconds (Ray
    itself retries an unreachable head for minutes). ``SpliceError``, one line."""
    import socket

    from splice.errors import SpliceError

    if address in ("auto", "local"):
        return
    where = address.removeprefix("ray://")
    host, sep, port = where.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise SpliceError(f"--ray {address}: give auto, local or HOST:PORT (ray://HOST:PORT)")
    if not reach:
        return
    try:
        with socket.create_connection((host, int(port)), timeout=RAY_CONNECT_TIMEOUT):
            pass
    except OSError as e:
        why = "timed out" if isinstance(e, TimeoutError) else (e.strerror or type(e).__name__)
        raise SpliceError(
            f"--ray {address}: cannot reach the Ray head ({why} after at most "
            f"{RAY_CONNECT_TIMEOUT:g} s); is the cluster running and the address right?"
        ) from None


class _RayWorker:
    """A Ray actor: a worker's sources, module and tasks, built once (see :func:`_init`)."""

    def __init__(self, config: dict[str, Any], device: str) -> None:
        import queue

        slots: queue.Queue[str] = queue.Queue()
        slots.put(device)
        _init(config, slots)

    def evaluate(self, x: list[float], context: dict[str, Any] | None = None) -> dict[str, Any]:
        return _evaluate(x, context)
