"""The answers for ``myIpAddress()`` / ``myIpAddressEx()``, found without sending a packet.

For each family a UDP socket is ``connect()``ed to a documentation address (RFC 5737
``192.0.2.1``, RFC 3849 ``2001:db8::1``): connecting a datagram socket only asks the kernel which
route and source address it would use; nothing is sent. The source address is the address of the
interface that carries the default route, which is what Chromium's ``myIpAddress`` returns
(it probes the same way) and what PAC scripts expect. Loopback and unspecified answers are
skipped; a family without a route contributes nothing; with no answer at all, ``127.0.0.1``.

This runs once, when the PAC engine starts (on the PAC worker thread: a few local syscalls).
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Sequence

_PROBES = ((socket.AF_INET, "192.0.2.1"), (socket.AF_INET6, "2001:db8::1"))
LOOPBACK = "127.0.0.1"


def probe_local_addresses() -> tuple[str, ...]:
    """Source addresses of the default routes, IPv4 first; possibly empty."""
    found: list[str] = []
    for family, target in _PROBES:
        try:
            with socket.socket(family, socket.SOCK_DGRAM) as sock:
                sock.connect((target, 9))  # UDP connect: route lookup only, no packet
                address = ipaddress.ip_address(sock.getsockname()[0].split("%")[0])
        except (OSError, ValueError):
            continue
        if not (address.is_unspecified or address.is_loopback):
            found.append(str(address))
    return tuple(found)


def my_ip_answers(addresses: Sequence[str]) -> tuple[str, str]:
    """(``myIpAddress()``, ``myIpAddressEx()``): the first IPv4, and the whole list."""
    ipv4 = [a for a in addresses if ":" not in a]
    first = ipv4[0] if ipv4 else LOOPBACK
    return first, ";".join(addresses) if addresses else LOOPBACK
