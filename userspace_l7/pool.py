"""Upstream HTTP/1.1 keep-alive connections, pooled per backend address.

Invariants (every change to this module keeps them):

1. A connection is in a pool's idle list only if it is open, has no request in flight and its last
   response ended with keep-alive (its reader is between messages).
2. A connection carries one request at a time (no upstream pipelining). Whoever `acquire`d it owns
   it until `release` (reusable) or `discard` (anything else); exactly one of the two, once.
3. Per backend, open + connecting connections never exceed ``max_connections``; callers waiting for
   one never exceed ``max_pending`` (more get `PoolOverflow`, a 503 as in Envoy).
4. An idle connection older than ``idle_timeout``, or one that served ``max_requests_per_connection``
   requests, is closed instead of reused. A connection the peer closed while idle is never handed out.
5. Pools are keyed by (address, mark), so a config reload keeps warm connections to backends that
   stay; `Pools.retain` closes the idle connections of backends that left.
6. A connection opened with SO_MARK m (the client identity it carries, userspace_l7/origdst.py) is
   only ever in the pool of mark m: it never serves another identity's request. Mark 0: unmarked.

Only `UpstreamConnection` touches the transport; response parsing is `http1.ResponseReader`. Its
owner reads the response either by awaiting `next_event` or, on the proxy's fast path, by setting a
sink on ``reader`` (events pushed as they are parsed, no task or future per response) and
``on_broken``, called when the connection closes or breaks while the sink is set.
"""

from __future__ import annotations

import asyncio
import socket
from collections import deque
from collections.abc import Callable, Iterable

from .http1 import NEED_DATA, ConnectionClosed, ProtocolError, ResponseReader
from .snapshot import PoolLimits

__all__ = ["BackendPool", "PoolOverflow", "Pools", "UpstreamConnection", "UpstreamError"]

Address = tuple[str, int]
SO_MARK = getattr(socket, "SO_MARK", 36)


class UpstreamError(Exception):
    """Talking to a backend failed. ``kind``: "connect" (never connected) or "reset" (closed or broke
    HTTP after connecting). ``received``: whether any response byte arrived."""

    def __init__(self, kind: str, message: str, received: bool = False) -> None:
        super().__init__(message)
        self.kind = kind
        self.received = received


class PoolOverflow(Exception):
    """Too many requests waiting for a connection to this backend (connectionPool limits)."""


