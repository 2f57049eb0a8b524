"""CONNECT tunnels: a byte pump in each direction, with half-close and an optional idle bound.

How it works: ``run_tunnel`` runs two pumps in one nursery. Each pump reads up to 64 KiB and writes
it to the other side before reading again (backpressure: a slow reader stalls the sender's TCP
window, memory stays at one buffer per direction). When one side sends FIN, its pump passes it on
with ``send_eof`` (shutdown(SHUT_WR)) and ends, while the other direction keeps flowing: RFC
9110 §9.3.6 tunnels carry TCP semantics, and protocols such as TLS close_notify or HTTP/1.0
bodies rely on half-close. The tunnel ends when both directions have ended, either side fails
(reset), or no byte moved in either direction for ``tunnel.idle_timeout`` seconds (0: no idle
bound). Both sockets are then closed, which is the only cleanup there is.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

import trio

TUNNEL_CHUNK: Final = 65536


@dataclass(slots=True)
class TunnelStats:
    bytes_up: int = 0  # client -> origin
    bytes_down: int = 0  # origin -> client
    ended_by: str = "close"


async def run_tunnel(
    client: trio.SocketStream,
    upstream: trio.abc.Stream,
    *,
    idle_timeout: float,
    stats: TunnelStats,
    on_bytes: Callable[[bool, int], None] | None = None,
) -> None:
    """Pump bytes both ways until both sides are done; never raises for network errors."""
    idle = idle_timeout if idle_timeout > 0 else None
    scope = trio.CancelScope()
    if idle is not None:
        scope.deadline = trio.current_time() + idle

    async def pump(source: trio.abc.ReceiveStream, sink: trio.abc.Stream, upward: bool) -> None:
        try:
            while True:
                data = await source.receive_some(TUNNEL_CHUNK)
                if not data:
                    if isinstance(sink, trio.abc.HalfCloseableStream):
                        await sink.send_eof()
                    # (TLS to an HTTPS proxy cannot half-close: the other direction goes on, and
                    # the tunnel ends when it does.)
                    return
                if idle is not None:
                    scope.deadline = trio.current_time() + idle
                await sink.send_all(data)
                size = len(data)
                if upward:
                    stats.bytes_up += size
                else:
                    stats.bytes_down += size
                if on_bytes is not None:
                    on_bytes(upward, size)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            stats.ended_by = "reset"
            scope.cancel()

    with scope:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pump, client, upstream, True)
            nursery.start_soon(pump, upstream, client, False)
    if scope.cancelled_caught and stats.ended_by == "close":
        stats.ended_by = "idle_timeout"
