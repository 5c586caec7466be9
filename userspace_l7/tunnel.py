"""Upgraded connections (WebSocket, h2c, any `Upgrade`): once the backend answers 101, the client's
connection and the upstream connection are spliced. Each side's bytes are written to the other as
they arrive; a side whose peer cannot take more stops reading (asyncio's write-buffer limits), a
half-close is passed on, and when either side goes both are closed, as they are after
``idle_timeout`` seconds without a byte either way (the cluster's connectionPool http.idleTimeout, 1 h by
default as in Istio).

    splice(client_transport, upstream_transport, client_rest, upstream_rest, on_close, idle_timeout)

``*_rest``: bytes each side sent after its HTTP head, already read by the HTTP parser (a WebSocket
frame that came with the handshake). The transports change protocol here (`set_protocol`); whoever
owned them before must not touch them again. No HTTP is parsed after the 101: this is how Envoy
carries upgraded connections too.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

__all__ = ["splice"]


class _Idle:
    """One lazy timer for both sides: traffic only moves ``last``; the timer re-arms itself at
    ``last + timeout`` when it fires early, and closes both sides when it does not."""

    __slots__ = ("loop", "timeout", "last", "handle", "sides")

    def __init__(self, loop: asyncio.AbstractEventLoop, timeout: float, sides: tuple[_Side, _Side]) -> None:
        self.loop, self.timeout, self.sides = loop, timeout, sides
        self.last = loop.time()
        self.handle: asyncio.TimerHandle | None = loop.call_at(self.last + timeout, self.fire)

    def fire(self) -> None:
        due = self.last + self.timeout
        if self.loop.time() < due:
            self.handle = self.loop.call_at(due, self.fire)
            return
        self.handle = None
        for side in self.sides:
            side.transport.close()

    def cancel(self) -> None:
        if self.handle is not None:
            self.handle.cancel()
            self.handle = None


class _Side(asyncio.Protocol):
    """One transport of a spliced pair: what it reads goes to the other one."""

    __slots__ = ("transport", "peer", "eof", "idle", "_on_close")

    def __init__(self, transport: asyncio.Transport, on_close: Callable[[], None]) -> None:
        self.transport = transport
        self.peer: _Side | None = None
        self.eof = False
        self.idle: _Idle | None = None
        self._on_close = on_close

    def data_received(self, data: bytes) -> None:
        self.idle.last = self.idle.loop.time()
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
           on_close: Callable[[], None], idle_timeout: float = 3600.0) -> None:
    """Carry bytes both ways between ``client`` and ``upstream`` until either closes (or neither
    sends anything for ``idle_timeout`` seconds); ``on_close`` runs once, when the first has gone."""
    done = False

    def closed() -> None:
        nonlocal done
        if not done:
            done = True
            idle.cancel()
            on_close()

    a, b = _Side(client, closed), _Side(upstream, closed)
    a.peer, b.peer = b, a
    a.idle = b.idle = idle = _Idle(asyncio.get_running_loop(), idle_timeout, (a, b))
    client.set_protocol(a)
    upstream.set_protocol(b)
    if upstream_rest:
        client.write(upstream_rest)
    if client_rest:
        upstream.write(client_rest)
    client.resume_reading()  # the HTTP side may have paused it while the handshake was under way
    upstream.resume_reading()
