"""Upgraded connections (WebSocket, h2c, any `Upgrade`): once the backend answers 101, the client's
connection and the upstream connection are spliced. Each side's bytes are written to the other as
they arrive; a side whose peer cannot take more stops reading (asyncio's write-buffer limits), a
half-close is passed on, and when either side goes both are closed.

    splice(client_transport, upstream_transport, client_rest, upstream_rest, on_close)

``*_rest``: bytes each side sent after its HTTP head, already read by the HTTP parser (a WebSocket
frame that came with the handshake). The transports change protocol here (`set_protocol`); whoever
owned them before must not touch them again. No HTTP is parsed after the 101: this is how Envoy
carries upgraded connections too.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

__all__ = ["splice"]


class _Side(asyncio.Protocol):
    """One transport of a spliced pair: what it reads goes to the other one."""

    __slots__ = ("transport", "peer", "eof", "_on_close")

    def __init__(self, transport: asyncio.Transport, on_close: Callable[[], None]) -> None:
        self.transport = transport
        self.peer: _Side | None = None
        self.eof = False
        self._on_close = on_close

    def data_received(self, data: bytes) -> None:
        self.peer.transport.write(data)

    def eof_received(self) -> bool:
        self.eof = True
        if self.peer.eof:  # both directions are done
            self.transport.close()
            self.peer.transport.close()
            return False
        if self.peer.transport.can_write_eof():
            self.peer.transport.write_eof()
        return True  # the other direction goes on

    def connection_lost(self, exc: Exception | None) -> None:
        if exc is None:
            self.peer.transport.close()  # flushes what is buffered for it first
        else:
            self.peer.transport.abort()
        self._on_close()

    # Our transport's write buffer is over its limit: stop reading from the side that fills it.
    def pause_writing(self) -> None:
        self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        self.peer.transport.resume_reading()


def splice(client: asyncio.Transport, upstream: asyncio.Transport, client_rest: bytes, upstream_rest: bytes,
           on_close: Callable[[], None]) -> None:
    """Carry bytes both ways between ``client`` and ``upstream`` until either closes; ``on_close``
    runs once, when the first of them has gone."""
    done = False

    def closed() -> None:
        nonlocal done
        if not done:
            done = True
            on_close()

    a, b = _Side(client, closed), _Side(upstream, closed)
    a.peer, b.peer = b, a
    client.set_protocol(a)
    upstream.set_protocol(b)
    if upstream_rest:
        client.write(upstream_rest)
    if client_rest:
        upstream.write(client_rest)
    client.resume_reading()  # the HTTP side may have paused it while the handshake was under way
    upstream.resume_reading()
