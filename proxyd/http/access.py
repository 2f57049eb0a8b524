"""Who may use the proxy: the client address ACL and Basic proxy authentication (pure).

Passwords are stored only as salted hashes (stdlib ``hashlib.scrypt``, or PBKDF2-SHA256):
``scrypt$N$r$p$<salt b64>$<hash b64>`` / ``pbkdf2_sha256$<iterations>$<salt b64>$<hash b64>``,
written by ``proxyd hash-password``. Verifying one costs tens of milliseconds of CPU on purpose, so
the client shell runs ``verify_password`` in a worker thread and remembers recent successes by
the exact ``Proxy-Authorization`` value (``AuthCache``): a browser sends the same value on every
request.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import ipaddress
import os
from collections import OrderedDict
from collections.abc import Iterable, Mapping

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

SCRYPT_N, SCRYPT_R, SCRYPT_P = 1 << 14, 8, 1


class ClientAcl:
    """``acl.allow_clients``: is this client address allowed? (results cached per address)."""

    def __init__(self, networks: Iterable[Network]) -> None:
        self._networks = tuple(networks)
        self._cache: dict[str, bool] = {}

    def allows(self, address: str) -> bool:
        known = self._cache.get(address)
        if known is not None:
            return known
        try:
            ip = ipaddress.ip_address(address.split("%", 1)[0])
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        allowed = any(ip in network for network in self._networks)
        if len(self._cache) > 4096:
            self._cache.clear()
        self._cache[address] = allowed
        return allowed


def hash_password(password: str, *, scheme: str = "scrypt") -> str:
    salt = os.urandom(16)
    b64 = base64.b64encode
    if scheme == "scrypt":
        digest = hashlib.scrypt(
            password.encode("utf-8"), salt=salt, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P, dklen=32
        )
        return (
            f"scrypt${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${b64(salt).decode()}${b64(digest).decode()}"
        )
    if scheme == "pbkdf2_sha256":
        iterations = 600_000
        digest = hashlib.pbkdf2_hmac("sha256", password.encode("utf-8"), salt, iterations)
        return f"pbkdf2_sha256${iterations}${b64(salt).decode()}${b64(digest).decode()}"
    raise ValueError(f"unknown password scheme {scheme!r}")


def verify_password(stored: str, password: str) -> bool:
    """Constant-time check of ``password`` against a stored hash (blocking: run off the loop)."""
    parts = stored.split("$")
    try:
        if parts[0] == "scrypt":
            n, r, p = (int(x) for x in parts[1:4])
            salt, expected = base64.b64decode(parts[4]), base64.b64decode(parts[5])
            digest = hashlib.scrypt(
                password.encode("utf-8"),
                salt=salt,
                n=n,
                r=r,
                p=p,
                dklen=len(expected),
                maxmem=256 * 1024 * 1024,
            )
        elif parts[0] == "pbkdf2_sha256":
            iterations = int(parts[1])
            salt, expected = base64.b64decode(parts[2]), base64.b64decode(parts[3])
            digest = hashlib.pbkdf2_hmac("sha256", password.encode("utf-8"), salt, iterations)
        else:
            return False
    except (ValueError, IndexError, binascii.Error):
        return False
    return hmac.compare_digest(digest, expected)


def parse_basic_credentials(value: bytes) -> tuple[str, str] | None:
    """``Basic dXNlcjpwYXNz`` -> ("user", "pass"); None when it is not well-formed Basic."""
    scheme, _, token = value.strip().partition(b" ")
    if scheme.lower() != b"basic" or not token:
        return None
    try:
        decoded = base64.b64decode(token.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None
    user, sep, password = decoded.partition(":")
    if not sep:
        return None
    return user, password


class AuthCache:
    """Recently verified ``Proxy-Authorization`` values -> user name (bounded, LRU)."""

    def __init__(self, users: Mapping[str, str], size: int = 1024) -> None:
        self.users = dict(users)
        self._ok: OrderedDict[bytes, str] = OrderedDict()
        self._size = size

    def lookup(self, header: bytes) -> str | None:
        user = self._ok.get(header)
        if user is not None:
            self._ok.move_to_end(header)
        return user

    def remember(self, header: bytes, user: str) -> None:
        self._ok[header] = user
        if len(self._ok) > self._size:
            self._ok.popitem(last=False)
