"""WebSocket frames for one hop: a lean encoder and a bounded permessage-deflate (pure, no I/O).

How it works: the relay decodes each hop with ``PlainDecoder`` (no extensions) or wsproto's
``FrameProtocol`` (masking, fragment and UTF-8 checks, extensions; Close payloads are checked by
our ``_close_payload`` on both, so both hops accept the same codes) and re-encodes for the other
hop with ``FrameEncoder``. The encoder is ours rather than wsproto's because the relay must be
able to send data to a peer that has already sent its Close (RFC 6455 §5.5.1: the side that has
not closed yet may go on sending until it sends its own Close; wsproto's ``Connection``
refuses), and because it is on the per-message path: it appends each frame to the caller's
``bytearray`` (one ``send_all`` per batch), masks small payloads with one big-integer XOR, and
draws masking keys from a 4 KiB pool of ``os.urandom`` bytes instead of one system call per frame
(RFC 6455 §5.3 asks for keys from a strong source of entropy; the pool is that source). The
pool is one per process, not one per encoder: every session sends at least a Close to its
origin, and a pool per session cost a 4 KiB ``getrandom`` on that path (and 4 KiB held by
every idle session that had sent a frame upstream). Each key is used once; a forked worker
starts with an empty pool, so no two processes share keys.

``BoundedDeflate`` is wsproto's ``PerMessageDeflate`` (RFC 7692) with its inbound half replaced:
inflation stops at ``max_message_size`` bytes per message (``decompress(data, max_length)``),
so a deflate bomb costs at most one message limit of memory and closes with 1009; and the
compression state survives a control frame between two fragments of a compressed message (RFC
6455 §5.4 allows control frames there; wsproto resets its per-message flag on them).
Negotiation stays wsproto's (``accept``, ``finalize``), see ``handshake.py``.
"""

from __future__ import annotations

import codecs
import os
import struct
import zlib
from typing import Any, Final

from wsproto.extensions import PerMessageDeflate
from wsproto.frame_protocol import (
    CloseReason,
    Frame,
    FrameDecoder,
    FrameProtocol,
    Opcode,
    ParseFailed,
    RsvBits,
)

OP_CONTINUATION: Final = 0x0
OP_TEXT: Final = 0x1
OP_BINARY: Final = 0x2
OP_CLOSE: Final = 0x8
OP_PING: Final = 0x9
OP_PONG: Final = 0xA

_FIN: Final = 0x80
_RSV1: Final = 0x40
_MASK_BIT: Final = 0x80
#: RFC 6455 §5.5: control frame payloads are at most 125 bytes; a Close holds 2 for the code.
MAX_CLOSE_REASON_BYTES: Final = 123
_NO_RSV: Final = RsvBits(False, False, False)
_RSV1_USED: Final = RsvBits(True, False, False)
_DEFLATE_TAIL: Final = b"\x00\x00\xff\xff"  # RFC 7692 §7.2.2: appended before inflating
_KEY_POOL: Final = 4096
_pack_short = struct.Struct("!BBH").pack
_pack_long = struct.Struct("!BBQ").pack
_OPCODES: Final = {
    OP_CONTINUATION: Opcode.CONTINUATION,
    OP_TEXT: Opcode.TEXT,
    OP_BINARY: Opcode.BINARY,
}


#: Below this size one big-integer XOR is fastest; above it, four ``bytes.translate`` passes
#: over the strided bytes (one per key byte) are (measured: 0.5 µs at 64 B, 70 µs at 64 KiB).
_TRANSLATE_FROM: Final = 2048
_xor_tables: list[bytes | None] = [None] * 256


def _xor_table(byte: int) -> bytes:
    table = _xor_tables[byte]
    if table is None:
        table = _xor_tables[byte] = bytes(value ^ byte for value in range(256))
    return table


def mask_payload(payload: bytes | bytearray, key: bytes) -> bytes | bytearray:
    """RFC 6455 §5.3: XOR with the 4-byte key repeated."""
    size = len(payload)
    if not size:
        return b""
    if size < _TRANSLATE_FROM:
        repeated = (key * ((size >> 2) + 1))[:size]
        value = int.from_bytes(payload, "little") ^ int.from_bytes(repeated, "little")
        return value.to_bytes(size, "little")
    data = bytearray(payload)
    for index in range(4):
        data[index::4] = data[index::4].translate(_xor_table(key[index]))
    return data


