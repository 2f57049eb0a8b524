"""The trio side of PAC evaluation: the worker thread, the engine on it, and the DNS rounds.

``PacEvaluator`` owns one ``JsThread`` and the ``PacEngine`` that lives on it. Every engine call is
a job on that thread (``await thread.run(...)``), so the trio loop never runs JavaScript and the
QuickJS context never changes threads.

``find_proxy(url, host, now, utc_offset_minutes)`` runs the non-blocking DNS protocol of
pac/helpers.js (Chromium's ProxyResolverV8Tracing does the same with V8):

    answers = {}
    repeat up to MAX_DNS_ROUNDS times:
        evaluate(url, host, now, answers)      # on the worker thread
        -> a result string: done
        -> names it needed but were not in answers: resolve them all, concurrently, with the
           injected ``resolve`` (proxyd's resolver: cache, dns.hosts overrides, limits), each
           bounded by ``dns_timeout``; a failure or a timeout is the answer "no address"; repeat
    more rounds than that: PacEvalError (the script keeps asking for new names)

A script that calls ``dnsResolve(host)`` therefore runs twice on a cold lookup; the second run
gets the answer synchronously. ``used_dns`` in the result tells the router to give a cached result
the DNS time to live. Nothing here reads a clock: ``now`` (wall-clock seconds, for the date and
time helpers) and the zone offset come from the caller.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import trio

from proxyd.routing.pac.engine import PacEngine, PacEvalError
from proxyd.routing.pac.localaddr import my_ip_answers, probe_local_addresses
from proxyd.routing.pac.thread import JsThread, JsThreadClosed

logger = logging.getLogger(__name__)

Resolve = Callable[[str], Awaitable[list[str]]]
MAX_DNS_ROUNDS = 8


@dataclass(frozen=True, slots=True)
class PacAnswer:
    result: str
    used_dns: bool
    rounds: int
    alerts: tuple[str, ...] = ()


class PacEvaluator:
    def __init__(
        self,
        *,
        timeout: float,
        memory_limit: int,
        resolve: Resolve,
        dns_timeout: float = 5.0,
        local_addresses: Sequence[str] | None = None,
    ) -> None:
        self._timeout = timeout
        self._memory_limit = memory_limit
        self._resolve = resolve
        self._dns_timeout = dns_timeout
        self._local_addresses = None if local_addresses is None else tuple(local_addresses)
        self._thread: JsThread | None = None
        self._engine: PacEngine | None = None

    async def start(self) -> None:
        """Start the worker thread and create the engine on it."""
        self._thread = thread = JsThread()
        fixed = self._local_addresses

        def create() -> PacEngine:
            addresses = probe_local_addresses() if fixed is None else fixed
            my_ip, my_ip_ex = my_ip_answers(addresses)
            return PacEngine(
                timeout=self._timeout,
                memory_limit=self._memory_limit,
                my_ip=my_ip,
                my_ip_ex=my_ip_ex,
            )

        self._engine = await thread.run(create)

    def _parts(self) -> tuple[JsThread, PacEngine]:
        if self._thread is None or self._engine is None:
            raise PacEvalError("the PAC engine is not running")
        return self._thread, self._engine

    async def load(self, source: str, name: str) -> str:
        """Compile ``source`` (PacLoadError on failure); returns the entry point's name."""
        thread, engine = self._parts()
        return await thread.run(functools.partial(engine.load, source, name))

    async def find_proxy(
        self, url: str, host: str, now: float, utc_offset_minutes: float = 0.0
    ) -> PacAnswer:
        """The script's result string for (url, host); raises ``PacEvalError``."""
        thread, engine = self._parts()
        answers: dict[str, list[str]] = {}
        now_ms = now * 1000.0
        for round_number in range(1, MAX_DNS_ROUNDS + 1):
            job = functools.partial(
                engine.evaluate,
                url,
                host,
                now_ms,
                utc_offset_minutes,
                json.dumps(answers) if answers else "",
            )
            try:
                evaluation = await thread.run(job)
            except JsThreadClosed:
                raise PacEvalError("the PAC engine is stopped") from None
            if evaluation.result is not None:
                return PacAnswer(evaluation.result, bool(answers), round_number, evaluation.alerts)
            await self._resolve_all(evaluation.missing, answers)
        raise PacEvalError(f"the script needed more than {MAX_DNS_ROUNDS} rounds of DNS lookups")

    async def _resolve_all(self, names: Sequence[str], answers: dict[str, list[str]]) -> None:
        async def resolve_one(name: str) -> None:
            addresses: list[str] = []
            with trio.move_on_after(self._dns_timeout):
                try:
                    addresses = list(await self._resolve(name))
                except Exception as exc:  # any lookup failure means "no address" to PAC
                    logger.debug("PAC dnsResolve(%s) failed: %s", name, exc)
            answers[name] = addresses

        async with trio.open_nursery() as nursery:
            for name in names:
                if name not in answers:
                    nursery.start_soon(resolve_one, name)

    @property
    def entry(self) -> str | None:
        return self._engine.entry if self._engine is not None else None

    def close(self) -> None:
        """Free the context on the worker thread, then stop it (never blocks)."""
        thread, engine = self._thread, self._engine
        self._thread = self._engine = None
        if thread is not None:
            if engine is not None:
                thread.submit_nowait(engine.dispose)
            thread.close()
