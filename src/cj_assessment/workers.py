"""workers: where the computations of large assessments run, off the event loop.

Scoring 2,000 essays takes seconds of numpy and LAPACK calls, many of which keep the
interpreter lock. On a thread of the service's own process that starved the event loop: with
the scoring on a worker thread, a 10 ms ticker on the loop ran 85 times in 3.9 s instead of
390, so every other assessment's transactions, the relay and the probes crawled for the
whole close. In a child process the same scoring took as long and the loop ran 378 times.

The process comes from the `forkserver` context, so it inherits no threads, sockets or open
transactions of the service. `serve` starts it with the service (`warm_up`), because starting
it and loading numpy, scipy and the core in it took 3.3 s on a loaded machine, which the first
large assessment after every start paid before its first request went out. It is started again
when it dies: a computation whose process died raises `TransientError`, and the record that
needed it is retried."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import select
import threading
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import TypeVar

import numpy as np
import structlog

from cj_assessment.errors import TransientError

log = structlog.get_logger(__name__)

_Result = TypeVar("_Result")


class WorkerThread:
    """Runs callables on a thread of this process: for tests, whose stand-ins for the core's
    functions need not be picklable. The interpreter lock stays shared with the loop."""

    async def run(self, compute: Callable[[], _Result]) -> _Result:
        return await asyncio.to_thread(compute)

    def close(self) -> None:
        pass


def _exit_with(service: int) -> None:
    """Initializer of the worker process: exit once the service process is gone. Killed
    (SIGKILL, out of memory), the service cannot stop its child, and the pool's queues would
    keep the child waiting for ever, and the forkserver with it (75 + 14 MB per kill)."""

    def watch() -> None:
        try:
            handle = os.pidfd_open(service)
        except ProcessLookupError:
            os._exit(1)
        except (AttributeError, OSError):  # no pidfd (not Linux): look once a second
            while True:
                time.sleep(1.0)
                try:
                    os.kill(service, 0)
                except ProcessLookupError:
                    os._exit(1)
        select.select([handle], [], [])
        os._exit(1)

    threading.Thread(target=watch, name="service-watch", daemon=True).start()


def _loaded() -> int:
    """What the child's first computation would otherwise load on demand: the core's modules,
    and LAPACK's code paths through a small scoring. Returns the child's process id."""
    from cj_assessment.pair_generation import PairingHistory, generate_pairs
    from cj_assessment.scoring_ranking import score_judgements

    essays = ["a", "b", "c"]
    score_judgements(essays, [("a", "b", True), ("b", "c", True), ("c", "a", False)])
    generate_pairs(
        essays, PairingHistory.empty(), np.random.default_rng(0), matchings=1, max_pairs=1
    )
    return os.getpid()


class WorkerProcess:
    """Runs picklable callables in one child process, one at a time (what `serve` uses)."""

    def __init__(self, start_method: str = "forkserver") -> None:
        self._start_method = start_method
        self._pool: ProcessPoolExecutor | None = None

    async def run(self, compute: Callable[[], _Result]) -> _Result:
        if self._pool is None:
            self._pool = ProcessPoolExecutor(
                max_workers=1,
                mp_context=multiprocessing.get_context(self._start_method),
                initializer=_exit_with,
                initargs=(os.getpid(),),
            )
        pool = self._pool
        try:
            return await asyncio.get_running_loop().run_in_executor(pool, compute)
        except BrokenProcessPool as exc:
            # Killed (out of memory, a signal): the next computation starts a fresh one.
            if self._pool is pool:
                self._pool = None
            pool.shutdown(wait=False, cancel_futures=True)
            log.warning("worker_process_died")
            raise TransientError("the worker process for large computations died") from exc

    async def warm_up(self) -> int:
        """Start the child and load what the computations need, ahead of the first one;
        returns the child's process id."""
        return await self.run(_loaded)

    def close(self) -> None:
        """Stop the child at once. Whatever it still computes belongs to a transaction being
        abandoned (its record is redelivered), and the interpreter would wait for it at exit:
        a large close takes seconds, beyond the shutdown's deadline on a slow machine."""
        if self._pool is None:
            return
        pool, self._pool = self._pool, None
        # No public way to stop a pool's processes before Python 3.14 (terminate_workers).
        processes = list((getattr(pool, "_processes", None) or {}).values())
        pool.shutdown(wait=False, cancel_futures=True)
        for process in processes:
            process.terminate()