def truncate_reason(reason: str) -> bytes:
    """A Close reason as UTF-8, cut to 123 bytes on a character boundary (RFC 6455 §5.5.1)."""
    data = reason.encode("utf-8")
    if len(data) <= MAX_CLOSE_REASON_BYTES:
        return data
    return data[:MAX_CLOSE_REASON_BYTES].decode("utf-8", "ignore").encode("utf-8")


class _MaskingKeys:
    """The process's pool of masking keys (see the module docstring)."""

    __slots__ = ("_keys", "_pos")

    def __init__(self) -> None:
        self._keys = b""
        self._pos = _KEY_POOL

    def take(self) -> bytes:
        """Four fresh bytes of ``os.urandom``, each handed out once (RFC 6455 §5.3)."""
        pos = self._pos
        if pos >= _KEY_POOL:
            self._keys = os.urandom(_KEY_POOL)
            pos = 0
        self._pos = pos + 4
        return self._keys[pos : pos + 4]

    def forget(self) -> None:
        """Drop what is left (a forked child must not reuse its parent's keys)."""
        self._keys = b""
        self._pos = _KEY_POOL


_masking_keys: Final = _MaskingKeys()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_masking_keys.forget)


class FrameEncoder:
    """Frames for one hop. ``client`` is True on the origin hop (the proxy is the WebSocket
    client there and must mask, RFC 6455 §5.1). Data frames must come from one task at a time
    (they carry the fragmentation and compression state); control frames may come from any."""

    __slots__ = ("_deflate", "_in_message", "client")

    def __init__(self, *, client: bool, deflate: PerMessageDeflate | None = None) -> None:
        self.client = client  # read by PerMessageDeflate.frame_outbound (window bits)
        self._deflate = deflate
        self._in_message = False

    @property
    def compresses(self) -> bool:
        return self._deflate is not None

    def data(self, out: bytearray, payload: bytes, text: bool, fin: bool) -> None:
        """Append one data frame: the first of a message carries its type, the rest are
        continuations; ``fin`` ends the message (RFC 6455 §5.4)."""
        opcode = OP_CONTINUATION if self._in_message else OP_TEXT if text else OP_BINARY
        self._in_message = not fin
        first = _FIN | opcode if fin else opcode
        deflate = self._deflate
        if deflate is not None:
            rsv, compressed = deflate.frame_outbound(
                self,  # type: ignore[arg-type]  # duck-typed: only .client is read
                _OPCODES[opcode],
                _NO_RSV,
                payload,
                fin,
            )
            payload = compressed
            if rsv.rsv1:
                first |= _RSV1
        self._append(out, first, payload)

    def ping(self, out: bytearray, payload: bytes = b"") -> None:
        self._append(out, _FIN | OP_PING, payload)

    def pong(self, out: bytearray, payload: bytes = b"") -> None:
        self._append(out, _FIN | OP_PONG, payload)

    def close(self, out: bytearray, code: int | None, reason: str = "") -> None:
        """A Close frame; ``code`` None sends an empty payload (RFC 6455 §5.5.1: no code, so no
        reason either)."""
        payload = b"" if code is None else code.to_bytes(2, "big") + truncate_reason(reason)
        self._append(out, _FIN | OP_CLOSE, payload)

    def binary_masked(
        self, out: bytearray, masked: bytes | bytearray, key: bytes, fin: bool
    ) -> None:
        """A binary data frame from a payload still masked with ``key`` (as the client sent it):
        unmasking and masking with our own fresh key are one XOR pass with both keys
        (RFC 6455 §5.3: XOR is its own inverse). Only for a masking hop without compression."""
        opcode = OP_CONTINUATION if self._in_message else OP_BINARY
        self._in_message = not fin
        ours = self._head(out, _FIN | opcode if fin else opcode, len(masked))
        both = (int.from_bytes(key, "big") ^ int.from_bytes(ours, "big")).to_bytes(4, "big")
        out += mask_payload(masked, both)

    def _head(self, out: bytearray, first: int, size: int) -> bytes:
        """Write a frame header; returns the masking key written with it (b"": none)."""
        second = _MASK_BIT if self.client else 0
        if size < 126:
            out.append(first)
            out.append(second | size)
        elif size < 65536:
            out += _pack_short(first, second | 126, size)
        else:
            out += _pack_long(first, second | 127, size)
        if not self.client:
            return b""
        key = _masking_keys.take()
        out += key
        return key

    def _append(self, out: bytearray, first: int, payload: bytes | bytearray) -> None:
        key = self._head(out, first, len(payload))
        if key:
            out += mask_payload(payload, key)
        else:
            out += payload


