"""WebSocket sessions relayed frame by frame, with graceful close forwarding (issue 5).

Where sessions come from (``client.py`` dispatches): an absolute-form ``GET ws://host/path`` (or
``http://``) with ``Upgrade: websocket``, and a plaintext upgrade inside a CONNECT tunnel
(``upgrade.sniff_tunnel``; how browsers send ws:// through a proxy).

The rooms, policy apart from I/O:

- ``handshake``: validating the client's upgrade, building each hop's handshake, checking the
  origin's 101, permessage-deflate per hop (pure).
- ``close``: the close-code policy and the closing/keepalive state machine (pure, ``now`` is an
  argument).
- ``frames``: the frame encoder and bounded permessage-deflate (pure).
- ``relay``: ``Session`` — two hops in one nursery, pumps with backpressure, graceful close,
  pings, drain (trio).
- ``upgrade``: the handshake on both hops and the tunnel peek (trio).
"""

from __future__ import annotations

from proxyd.websocket.close import Outcome, Side
from proxyd.websocket.relay import Session, SessionSettings, SessionStats

__all__ = ["Outcome", "Session", "SessionSettings", "SessionStats", "Side"]