class UpstreamConnection(asyncio.Protocol):
    __slots__ = ("loop", "transport", "reader", "closed", "received", "requests", "idle_since", "on_broken",
                 "_waiter", "_error")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.reader = ResponseReader()
        self.closed = False
        self.received = False
        self.requests = 0
        self.idle_since = 0.0
        self.on_broken: Callable[[], None] | None = None  # set: called instead of waking `next_event`
        self._waiter: asyncio.Future | None = None
        self._error: ProtocolError | None = None

    # -- asyncio callbacks --

    def connection_made(self, transport: asyncio.Transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.received = True
        if self.reader.upgraded is not None:  # not HTTP any more: kept for whoever splices it (tunnel.py)
            self.reader.upgraded += data
            return
        try:
            self.reader.receive_data(data)
        except ProtocolError as e:
            self._error = e
            self.transport.close()
        if self.on_broken is None:
            if self._waiter is not None:
                self._wake()
        elif self._error is not None:
            self.on_broken()

    def eof_received(self) -> bool:
        return False  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._error is None:
            try:
                self.reader.receive_data(b"")
            except ProtocolError as e:
                self._error = e
        if self.on_broken is None:
            self._wake()
        else:
            self.on_broken()

    def _wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    # -- used by the proxy --

    def send(self, data: bytes, method: str) -> None:
        self.reader.expect(method)
        self.received = False
        self.requests += 1
        self.transport.write(data)

    async def next_event(self):
        """The next response event; UpstreamError when the connection breaks first."""
        reader = self.reader
        while True:
            try:
                ev = reader.next_event()
            except ProtocolError as e:
                raise UpstreamError("reset", f"upstream sent bad HTTP: {e}", self.received) from None
            if ev is ConnectionClosed:  # closed between responses: the one we wait for never comes
                raise UpstreamError("reset", "upstream closed the connection", self.received)
            if ev is not NEED_DATA:
                return ev
            if self._error is not None:
                raise UpstreamError("reset", f"upstream sent bad HTTP: {self._error}", self.received)
            if self.closed:
                raise UpstreamError("reset", "upstream closed the connection", self.received)
            self._waiter = self.loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None

    @property
    def reusable(self) -> bool:
        return not self.closed and self._error is None and self.reader.state in ("IDLE", "DONE")

    def close(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.close()
        self.closed = True


class BackendPool:
    def __init__(self, loop: asyncio.AbstractEventLoop, address: Address, limits: PoolLimits,
                 on_open: Callable[[Address, int], None] | None = None, mark: int = 0) -> None:
        self.loop, self.address, self.limits, self.on_open = loop, address, limits, on_open
        self.mark = mark  # SO_MARK of every connection of this pool (invariant 6)
        # policy_check.PolicyGate generation at which the kernel's policy admitted this (address, mark):
        # while it is current, a request to this pool skips the policy check
        self.admitted = 0
        self.idle: list[UpstreamConnection] = []  # LIFO: the warmest connection first
        self.open = 0  # open + connecting (invariant 3)
        self._waiters: deque[asyncio.Future] = deque()

    def try_acquire(self) -> UpstreamConnection | None:
        """An idle connection at once, or None (then `acquire` may connect or wait for one)."""
        idle = self.idle
        if not idle:
            return None
        now = self.loop.time()
        while idle:
            conn = idle.pop()
            if conn.closed or now - conn.idle_since > self.limits.idle_timeout:
                self._closed(conn)
                continue
            return conn
        return None

    async def acquire(self) -> tuple[UpstreamConnection, bool]:
        """A connection and whether it was reused (a reused one may turn out stale: the caller may
        retry once on a fresh one if nothing was received)."""
        conn = self.try_acquire()
        if conn is not None:
            return conn, True
        if self.open >= self.limits.max_connections:
            if len(self._waiters) >= self.limits.max_pending:
                raise PoolOverflow(f"more than {self.limits.max_pending} requests pending for {self.address}")
            fut = self.loop.create_future()
            self._waiters.append(fut)
            try:
                conn = await fut
            except BaseException:
                if fut.done() and not fut.cancelled():  # handed a connection while being cancelled
                    self.release(fut.result())
                raise
            finally:
                if fut in self._waiters:
                    self._waiters.remove(fut)
            if conn is not None:
                return conn, True
        return await self._connect(), False

    async def _connect(self) -> UpstreamConnection:
        self.open += 1
        try:
            async with asyncio.timeout(self.limits.connect_timeout):
                if self.mark:
                    _, conn = await self.loop.create_connection(lambda: UpstreamConnection(self.loop),
                                                                sock=await self._marked_socket())
                else:
                    _, conn = await self.loop.create_connection(lambda: UpstreamConnection(self.loop),
                                                                *self.address)
        except (OSError, TimeoutError) as e:
            self.open -= 1
            self._hand_over(None)
            raise UpstreamError("connect", f"cannot connect to {self.address[0]}:{self.address[1]}: {e}") from None
        except BaseException:
            self.open -= 1
            self._hand_over(None)
            raise
        if self.on_open is not None:
            self.on_open(self.address, self.mark)
        return conn

    async def _marked_socket(self) -> socket.socket:
        """A socket connected to the backend with SO_MARK set before connect(), so every packet
        (the SYN included) carries the mark."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            sock.setsockopt(socket.SOL_SOCKET, SO_MARK, self.mark)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # as create_connection(host, port) does
            await self.loop.sock_connect(sock, self.address)
        except BaseException:
            sock.close()
            raise
        return sock

    def release(self, conn: UpstreamConnection) -> None:
        limit = self.limits.max_requests_per_connection
        if not conn.reusable or (limit and conn.requests >= limit):
            self.discard(conn)
            return
        conn.idle_since = self.loop.time()
        if not self._waiters or not self._hand_over(conn):
            self.idle.append(conn)

    def discard(self, conn: UpstreamConnection) -> None:
        conn.close()
        self._closed(conn)

    def _closed(self, conn: UpstreamConnection) -> None:
        conn.close()
        self.open -= 1
        self._hand_over(None)  # a slot is free: a waiter may connect

    def _hand_over(self, conn: UpstreamConnection | None) -> bool:
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(conn)
                return True
        return False

    def close_idle(self) -> None:
        while self.idle:
            self._closed(self.idle.pop())


class Pools:
    def __init__(self, loop: asyncio.AbstractEventLoop, on_open: Callable[[Address, int], None] | None = None) -> None:
        self.loop, self.on_open = loop, on_open
        self._pools: dict[tuple[Address, int], BackendPool] = {}

    def get(self, address: Address, limits: PoolLimits, mark: int = 0) -> BackendPool:
        """The pool of connections to ``address`` that carry SO_MARK ``mark`` (0: none)."""
        key = (address, mark)
        p = self._pools.get(key)
        if p is None:
            p = self._pools[key] = BackendPool(self.loop, address, limits, self.on_open, mark)
        elif p.limits is not limits:
            p.limits = limits  # a reload changed the DestinationRule's connectionPool
        return p

    def retain(self, addresses: Iterable[Address]) -> None:
        keep = set(addresses)
        for key in [k for k in self._pools if k[0] not in keep]:
            self._pools[key].close_idle()
            if not self._pools[key].open:
                del self._pools[key]

    def close(self) -> None:
        for p in self._pools.values():
            p.close_idle()
