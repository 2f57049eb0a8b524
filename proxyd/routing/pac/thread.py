"""The PAC worker: one long-lived OS thread that owns every QuickJS context.

A QuickJS runtime must be used (and freed) on a single OS thread, and evaluating JavaScript must
never block the trio loop. ``trio.to_thread.run_sync`` satisfies the second rule but not the first
(trio's thread cache may pick any idle thread, even with a ``CapacityLimiter(1)``), so proxyd runs
its own thread: ``JsThread`` starts one daemon thread that takes jobs from a ``queue.SimpleQueue``
and runs them in order.

``await js_thread.run(fn)`` queues ``fn`` and sleeps on a ``trio.Event``; the worker runs ``fn``,
captures its outcome (value or exception, ``outcome.capture``) and hands it back with
``TrioToken.run_sync_soon(event.set)``, the thread-safe way into a trio loop. No trio thread is
parked while JavaScript runs. If the waiting task is cancelled, the job still runs to completion
(bounded by the engine's time limit) and its result is dropped; jobs never overlap, so the engine
needs no lock. ``close()`` queues a stop marker behind any pending job (the owner queues the
engine's disposal first, so contexts are freed on this thread); ``run`` after ``close`` raises
``JsThreadClosed`` instead of waiting forever.

The thread is created with an 8 MiB stack, explicitly (what glibc gives by default, and far more
than QuickJS's own 1 MiB JS stack limit), so a deep recursion ends in a JS ``RangeError`` rather
than a crash on platforms with small default thread stacks (musl: 128 KiB).
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Callable
from typing import TypeVar

import outcome
import trio

T = TypeVar("T")
_STACK_SIZE = 8 << 20

_Job = tuple[Callable[[], object], Callable[[outcome.Outcome[object]], None]]


class JsThreadClosed(RuntimeError):
    """The worker thread was stopped; no more jobs are accepted."""


class JsThread:
    def __init__(self, name: str = "proxyd-pac") -> None:
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._closed = False
        previous = threading.stack_size()
        try:
            threading.stack_size(_STACK_SIZE)
            self._thread = threading.Thread(target=self._work, name=name, daemon=True)
            self._thread.start()
        finally:
            threading.stack_size(previous)

    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            fn, deliver = job
            deliver(outcome.capture(fn))

    async def run(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on the worker thread and return (or raise) what it did."""
        if self._closed:
            raise JsThreadClosed("the PAC worker thread is stopped")
        token = trio.lowlevel.current_trio_token()
        done = trio.Event()
        box: list[outcome.Outcome[object]] = []

        def deliver(result: outcome.Outcome[object]) -> None:  # runs on the worker thread
            box.append(result)
            # If the trio run that asked is gone, nobody is waiting: drop the result.
            with contextlib.suppress(trio.RunFinishedError):
                token.run_sync_soon(done.set)

        self._jobs.put((fn, deliver))
        await done.wait()
        return box[0].unwrap()  # type: ignore[return-value]  # fn returned a T

    def submit_nowait(self, fn: Callable[[], object]) -> None:
        """Queue ``fn`` without waiting for it (errors are dropped); used for cleanup."""
        if not self._closed:
            self._jobs.put((fn, lambda _result: None))

    def close(self) -> None:
        """Stop after the queued jobs; idempotent, never blocks."""
        if not self._closed:
            self._closed = True
            self._jobs.put(None)

    @property
    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def join(self, timeout: float | None = None) -> None:
        """Wait for the thread to end (blocking: for tests and shutdown paths off the loop)."""
        self._thread.join(timeout)