class BoundedDeflate(PerMessageDeflate):
    """permessage-deflate whose inflation is bounded per message (see the module docstring)."""

    def __init__(self, max_message_size: int) -> None:
        super().__init__()
        self.max_message_size = max_message_size
        self._inflater: zlib._Decompress | None = None
        self._message_compressed = False
        self._data_frame = False
        self._inflated = 0

    def frame_inbound_header(
        self,
        proto: FrameDecoder | FrameProtocol,
        opcode: Opcode,
        rsv: RsvBits,
        payload_length: int,
    ) -> CloseReason | RsvBits:
        if opcode.iscontrol():
            # RFC 7692 §6: RSV1 is only meaningful on the first frame of a data message; a
            # control frame leaves the state of the message it interrupts untouched.
            self._data_frame = False
            return CloseReason.PROTOCOL_ERROR if rsv.rsv1 else _NO_RSV
        self._data_frame = True
        if opcode is Opcode.CONTINUATION:
            return CloseReason.PROTOCOL_ERROR if rsv.rsv1 else _RSV1_USED
        self._message_compressed = rsv.rsv1
        self._inflated = 0
        if rsv.rsv1 and self._inflater is None:
            bits = self.server_max_window_bits if proto.client else self.client_max_window_bits
            self._inflater = zlib.decompressobj(-bits)
        return _RSV1_USED

    def _inflate(self, data: bytes) -> bytes | CloseReason:
        inflater = self._inflater
        assert inflater is not None
        budget = self.max_message_size - self._inflated + 1
        try:
            out = inflater.decompress(data, budget)
        except zlib.error:
            return CloseReason.INVALID_FRAME_PAYLOAD_DATA
        self._inflated += len(out)
        if self._inflated > self.max_message_size:
            return CloseReason.MESSAGE_TOO_BIG
        return out

    def frame_inbound_payload_data(
        self, proto: FrameDecoder | FrameProtocol, data: bytes
    ) -> bytes | CloseReason:
        if not self._data_frame or not self._message_compressed:
            return data
        return self._inflate(data)

    def frame_inbound_complete(
        self, proto: FrameDecoder | FrameProtocol, fin: bool
    ) -> bytes | CloseReason | None:
        if not self._data_frame or not fin:
            return None
        if not self._message_compressed:
            return None
        self._message_compressed = False
        result = self._inflate(_DEFLATE_TAIL)
        peer_resets = (
            self.server_no_context_takeover if proto.client else (self.client_no_context_takeover)
        )
        if peer_resets or (self._inflater is not None and self._inflater.eof):
            self._inflater = None
        return result


# --- decoding ----------------------------------------------------------------------------------

#: What a decoder yields: (opcode, payload, message finished). Data frames carry the message's
#: opcode (TEXT or BINARY, never CONTINUATION) and bytes (text already checked as UTF-8); a Close
#: carries (code or None, reason); PING and PONG their payload; ``OP_ERROR`` (last, if any) the
#: ``ParseFailed`` of a frame that broke RFC 6455, with the close code to send in its ``code``.
Decoded = tuple[int, Any, bool]
OP_ERROR: Final = -1
#: A binary chunk still masked by the client: the payload is (masked bytes, key of its first
#: byte). Only from a ``PlainDecoder(pass_masked=True)``.
OP_BINARY_MASKED: Final = 0x12

# RFC 6455 §7.4 and the IANA registry: codes a peer may put in a Close frame.
_VALID_CLOSE: Final = frozenset(range(1000, 1004)) | frozenset(range(1007, 1015))
_KNOWN_OPCODES: Final = frozenset({OP_CONTINUATION, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG})
_unpack_short = struct.Struct("!H").unpack_from
_unpack_long = struct.Struct("!Q").unpack_from


def _close_payload(payload: bytes | bytearray) -> tuple[int | None, str]:
    """RFC 6455 §5.5.1, §7.4: an empty payload has no code; otherwise a valid code and UTF-8."""
    if not payload:
        return None, ""
    if len(payload) == 1:
        raise ParseFailed("CLOSE with 1 byte payload")
    code = (payload[0] << 8) | payload[1]
    if code not in _VALID_CLOSE and not 3000 <= code <= 4999:
        raise ParseFailed(f"CLOSE with invalid code {code}")
    try:
        reason = payload[2:].decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ParseFailed(
            f"invalid UTF-8 in a CLOSE reason: {exc}", CloseReason.INVALID_FRAME_PAYLOAD_DATA
        ) from None
    return code, reason


