"""Socket reads and writes for the per-request path, without trio's per-call overhead.

Theory of operation. ``trio.SocketStream.send_all`` and ``receive_some`` are general: each call
enters a conflict detector and an error-translating context manager, tries the system call inside
an async context manager, and on success still yields to the scheduler (every trio I/O call is a
checkpoint). On this machine that is ~15 µs per call against ~1 µs for the system call itself,
and a proxied request makes four of them. The functions here keep trio's semantics that matter
(the same exceptions, cancellation through the caller's cancel scope, waiting through trio's
epoll) and drop the rest:

- **Writes go out at once.** ``send_all`` writes on the non-blocking socket directly; when the
  kernel takes everything (the common case: a response head and a small body fit in the socket
  buffer) it returns without yielding. Only a write the kernel cannot take whole waits
  (``wait_writable``), under a cancel scope with the caller's deadline.
- **Reads wait first when the bytes cannot be there yet.** Right after a request went upstream
  the answer has not arrived, and right after a response went to a client its next request has
  not either: ``receive_some(..., wait_first=True)`` waits for readability and then reads,
  instead of a read that fails with EAGAIN and then the same wait. Reads that usually find bytes
  (the rest of a body) read first. On the fast path (``receive_after_others``, and the client's
  keep-alive wait in client.py) a task first lets every other ready task run, then reads: under
  load the answer has come meanwhile, and a read that finds it costs no epoll registration
  (trio re-arms its one-shot registration with an ``epoll_ctl`` on every wait), no timer and no
  wake-up; measured, about 6 % less CPU per proxied 1 KiB request and a lower one-connection
  latency. Only when nothing came does it wait, one failed read later.
- **Every request still yields.** A proxied request always waits at least once (for the
  origin's answer), so skipping the checkpoint of a write that completed at once cannot starve
  other connections; ``client.py`` adds an explicit checkpoint when a pipelined request is
  already buffered (no wait at all on that request's client side).
- **Reads go through one scratch buffer** (``read_now``) and are copied out at their size. A
  plain ``os.read(fd, 65536)`` takes 64 KiB from malloc for each read of a few hundred bytes and
  shrinks it in place: steady churn of 64 KiB blocks whose freed tails long-lived objects then
  split up. It is one of the three changes that keep the heap the size of what is in it under
  steady load (with ``proxyd.allocator``'s arena and thresholds; measured together there). The
  copy costs about what the shrink did (within 0.3 µs per read).
- **Errors are trio's.** A closed socket (``fileno() == -1``, or closed while waiting) raises
  ``trio.ClosedResourceError``; any other OSError (reset, broken pipe) raises
  ``trio.BrokenResourceError``, as ``SocketStream`` does.
- **Timeouts without a cancel scope per wait** (``receive_within``). A ``trio.CancelScope`` with
  a deadline costs ~6 µs to enter and leave (two generator context managers, a CancelStatus, the
  run's deadline heap) -- as much as the wait itself. Waits that share one timeout value start in
  time order, so their deadlines are in that order too: ``_Timers`` keeps them in one dict per
  timeout (insertion ordered, oldest first), and a single sweeper (a trio system task, one per
  run) sleeps until the oldest deadline. A wait past its deadline is woken the way trio wakes a
  wait on a socket another task closes, ``trio.lowlevel.notify_closing``: ``wait_readable``
  raises ``ClosedResourceError`` and the wait, seeing it was timed out, returns None. (That also
  drops the socket's epoll registration, which the next wait on it, if any, makes again; a
  timed-out socket is closed anyway.) A wait costs a dict insert and delete. The sweeper wakes
  about once per timeout period while waits come and go, and only then looks at the oldest.
  Rare waits with an absolute deadline over several reads (the rest of a request head) keep a
  cancel scope (``receive_some``).

Anything that is not a plain ``trio.SocketStream`` (TLS to an https origin, test doubles) takes
trio's own stream methods under the same deadline rules. One writer and one reader per stream
at a time, as everywhere in proxyd: a direct write cannot be detected as concurrent with another
task's ``send_all`` the way trio's conflict detector would.
"""

from __future__ import annotations

import errno
import math
import os
from collections.abc import Sequence
from typing import Final, cast

import trio
from trio.lowlevel import wait_readable, wait_writable

RECEIVE_SIZE: Final = 65536

_SocketStream = trio.SocketStream

# Every read lands here and leaves as a bytes object of its own length (``read_now``).
_scratch = bytearray(RECEIVE_SIZE)
_scratch_view = memoryview(_scratch)
_scratch_buffers = [_scratch]
_readv = os.readv


