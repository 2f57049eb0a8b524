"""Collapsed forwarding: one fetch per cache key, later requests follow it.

How it works: the first request that must go to the origin for a key becomes the *leader* of a
``Flight``; requests for the same key that arrive while the flight is in the air become
*followers* and wait for its outcome instead of going to the origin themselves (Chromium's per-URL
cache lock, Squid's collapsed_forwarding). The leader publishes one of four outcomes as soon as
the response head is known:

``STREAMING``   the response is being stored: followers whose request selects the same variant
                (RFC 9111 §4.1) read the body from the store's temporary file while the leader
                is still writing it (read-while-write), paced by ``wait_progress``.
``REVALIDATED`` a 304 refreshed the stored response: followers look it up again and serve it.
``UNSHAREABLE`` the answer may not be stored (private, no-store, an error ...): each follower
                fetches for itself, as it would have without the flight.
``FAILED``      the leader failed before a response head: followers fetch for themselves.

A flight lives in one process (collapsing across processes is not attempted: each process leads
its own flight and the store keeps whichever response committed last). Followers never wait
without a bound: the head wait is bounded by the response-head timeout and each progress wait by
the idle-read timeout, as if they were talking to the origin.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import trio

from proxyd.cache.policy import Header
from proxyd.cache.store import BodyReader, BodyWriter


class Outcome(enum.Enum):
    PENDING = "pending"
    STREAMING = "streaming"
    REVALIDATED = "revalidated"
    UNSHAREABLE = "unshareable"
    FAILED = "failed"


@dataclass(frozen=True, slots=True)
class SharedHead:
    """What followers need to answer from a stored-while-streaming response."""

    status: int
    reason: bytes
    headers: tuple[Header, ...]  # as stored (end-to-end fields)
    variant: bytes
    request_time: float
    response_time: float


@dataclass(eq=False, slots=True)
class Flight:
    key: str
    outcome: Outcome = Outcome.PENDING
    head: SharedHead | None = None
    writer: BodyWriter | None = None
    reader: BodyReader | None = None
    followers: int = 0
    #: the whole body is in the store's file (the leader's sink ended)
    body_complete: bool = False
    #: the body will never complete (origin or disk failure mid-body)
    body_failed: bool = False
    decided: trio.Event = field(default_factory=trio.Event)
    _progress: trio.Event = field(default_factory=trio.Event)
    _readers_open: int = 0

    # --- the leader's side ---

    def publish(self, outcome: Outcome, head: SharedHead | None = None) -> None:
        if self.decided.is_set():
            return
        self.outcome = outcome
        self.head = head
        if outcome is Outcome.STREAMING and self.writer is not None:
            # Opened now, while the temporary file certainly exists; shared by every follower
            # (positional reads carry no offset state).
            self.reader = self.writer.open_follower()
        self.decided.set()

    def progressed(self) -> None:
        self._progress.set()
        self._progress = trio.Event()

    def end_body(self, *, complete: bool) -> None:
        self.body_complete = complete
        self.body_failed = not complete
        self.progressed()

    # --- the followers' side ---

    def written(self) -> int:
        return self.writer.written if self.writer is not None else 0

    async def wait_progress(self, timeout: float) -> bool:
        """Wait for more body bytes (or the end); False on timeout."""
        event = self._progress
        with trio.move_on_after(timeout):
            await event.wait()
            return True
        return False

    def acquire_reader(self) -> BodyReader | None:
        if self.reader is not None:
            self._readers_open += 1
        return self.reader

    async def release_reader(self) -> None:
        self._readers_open -= 1
        await self._maybe_close_reader()

    async def _maybe_close_reader(self) -> None:
        if self._readers_open <= 0 and self.reader is not None and self.body_done():
            reader, self.reader = self.reader, None
            with trio.CancelScope(shield=True):
                await reader.aclose()

    def body_done(self) -> bool:
        return self.body_complete or self.body_failed or self.outcome is not Outcome.STREAMING


class Coalescer:
    """The flights in the air in this process, by cache key."""

    def __init__(self) -> None:
        self._flights: dict[str, Flight] = {}

    def join(self, key: str) -> tuple[Flight, bool]:
        """The flight for ``key`` and whether the caller leads it (True: go to the origin)."""
        flight = self._flights.get(key)
        if flight is not None:
            flight.followers += 1
            return flight, False
        flight = self._flights[key] = Flight(key)
        return flight, True

    async def land(self, flight: Flight) -> None:
        """The leader is done with the flight (in a finally: whatever happened)."""
        if self._flights.get(flight.key) is flight:
            del self._flights[flight.key]
        if not flight.decided.is_set():
            flight.publish(Outcome.FAILED)
        if flight.outcome is Outcome.STREAMING and not flight.body_done():
            flight.end_body(complete=False)
        await flight._maybe_close_reader()

    def in_flight(self, key: str) -> bool:
        return key in self._flights

    def __len__(self) -> int:
        return len(self._flights)