class PlainDecoder:
    """RFC 6455 §5 frames of a hop without extensions, decoded in one pass over each read.

    Checks what wsproto's ``FrameProtocol`` checks (reserved bits, opcodes, masking direction,
    minimal length encodings, control frame size and fragmentation, continuation order, UTF-8 of
    text messages and Close reasons, Close codes) and raises the same ``ParseFailed``; the tests
    compare the two on generated frame streams. It exists for speed: no generator, no Buffer
    copies and no Frame tuple per frame, one list per read. Large frames come out in pieces as
    their bytes arrive, like wsproto's. ``client``: proxyd is the client on this hop (frames from
    the peer are not masked).
    """

    __slots__ = (
        "_buffer",
        "_client",
        "_closed",
        "_frame_fin",
        "_key",
        "_key_offset",
        "_message",
        "_remaining",
        "_text",
        "_utf8",
        "pass_masked",
    )

    def __init__(self, *, client: bool, pass_masked: bool = False) -> None:
        self._client = client
        #: Binary payloads from a masking peer stay masked (OP_BINARY_MASKED, see _data).
        self.pass_masked = pass_masked
        self._closed = False
        self._buffer = b""
        self._remaining = 0  # payload bytes still to come for the current data frame
        self._frame_fin = False
        self._key: bytes | None = None
        self._key_offset = 0
        self._message = 0  # opcode of the message in progress (0: none)
        self._text = False
        self._utf8: Any = None  # incremental UTF-8 checker of a fragmented text message

    def feed(self, data: bytes | bytearray) -> list[Decoded]:
        """Every frame (or piece of one) the bytes so far complete; raises ParseFailed."""
        if self._closed:
            return []  # nothing after a Close (or an error) is parsed (RFC 6455 §1.4)
        out: list[Decoded] = []
        try:
            self._parse(self._buffer + data if self._buffer else data, out)
        except ParseFailed as exc:
            # What came before the bad frame is still relayed, then the error (as wsproto).
            out.append((OP_ERROR, exc, True))
            self._closed = True
        return out

    def _parse(self, buffer: bytes | bytearray, out: list[Decoded]) -> None:
        size = len(buffer)
        position = 0
        while True:
            if self._remaining:
                take = min(self._remaining, size - position)
                if not take:
                    break
                chunk = buffer[position : position + take]
                position += take
                self._remaining -= take
                self._data(out, chunk, take)
                if self._remaining:
                    break
                continue
            if size - position < 2:
                break
            first = buffer[position]
            second = buffer[position + 1]
            opcode = first & 0x0F
            fin = bool(first & 0x80)
            length = second & 0x7F
            if first & 0x70:
                raise ParseFailed("Reserved bit set unexpectedly")
            if opcode not in _KNOWN_OPCODES:
                raise ParseFailed(f"Invalid opcode {opcode:#x}")
            control = opcode >= OP_CLOSE
            if control:
                if not fin:
                    raise ParseFailed("Invalid attempt to fragment control frame")
                if length > 125:
                    raise ParseFailed("Control frame with payload len > 125")
            masked = bool(second & 0x80)
            if masked == self._client:
                raise ParseFailed(
                    "client received unexpected masked frame"
                    if self._client
                    else "server received unexpected unmasked frame"
                )
            header = 2
            if length == 126:
                if size - position < 4:
                    break
                (length,) = _unpack_short(buffer, position + 2)
                if length < 126:
                    raise ParseFailed("Payload length used 2 bytes when 1 would have sufficed")
                header = 4
            elif length == 127:
                if size - position < 10:
                    break
                (length,) = _unpack_long(buffer, position + 2)
                if length < 65536:
                    raise ParseFailed("Payload length used 8 bytes when 2 would have sufficed")
                if length >> 63:
                    raise ParseFailed("8-byte payload length with non-zero MSB")
                header = 10
            key = None
            if masked:
                if size - position < header + 4:
                    break
                key = bytes(buffer[position + header : position + header + 4])
                header += 4
            if control:
                if size - position < header + length:
                    break
                start = position + header
                payload: bytes | bytearray = buffer[start : start + length]
                position = start + length
                if key is not None:
                    payload = mask_payload(payload, key)
                if opcode == OP_CLOSE:
                    out.append((OP_CLOSE, _close_payload(payload), True))
                    self._closed = True
                    position = size
                    break
                out.append((opcode, payload, True))
                continue
            if opcode == OP_CONTINUATION:
                if not self._message:
                    raise ParseFailed("unexpected CONTINUATION")
            else:
                if self._message:
                    raise ParseFailed(f"expected CONTINUATION, got {Opcode(opcode)!r}")
                self._message = opcode
                self._text = opcode == OP_TEXT
                self._utf8 = None
            position += header
            self._frame_fin = fin
            self._key = key
            self._key_offset = 0
            self._remaining = length
            if not length:
                self._data(out, b"", 0)
        if position >= size:
            self._buffer = b""
        else:
            self._buffer = bytes(buffer[position:])

    def _data(self, out: list[Decoded], chunk: bytes | bytearray, take: int) -> None:
        key = self._key
        finished = self._frame_fin and not self._remaining
        if key is not None:
            offset = self._key_offset
            if offset:
                key = key[offset:] + key[:offset]
            self._key_offset = (offset + take) & 3
            if self.pass_masked and not self._text:
                # Binary data needs no look inside: it leaves still masked, with the key of
                # its first byte, for FrameEncoder.binary_masked.
                out.append((OP_BINARY_MASKED, (chunk, key), finished))
                if finished:
                    self._message = 0
                return
            chunk = mask_payload(chunk, key)
        if self._text:
            checker = self._utf8
            try:
                if checker is None and finished:
                    chunk.decode("utf-8")  # a whole text message: the common case
                else:
                    if checker is None:
                        checker = self._utf8 = _utf8_checker()
                    checker.decode(chunk, finished)
            except UnicodeDecodeError as exc:
                raise ParseFailed(str(exc), CloseReason.INVALID_FRAME_PAYLOAD_DATA) from None
        out.append((self._message, chunk, finished))
        if finished:
            self._message = 0
            self._utf8 = None