def read_now(fd: int) -> bytes:
    """One read of up to ``RECEIVE_SIZE`` bytes from ``fd`` (``b""`` at EOF), raising what
    ``os.read`` raises. The bytes come through one scratch buffer of the event loop's thread and
    are copied out at their size: ``os.read(fd, 65536)`` allocates 64 KiB from malloc for every
    read and shrinks it in place, and under steady load those short-lived 64 KiB blocks, their
    freed tails and the long-lived objects that land in them fragment malloc's heap (see the
    module docstring). Only the loop's thread calls it, and nothing awaits between the read
    and the copy."""
    return _scratch_view[: _readv(fd, _scratch_buffers)].tobytes()


class _Wait:
    """One socket wait under a timeout (``_Timers``)."""

    __slots__ = ("socket", "timed_out")

    def __init__(self, socket: trio.socket.SocketType) -> None:
        self.socket = socket
        self.timed_out = False

    def expire(self) -> None:
        self.timed_out = True
        # A socket closed meanwhile (fileno -1) has no waiter left, and its number may already
        # belong to another socket: never notify by number.
        if self.socket.fileno() >= 0:
            trio.lowlevel.notify_closing(self.socket)


class _Timers:
    """Deadlines of socket waits, one insertion-ordered dict per timeout value; see the module
    docstring. ``run`` is the sweeper (a system task of the trio run, started on first use)."""

    __slots__ = ("_lot", "_now", "_sleep_until", "_waits")

    def __init__(self) -> None:
        self._now = trio.lowlevel.current_clock().current_time  # trio.current_time, one call
        self._waits: dict[float, dict[_Wait, float]] = {}
        self._lot = trio.lowlevel.ParkingLot()
        self._sleep_until = math.inf

    def add(self, socket: trio.socket.SocketType, timeout: float) -> _Wait:
        now = self._now()
        waits = self._waits.get(timeout)
        if waits is None:
            waits = self._waits[timeout] = {}
        wait = _Wait(socket)
        waits[wait] = now
        if now + timeout < self._sleep_until:
            self._lot.unpark_all()  # a new, shorter timeout: the sweeper sleeps too long
        return wait

    def discard(self, wait: _Wait, timeout: float) -> None:
        waits = self._waits.get(timeout)
        if waits is not None:
            waits.pop(wait, None)

    def expire(self, now: float) -> float:
        """Wake every wait past its deadline; the next deadline to sleep until."""
        until = math.inf
        for timeout, waits in list(self._waits.items()):
            while waits:
                wait = next(iter(waits))
                deadline = waits[wait] + timeout
                if deadline > now:
                    until = min(until, deadline)
                    break
                del waits[wait]
                wait.expire()
            else:
                # Idle now: wake again one timeout from now anyway, so that the next waits
                # (deadlines later than that) do not have to wake the sweeper to be seen.
                until = min(until, now + timeout)
                if len(self._waits) > 8:
                    del self._waits[timeout]  # old timeouts of reloads: keep the dict small
        return until

    async def run(self) -> None:
        while True:
            until = self._sleep_until = self.expire(trio.current_time())
            with trio.move_on_at(until):
                await self._lot.park()


_timers_var: trio.lowlevel.RunVar[_Timers] = trio.lowlevel.RunVar("proxyd_sockio_timers")


def _timers() -> _Timers:
    try:
        return _timers_var.get()
    except LookupError:
        timers = _Timers()
        _timers_var.set(timers)
        trio.lowlevel.spawn_system_task(timers.run, name="proxyd socket timeouts")
        return timers


def _stream_error(exc: OSError) -> trio.BrokenResourceError | trio.ClosedResourceError:
    if exc.errno == errno.EBADF:
        return trio.ClosedResourceError("the socket was closed")
    return trio.BrokenResourceError(f"socket connection broken: {exc}")


def _fd(stream: trio.SocketStream) -> int:
    fd = stream.socket.fileno()
    if fd < 0:
        raise trio.ClosedResourceError("the socket was closed")
    return fd


async def send_all(stream: trio.abc.Stream, data: bytes | list[bytes], timeout: float) -> bool:
    """Write all of ``data``; False when ``timeout`` (seconds from now) passed first (the stream
    is then in an unknown state: close it). Yields only when the kernel cannot take it all at
    once; only then is the clock read and a cancel scope entered. A list is written in order
    with ``writev`` (a response head and a large body piece, without joining them in memory).
    Raises ``trio.BrokenResourceError`` / ``trio.ClosedResourceError`` as trio does."""
    if isinstance(data, list):
        if type(stream) is _SocketStream:
            return await _send_parts(_fd(stream), data, timeout)
        data = b"".join(data)
    if type(stream) is not _SocketStream:
        with trio.CancelScope(deadline=trio.current_time() + timeout) as scope:
            await stream.send_all(data)
        return not scope.cancelled_caught
    fd = _fd(stream)
    try:
        sent = os.write(fd, data)
    except BlockingIOError:
        sent = 0
    except OSError as exc:
        raise _stream_error(exc) from None
    if sent == len(data):
        return True
    return await _write_rest(fd, [memoryview(data)[sent:]], timeout)