def _utf8_checker() -> Any:
    return codecs.getincrementaldecoder("utf-8")()


class _FrameProtocol(FrameProtocol):
    """wsproto's parser with our Close payload check (``_close_payload``), so both decoders
    accept the same codes: wsproto only knows the codes of its ``CloseReason`` enum and refuses
    registered ones it lacks (1014 Bad Gateway) as "unknown reserved" (RFC 6455 §7.4.2: codes
    1000-2999 are assigned by IANA, and a proxy must relay every assigned one)."""

    def _process_close(self, frame: Frame) -> Frame:
        payload = frame.payload
        assert isinstance(payload, bytes | bytearray)
        close: Any = _close_payload(payload)  # (None, "") for no code, where wsproto says 1005
        return Frame(frame.opcode, close, frame.frame_finished, frame.message_finished)


class WsprotoDecoder:
    """wsproto's ``FrameProtocol`` behind the same ``feed`` as ``PlainDecoder``: used on a hop
    with permessage-deflate (``BoundedDeflate`` plugs into it). Close payloads are checked by
    ``_close_payload``, as on plain hops."""

    __slots__ = ("_protocol",)

    def __init__(self, *, client: bool, extensions: list[Any]) -> None:
        self._protocol = _FrameProtocol(client=client, extensions=extensions)

    def feed(self, data: bytes | bytearray) -> list[Decoded]:
        protocol = self._protocol
        protocol.receive_bytes(data)  # type: ignore[arg-type]  # appended to a bytearray
        out: list[Decoded] = []
        try:
            for frame in protocol.received_frames():
                payload = frame.payload
                item: Any
                if isinstance(payload, str):
                    item = payload.encode("utf-8")
                elif isinstance(payload, tuple):
                    item = payload  # (code or None, reason) from _close_payload
                else:
                    item = payload
                out.append((int(frame.opcode), item, frame.message_finished))
        except ParseFailed as exc:
            out.append((OP_ERROR, exc, True))
        return out


__all__ = [
    "MAX_CLOSE_REASON_BYTES",
    "OP_BINARY_MASKED",
    "OP_ERROR",
    "BoundedDeflate",
    "Decoded",
    "FrameEncoder",
    "PlainDecoder",
    "WsprotoDecoder",
    "mask_payload",
    "truncate_reason",
]