async def _send_parts(fd: int, parts: list[bytes], timeout: float) -> bool:
    total = sum(map(len, parts))
    try:
        sent = os.writev(fd, parts)
    except BlockingIOError:
        sent = 0
    except OSError as exc:
        raise _stream_error(exc) from None
    if sent == total:
        return True
    return await _write_rest(fd, _after(parts, sent), timeout)


async def _write_rest(fd: int, rest: list[bytes | memoryview], timeout: float) -> bool:
    """What the kernel did not take at once, written as it makes room, within ``timeout``."""
    with trio.CancelScope(deadline=trio.current_time() + timeout) as scope:
        while rest:
            await wait_writable(fd)
            try:
                sent = os.writev(fd, rest)
            except BlockingIOError:
                continue
            except OSError as exc:
                raise _stream_error(exc) from None
            rest = _after(rest, sent)
    return not scope.cancelled_caught


def _after(parts: Sequence[bytes | memoryview], sent: int) -> list[bytes | memoryview]:
    """What is left of ``parts`` once ``sent`` bytes went out."""
    for index, part in enumerate(parts):
        if sent < len(part):
            return [memoryview(part)[sent:], *parts[index + 1 :]]
        sent -= len(part)
    return []


async def receive_some(
    stream: trio.abc.Stream, deadline: float, *, wait_first: bool
) -> bytes | None:
    """Up to ``RECEIVE_SIZE`` bytes (``b""`` at EOF), or None when ``deadline`` passed first.
    ``wait_first``: the bytes are probably not there yet (see the module docstring)."""
    if type(stream) is not _SocketStream:
        with trio.CancelScope(deadline=deadline):
            return cast(bytes, await stream.receive_some(RECEIVE_SIZE))
        return None
    fd = _fd(stream)
    if not wait_first:
        try:
            return read_now(fd)
        except BlockingIOError:
            pass
        except OSError as exc:
            raise _stream_error(exc) from None
    while True:
        with trio.CancelScope(deadline=deadline):
            await wait_readable(fd)
            try:
                return read_now(fd)
            except BlockingIOError:
                continue  # woken without bytes (rare): wait again
            except OSError as exc:
                raise _stream_error(exc) from None
        return None


async def receive_within(
    stream: trio.abc.Stream, timeout: float, *, wait_first: bool
) -> bytes | None:
    """``receive_some`` with a timeout from now, without a cancel scope (see the module
    docstring): the per-request reads (a response head, body pieces both ways)."""
    if type(stream) is not _SocketStream:
        return await receive_some(stream, trio.current_time() + timeout, wait_first=wait_first)
    fd = _fd(stream)
    if not wait_first:
        try:
            return read_now(fd)
        except BlockingIOError:
            pass
        except OSError as exc:
            raise _stream_error(exc) from None
    timers = _timers()
    wait = timers.add(stream.socket, timeout)
    try:
        while True:
            try:
                await wait_readable(fd)
            except trio.ClosedResourceError:
                if wait.timed_out:
                    return None
                raise
            try:
                return read_now(fd)
            except BlockingIOError:
                continue  # woken without bytes (rare): wait again
            except OSError as exc:
                raise _stream_error(exc) from None
    finally:
        timers.discard(wait, timeout)


async def receive_after_others(stream: trio.abc.Stream, timeout: float) -> bytes | None:
    """``receive_within`` for the answer to what was just sent: first let every other ready task
    run (one scheduler pass, shielded from cancellation), then read. Under load the peer has
    answered by then, and the read needs no epoll registration and no timer; otherwise it waits
    as ``receive_within`` does (one failed read more: the cost when nothing else runs)."""
    if type(stream) is not _SocketStream:
        return await receive_within(stream, timeout, wait_first=True)
    await trio.lowlevel.cancel_shielded_checkpoint()
    return await receive_within(stream, timeout, wait_first=False)


def try_read(stream: trio.abc.Stream) -> bytes | None:
    """What a plain TCP stream has for us now (``b""`` at EOF), or None when nothing is there
    (or the stream is not a plain socket). Raises like ``receive_some``."""
    if type(stream) is not _SocketStream:
        return None
    try:
        return read_now(_fd(stream))
    except BlockingIOError:
        return None
    except OSError as exc:
        raise _stream_error(exc) from None


async def read_after_wait(stream: trio.abc.Stream) -> bytes:
    """Wait for bytes and read them, with no deadline of its own: the caller's cancel scope
    bounds it (the keep-alive wait for a client's next request, which draining cancels)."""
    if type(stream) is not _SocketStream:
        return cast(bytes, await stream.receive_some(RECEIVE_SIZE))
    while True:
        fd = _fd(stream)
        await wait_readable(fd)
        try:
            return read_now(fd)
        except BlockingIOError:
            continue
        except OSError as exc:
            raise _stream_error(exc) from None
