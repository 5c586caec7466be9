"""The L7 processor on asyncio/uvloop: the only module here that does network I/O.

One `Proxy` per worker process holds the config snapshot, the per-cluster balancers, the upstream
pools, the flow sink and the metrics. Each accepted client connection is a `ClientConnection`
protocol: `http1.RequestReader` turns its bytes into requests, `routing.route` decides (through
`routecache`), and `Proxy.serve` carries the decision out, streams the response back and records one
flow and one metric sample.

Two paths carry a request out, with the same outcome:

- the fast path, entirely in protocol callbacks: a local answer (no route, fault abort without a
  delay), or a forward with no timeout, no fault delay and no mirror while the chosen backend's pool
  has an idle connection. `serve` writes the request to that connection and an `Exchange` streams the
  response from the upstream connection's ``data_received`` straight to the client.
- the coroutine path (`Proxy._slow`), one task per request, for everything else: fault delays,
  timeouts, mirrors, connecting or waiting for a pooled connection, and retries. An `Exchange` whose
  request gets no usable response head (the connection breaks, a 1xx, a status the retry policy
  retries) hands the request over to it as it stands: the attempt already on the wire is the first.

An Upgrade request (WebSocket, h2c) takes a third path, `Proxy._tunnel`: routed the same way, sent
with its Upgrade header on a connection of its own, and on the backend's 101 the two connections are
spliced (tunnel.py) and carry bytes both ways until either closes.

Hot-path rules: no logging, no task or future per fast-path request, flows and metrics appended to
in-memory batches (their labels built once per connection, route and backend: `_Records`), request and
response field lines forwarded as parsed unless the route edits headers, one `Exchange` per connection
reused by its requests. `tests/unit/userspace_l7/bench_fastpath.py` measures this path in process. Errors
printed to stderr are reserved for the control path (config reloads, startup) and bugs.

The original destination of a connection comes from an `origdst.OriginalDstResolver` when one is
plugged in (the kernel-side redirect: origdst.KernelOriginalDstResolver) and otherwise from each
request's Host header.
When the resolver names the client's identity, upstream connections for that client carry it as
their SO_MARK (origdst.upstream_mark) and are pooled apart from every other identity's.

Bounds, each in a module of its own and met once per connection or per pool, not per request:

- accepting: `listener.Listener` accepts (no create_server: out of descriptors it backs off and
  closes nothing), `Proxy.accept` resolves the client and asks `admission.Admission` for a slot of
  its endpoint's share; a refused connection gets a 503 (flags.OM) and is closed;
- a request that trickles in: the connection's timers (`ClientConnection`) answer 408 (flags.SI);
- the kernel's policy: before an upstream flow is dialled, `policy_check.PolicyGate` decides it as
  bpf/policy.c would; a denial is a 403 (flags.UAEX), an allow is remembered by the pool
  (BackendPool.admitted) until the policy revision moves.

Every answer records Envoy's response flags (flags.py) in its flow and in the response_flags label
of its istio_* samples.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import resource
import signal
import socket
import sys
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from http import HTTPStatus
from urllib.parse import parse_qsl

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from . import flags, origdst, tunnel
from .admission import ENDPOINT, UNKNOWN, Admission, Limits
from .balancer import ClusterState, ClusterStates
from .flow_export import FlowSink
from .http1 import (
    HOP_BY_HOP,
    ConnectionClosed,
    Data,
    EndOfMessage,
    RemoteProtocolError,
    Request,
    RequestReader,
    Response,
)
from .istio_metrics import REPORTER, L7Metrics, observe
from .listener import Listener, bind
from .origdst import OriginalDst, OriginalDstResolver
from .policy_check import OPEN, Denial, KernelPolicy, OpenGate, PolicyGate
from .pool import BackendPool, PoolOverflow, Pools, UpstreamConnection, UpstreamError
from .routecache import RouteCache
from .routing import RouteDecision, should_retry
from .snapshot import L7Config, Service, SnapshotError, UpstreamHost, load_file

__all__ = ["Options", "Proxy", "serve"]


@dataclass(frozen=True)
class Options:
    # Envoy's request_headers_timeout: a request's head must be in this long after its first byte (408)
    header_timeout: float = 10.0
    # Envoy's request_timeout: the whole request, head and body, must be in this long after its first byte
    # (408). Envoy leaves it off because it cannot stream a request that never ends; this processor buffers
    # every body whole (for retries), the case Envoy's docs ask to set it for. 30 s: a 16 MiB body (the
    # largest it takes) at 0.5 MB/s, far below any node-local link, and three header timeouts.
    request_timeout: float = 30.0
    idle_timeout: float = 60.0  # a keep-alive client connection with no request is closed after this
    max_pipelined: int = 16  # requests queued per client connection before we stop reading
    flush_interval: float = 0.25
    max_mirrors: int = 64  # mirrored requests in flight per worker; more are skipped
    node_name: str = ""
    max_connections_per_endpoint: int = 0  # per worker; 0: admission.Limits.from_nofile's share


_BODY_METHODS = frozenset(("POST", "PUT", "PATCH"))  # always sent with a Content-Length
REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed", 408: "Request Timeout",
           413: "Content Too Large", 431: "Request Header Fields Too Large", 500: "Internal Server Error",
           501: "Not Implemented", 502: "Bad Gateway", 503: "Service Unavailable", 504: "Gateway Timeout"}
NO_BODY_STATUS = frozenset((204, 304))
UPGRADE_TIMEOUT = 30.0  # an Upgrade request's backend must answer within this (unless the route's timeout)
UPGRADE_HOLD_LIMIT = 1 << 20  # bytes a client may send after its Upgrade request before the 101
_NO_TIMEOUT = contextlib.nullcontext()  # reusable; `async with` works on it


def _reason(status: int) -> str:
    reason = REASONS.get(status)
    if reason is None:
        try:
            reason = HTTPStatus(status).phrase
        except ValueError:
            reason = "Unknown"
    return reason


def _local_response(status: int, text: str, keep_alive: bool, extra: list[tuple[str, str]] = (),
                    body: bytes | None = None) -> bytes:
    """A response the processor makes itself: ``body`` (default: ``text`` as a line) as text/plain."""
    if status in NO_BODY_STATUS:
        head = [f"HTTP/1.1 {status} {_reason(status)}\r\n"]
        body = b""
    else:
        if body is None:
            body = (text + "\n").encode()
        head = [f"HTTP/1.1 {status} {_reason(status)}\r\ncontent-type: text/plain\r\n"
                f"content-length: {len(body)}\r\n"]
    head.extend(f"{k}: {v}\r\n" for k, v in extra)
    if not keep_alive:
        head.append("connection: close\r\n")
    head.append("\r\n")
    return "".join(head).encode("latin-1") + body


def hash_key(hash_by: tuple[str, str] | None, conn: ClientConnection, head: Request) -> str | None:
    """The request's key for a CONSISTENT_HASH cluster (DestinationRule consistentHash, ``hash_by``);
    None when the cluster does not hash or the request has no key (then any host, as Envoy)."""
    if hash_by is None:
        return None
    kind, name = hash_by
    if kind == "header":
        for k, v in head.headers:
            if k == name:
                return v
        return None
    if kind == "query":
        query = head.target.partition("?")[2]
        return dict(parse_qsl(query, keep_blank_values=True)).get(name) if query else None
    return conn.peer[0] or None  # source_ip: the client's address (the redirect keeps it)


_UNRESOLVED = object()  # a ClientConnection made by loop.create_server asks the resolver itself


class ClientConnection(asyncio.Protocol):
    """One downstream connection: reads requests, serves them in order, keeps the connection alive.

    Timers (one lazy handle, `_arm`): ``idle`` between requests (idle_timeout); once a request has
    started and is not all in, ``header`` until its head is complete (header_timeout, Envoy's
    request_headers_timeout) and then ``request`` until its last byte (request_timeout, Envoy's
    request_timeout), both counted from the request's first byte; none while it is served. A
    request that misses either is answered 408 (flags.SI) and the connection closed."""

    __slots__ = ("proxy", "transport", "reader", "queue", "busy", "closing", "peer", "local", "dst", "mark",
                 "_cur", "_body", "_timer", "_timer_kind", "_deadline", "_paused", "_serving", "rec", "exchange",
                 "original", "client_id", "gone", "bucket", "made", "_origin", "_request_deadline", "_expired")

    def __init__(self, proxy: Proxy, origin: tuple[OriginalDst | None, int] | object = _UNRESOLVED,
                 bucket: int | None = None) -> None:
        self.proxy = proxy
        self.reader = RequestReader(sink=self)
        self.queue: deque[tuple[Request, bytes]] = deque()
        self.busy = False
        self.closing = False
        self._cur: Request | None = None
        self._body: list[bytes] = []
        self._timer: asyncio.TimerHandle | None = None
        self._timer_kind = ""
        self._deadline = 0.0
        self._request_deadline = 0.0
        self._expired = ""  # a request timer that fired while an earlier response was being written
        self._paused = False
        self._serving = False  # `_serve_queued` is on the stack
        self.rec: _Records | None = None  # the last request's record labels: the next one likely shares them
        self.exchange: Exchange | None = None  # the fast path's, made on first use
        self.original: tuple[str, int] | None = None  # the original destination's (ip, port), when resolved
        self.client_id: int | None = None  # the client's endpoint id, when the datapath named it
        self.dst: OriginalDst | None = None
        self.mark = 0  # SO_MARK of upstream connections: the client's identity, when known
        self._origin = origin  # (OriginalDst or None, upstream mark) from `Proxy.resolve`, or _UNRESOLVED
        self.bucket = bucket  # the admission bucket this connection holds a slot of (admission.py), or None
        self.made = False
        self.gone = False  # the client closed (or half-closed) while one of its requests was served (flags.DC)

    # -- asyncio callbacks --

    def connection_made(self, transport: asyncio.Transport) -> None:
        self.made = True
        self.transport = transport
        self.peer = transport.get_extra_info("peername") or ("", 0)
        self.local = transport.get_extra_info("sockname") or ("", 0)
        origin, self._origin = self._origin, None
        if origin is _UNRESOLVED:
            origin = self.proxy.resolve(transport.get_extra_info("socket"))
        if origin is None:  # never forward a connection without the identity it must carry
            self.closing = True
            transport.abort()
            return
        dst, self.mark = origin
        self.dst = dst
        if dst is not None:
            if dst.ip:
                self.original = (dst.ip, dst.port)
            self.client_id = dst.source_ep_id
        self._arm_idle()

    def data_received(self, data: bytes) -> None:
        if self.closing:
            return
        if self.reader.upgraded is not None:  # not HTTP any more: for the tunnel, if the backend agrees
            self.reader.upgraded += data
            if len(self.reader.upgraded) > UPGRADE_HOLD_LIMIT:
                self.transport.pause_reading()  # tunnel.splice resumes it
            return
        queue = self.queue
        queued = len(queue)
        try:
            self.reader.receive_data(data)
        except RemoteProtocolError as e:
            while len(queue) > queued:  # a chunk with an error is refused whole: nothing in it is served
                queue.pop()
            self._refuse(e)
        # A request that has started and is not all in gets its deadlines. (One that arrived whole needs
        # no timer: re-arming one per request would cost a TimerHandle.)
        if self._cur is not None or self.reader.in_head:
            kind = self._timer_kind
            if kind != "header" and kind != "request" and not self.closing:
                self._begin_request()
        if queue and not self.busy:  # served once the whole chunk is read
            self._serve_queued()

    def eof_received(self) -> bool:
        try:
            self.reader.receive_data(b"")
            closed = self.reader.next_event() is ConnectionClosed
        except RemoteProtocolError:
            closed = True
        if closed:
            self.closing = True
            if not self.busy:
                self.transport.close()
            else:
                self.gone = True  # as Envoy takes an HTTP/1 client's FIN: gone before its answer (flags.DC)
        return True  # keep our side open until queued responses are written

    def connection_lost(self, exc: Exception | None) -> None:
        if self.busy:
            self.gone = True
        self.closing = True
        self._timer_kind = ""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.release()

    def release(self) -> None:
        """Give back this connection's admission slot (once): the connection is gone, or a tunnel that
        owns its transport now has closed."""
        if self.bucket is not None:
            self.proxy.admission.release(self.bucket)
            self.bucket = None

    def write(self, data: bytes) -> None:
        # The client may have gone while we waited upstream; asyncio would log every such write.
        if not self.transport.is_closing():
            self.transport.write(data)

    # -- reading: the request reader's sink --

    def head(self, req: Request) -> None:
        self._cur = req
        if self._timer_kind == "header":  # the head is in: the rest of the request has until request_timeout
            self._timer_kind = "request"
            self._deadline = self._request_deadline
        else:
            self._timer_kind = ""  # it came in one chunk: no header timer was needed
        if req.expect_continue:
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def data(self, data: bytes) -> None:
        self._body.append(data)

    def end(self) -> None:
        parts = self._body
        if parts:
            self._body = []
        queue = self.queue
        queue.append((self._cur, b"".join(parts) if parts else b""))
        self._cur = None
        if self._timer_kind == "request":  # all in: no timer while it is served
            self._timer_kind = ""
        if len(queue) >= self.proxy.options.max_pipelined and not self._paused:
            self._paused = True
            self.transport.pause_reading()

    def _refuse(self, e: RemoteProtocolError) -> None:
        """A malformed or oversized request: answer its status (unless a response is due first) and close."""
        self.closing = True
        self._cancel_timer()
        if not self.busy and not self.queue:
            self.transport.write(_local_response(e.status_hint, str(e), False))
            self.transport.close()
            self.proxy.record_refused(self, e.status_hint, flags.DPE, None, "L7_PROTOCOL_ERROR")

    # -- timers --
    # One lazy timer per connection: re-arming only moves a deadline, so a keep-alive request costs
    # no TimerHandle; when the timer fires early it re-schedules itself at the current deadline.

    def _arm(self, kind: str, deadline: float) -> None:
        self._deadline = deadline
        self._timer_kind = kind
        timer = self._timer
        if timer is None or deadline < timer.when():  # only an earlier deadline needs a new handle
            if timer is not None:
                timer.cancel()
            self._timer = self.proxy.loop.call_at(deadline, self._timer_fired)

    def _arm_idle(self) -> None:
        self._arm("idle", self.proxy.loop.time() + self.proxy.options.idle_timeout)

    def _begin_request(self) -> None:
        """A request is under way and not all in: its deadlines count from now (its first chunk)."""
        opts = self.proxy.options
        now = self.proxy.loop.time()
        self._request_deadline = now + opts.request_timeout
        if self.reader.in_head:
            self._arm("header", min(now + opts.header_timeout, self._request_deadline))
        else:
            self._arm("request", self._request_deadline)

    def _cancel_timer(self) -> None:
        self._timer_kind = ""

    def _timer_fired(self) -> None:
        self._timer = None
        kind = self._timer_kind
        if not kind or self.closing:
            return
        if self.proxy.loop.time() < self._deadline:
            self._timer = self.proxy.loop.call_at(self._deadline, self._timer_fired)
            return
        self._timer_kind = ""
        if kind == "idle":
            if not self.busy:
                self.closing = True
                self.transport.close()
            return
        if self.busy:  # an earlier request's response is on its way: the 408 follows it (`done`)
            self._expired = kind
            self.transport.pause_reading()
            return
        self._timed_out(kind)

    def _timed_out(self, kind: str) -> None:
        """The request under way missed its header or request timeout: 408, and the connection closes."""
        self.closing = True
        self.queue.clear()
        self.transport.write(_local_response(408, "request header read timeout" if kind == "header"
                                             else "request timeout", False))
        self.transport.close()
        self.proxy.record_refused(self, 408, flags.SI, self._cur, "L7_REQUEST_TIMEOUT")

    # -- serving --
    # One request at a time, in order: `busy` from `Proxy.serve` until the path serving it calls `done`.

    def _serve_queued(self) -> None:
        """Serve queued requests while each one completes at once (local answers); the first that waits
        for a backend leaves the connection busy, and its `done` comes back here."""
        if self._serving:  # `done` from inside `Proxy.serve`: the loop below carries on
            return
        self._serving = True
        try:
            while self.queue and not self.busy and not self.transport.is_closing():
                head, body = self.queue.popleft()
                if self._paused and len(self.queue) < self.proxy.options.max_pipelined:
                    self._paused = False
                    self.transport.resume_reading()
                self.busy = True
                self.proxy.serve(self, head, body)
        except Exception as e:
            self.internal_error(e)
            return
        finally:
            self._serving = False
        if not self.busy:
            if self.closing:
                self.transport.close()
            elif self._cur is None and self._timer_kind != "header":
                self._arm_idle()

    def done(self, keep: bool) -> None:
        """The request being served is answered; ``keep``: the connection stays open for more."""
        self.busy = False
        if self._expired:  # the next request ran out of time meanwhile
            kind, self._expired = self._expired, ""
            if not self.closing:
                self._timed_out(kind)
                return
        if not keep:
            self.closing = True
            self.queue.clear()
            self.transport.close()
        elif self._serving:
            pass  # `_serve_queued` carries on
        elif self.queue:
            self._serve_queued()
        elif self.closing:  # what `_serve_queued` does with nothing queued, without its loop
            self.transport.close()
        elif self._cur is None and self._timer_kind != "header":
            self._arm_idle()

    def spliced(self) -> None:
        """The transport belongs to a tunnel now (tunnel.splice): no more HTTP, timers or callbacks."""
        self.closing = True
        self.busy = True
        self._timer_kind = ""
        self.queue.clear()

    def internal_error(self, e: Exception) -> None:
        """A bug: never leave the client hanging, never kill the worker."""
        print(f"l7: internal error serving {self.peer}: {type(e).__name__}: {e}", file=sys.stderr)
        self.busy = False
        self.closing = True
        self.queue.clear()
        self.transport.close()


_STATUS_LINES: dict[tuple[int, str], bytes] = {}  # (status, reason) -> b"HTTP/1.1 ...\r\n"; bounded below


def _status_line(status: int, reason: str) -> bytes:
    line = _STATUS_LINES.get((status, reason))
    if line is None:
        line = f"HTTP/1.1 {status} {reason or REASONS.get(status, '')}\r\n".encode("latin-1")
        if len(_STATUS_LINES) < 256:  # reasons are the upstream's to choose
            _STATUS_LINES[(status, reason)] = line
    return line


def _response_fields(resp: Response, d: RouteDecision) -> bytes:
    """The upstream's field lines the client gets: hop-by-hop ones left out, the route's edits applied
    (without edits, as parsed: `Response.forwarded`)."""
    if d.response_headers:
        edited = d.response_headers.apply([(k, v) for k, v in resp.headers if k not in HOP_BY_HOP])
        return "".join([f"{k}: {v}\r\n" for k, v in edited]).encode("latin-1")
    return resp.fwd or resp.forwarded()


def response_head(resp: Response, d: RouteDecision, head: Request, keep: bool) -> tuple[bytes, bool, bool, bool]:
    """The head of the response the client gets for ``resp``: (head bytes, whether the body is re-framed
    as chunked, whether it has no body, whether the client connection stays open). The head goes out
    with the first body bytes (usually the whole body): one send, not two. Without header edits the
    upstream's field lines go out as parsed (`Response.forwarded`)."""
    fields = _response_fields(resp, d)
    status = resp.status
    no_body = head.method == "HEAD" or status in NO_BODY_STATUS
    chunked = False
    if resp.content_length is not None and status not in NO_BODY_STATUS:
        framing = b"content-length: %d\r\n" % resp.content_length
    elif not no_body:
        if head.http_version == "1.1":
            chunked = True
            framing = b"transfer-encoding: chunked\r\n"
        else:
            framing = b""
            keep = False  # HTTP/1.0 client: the body ends when we close
    else:
        framing = b""
    if not keep:
        framing += b"connection: close\r\n"
    elif head.http_version == "1.0":
        framing += b"connection: keep-alive\r\n"
    line = _STATUS_LINES.get((status, resp.reason)) or _status_line(status, resp.reason)
    return b"".join((line, fields, framing, b"\r\n")), chunked, no_body, keep


def _upgrade_response(resp: Response, d: RouteDecision) -> bytes:
    """The head of a 101 for the client: the backend's fields (with the route's edits) and the
    Upgrade it agreed to; nothing follows it but the new protocol."""
    upgrade = next((v for k, v in resp.headers if k == "upgrade"), "")
    return b"".join((_status_line(101, resp.reason), _response_fields(resp, d),
                     f"connection: upgrade\r\nupgrade: {upgrade}\r\n\r\n".encode("latin-1")))


class Exchange:
    """One fast-path request whose bytes are on an upstream connection. It is the sink of that
    connection's response reader and streams the response to the client as it is parsed. Until a
    response head is accepted, anything unusual hands the request to `Proxy._slow`: the events not
    yet seen stay in the reader for it."""

    __slots__ = ("proxy", "conn", "req", "body", "d", "dst_ip", "dst_port", "t0", "state", "backend", "pool", "up",
                 "status", "pending", "chunked", "no_body", "keep", "flags", "_broken")

    def __init__(self, proxy: Proxy, conn: ClientConnection) -> None:
        # One per client connection, reused by its requests (one at a time): `start` begins each.
        self.proxy, self.conn = proxy, conn
        self.up: UpstreamConnection | None = None  # None once given back (released, discarded, handed over)
        self._broken = self.broken  # bound once, not per request

    def start(self, req: Request, body: bytes, d: RouteDecision, dst_ip: str, dst_port: int, t0: int,
              state: ClusterState, backend: UpstreamHost, pool: BackendPool, up: UpstreamConnection) -> None:
        """Read the response to ``req``, which is on its way to ``up``."""
        self.req, self.body, self.d = req, body, d
        self.dst_ip, self.dst_port, self.t0 = dst_ip, dst_port, t0
        self.state, self.backend, self.pool = state, backend, pool
        self.up = up
        self.status = 0  # non-zero once the response head is accepted
        self.pending = b""  # bytes held back to go out with the next ones
        self.chunked = self.no_body = self.keep = False
        self.flags = flags.NONE
        up.reader.sink = self
        up.on_broken = self._broken

    # -- the response reader's sink --

    def head(self, resp: Response) -> None:
        try:
            status = resp.status
            retries = self.d.retries
            if status < 200 or (retries.attempts and should_retry(retries, status)):
                self._hand_over(resp)
                return
            self.state.finished(self.backend, status)
            keep = self.req.keep_alive and not self.conn.closing
            self.pending, self.chunked, self.no_body, self.keep = response_head(resp, self.d, self.req, keep)
            self.status = status
        except Exception as e:
            self._bug(e)

    def data(self, data: bytes) -> None:
        if self.no_body:
            return
        if self.chunked:
            data = b"%x\r\n%b\r\n" % (len(data), data)
        if self.pending:
            data, self.pending = self.pending + data, b""
        self.conn.write(data)

    def end(self) -> None:
        try:
            up, self.up = self.up, None  # `_give_up`, inlined: once per request
            up.reader.sink = None
            up.on_broken = None
            pending = self.pending
            if self.chunked:
                pending += b"0\r\n\r\n"
            if pending:
                self.conn.write(pending)
            self.pool.release(up)
            self._done(self.keep)  # may start the connection's next request on this object: nothing after it
        except Exception as e:
            self._bug(e)

    def broken(self) -> None:
        """The connection closed or broke: the events before that have been pushed already."""
        try:
            if self.up is None:
                return
            if not self.status:
                self._hand_over(None)  # the coroutine path reads the failure and may retry
                return
            self.pool.discard(self._give_up())  # the response is cut: the client must see the connection close
            if self.pending:
                self.conn.write(self.pending)
            self.flags = flags.UC
            self._done(False)
        except Exception as e:
            self._bug(e)

    # -- helpers --

    def _give_up(self) -> UpstreamConnection:
        """Stop reading the connection (before release: a waiter may get it at once)."""
        up, self.up = self.up, None
        up.reader.sink = None
        up.on_broken = None
        return up

    def _done(self, keep: bool) -> None:
        self.proxy._record(self.conn, self.req, self.d, self.status, self.backend, self.dst_ip, self.dst_port,
                           time.perf_counter_ns() - self.t0, self.flags)
        self.conn.done(keep)

    def _hand_over(self, resp: Response | None) -> None:
        up = self._give_up()
        p = self.proxy
        p.loop.create_task(p._slow(self.conn, self.req, self.body, self.d, self.dst_ip, self.dst_port, self.t0,
                                   (self.backend, (up, True, resp))))

    def _bug(self, e: Exception) -> None:
        if self.up is not None:
            self.pool.discard(self._give_up())
        self.conn.internal_error(e)


def client_labels(config: L7Config, dst: OriginalDst | None) -> tuple[str, str, str]:
    """A client's workload, namespace and app for metrics: from the agent's config (agent/l7_snapshot.py)
    when the datapath named the client's endpoint, else what the resolver said."""
    client = config.clients.get(dst.source_ep_id) if dst is not None and dst.source_ep_id else None
    if client is not None:
        return client.workload, client.namespace, client.labels.get("app", "unknown")
    return (dst.source_workload if dst is not None else "unknown"), "unknown", "unknown"


def source_labels(conn: ClientConnection) -> tuple[str, str, str]:
    return client_labels(conn.proxy.config, conn.dst)


def destination_labels(svc: Service | None, backend: UpstreamHost | None) -> tuple[str, ...]:
    """istio_metrics.DESTINATION_LABELS of a request to ``backend`` of ``svc`` (None: answered here)."""
    labels = backend.labels if backend is not None else {}
    return (backend.workload if backend is not None else "unknown",
            svc.namespace if backend is not None and svc is not None else "unknown",
            labels.get("app", "unknown"), labels.get("version", "unknown"),
            svc.fqdn if svc is not None else "unknown", svc.name if svc is not None else "unknown",
            svc.namespace if svc is not None else "unknown")


def _drop_extra(reason: str, denial: Denial | None = None) -> str:
    """The extra top-level members of a DROPPED flow (flow_export.py): why, and for a policy denial who
    decided, as the kernel's drop flows say it."""
    if denial is None:
        return f'"drop_reason_desc":"{reason}"' if reason else ""
    return (f'"drop_reason_desc":"{denial.reason}","traffic_direction":"{denial.direction_name}",'
            f'"policy_match_type":"{denial.match}","policy":{{"rule_id":{int(denial.rule_id)}}}')


class _Records:
    """What the flows and metric samples of one connection's requests to one route, backend and original
    destination share, built once: per request only the counters, a timestamp and a queued tuple remain."""

    __slots__ = ("d", "backend", "dst_ip", "dst_port", "flow", "labels", "rows")

    def __init__(self, conn: ClientConnection, d: RouteDecision, backend: UpstreamHost | None, dst_ip: str,
                 dst_port: int, denial: Denial | None = None) -> None:
        self.d, self.backend, self.dst_ip, self.dst_port = d, backend, dst_ip, dst_port
        svc = d.service
        service, namespace = (svc.fqdn, svc.namespace) if svc is not None else ("", "")
        src_workload, src_ns, src_app = source_labels(conn)
        if backend is not None:
            dst_workload, upstream = backend.workload, f"{backend.ip}:{backend.port}"
            # As Hubble shows a request through Cilium's proxy: to the backend that answered (its
            # service is in destination.service), so IP.destination and destination.* name one endpoint.
            # A request the policy denies names the backend it was for.
            flow_ip, flow_port = backend.ip, backend.port
        else:
            dst_workload, upstream = "unknown", ""
            flow_ip, flow_port = dst_ip, dst_port  # answered here: where the client sent it
        peer = conn.peer
        self.flow = (peer[0], peer[1], flow_ip, flow_port, d.route_name, d.subset, service, namespace, upstream,
                     dst_workload, src_workload, "FORWARDED" if denial is None else "DROPPED",
                     _drop_extra("", denial))  # flow_export.FlowShared
        # istio_metrics.REQUEST_LABELS, but for response code, flags and security policy
        self.labels = (REPORTER, src_workload, src_ns, src_app, *destination_labels(svc, backend), "http")
        self.rows: dict[int | tuple[int, str], list] = {}  # status, or (status, flags) -> L7Metrics.row


_FORBIDDEN = (_local_response(403, "", True, body=b"RBAC: access denied"),  # Envoy's RBAC answer, as is
              _local_response(403, "", False, body=b"RBAC: access denied"))
_OVERLOADED = _local_response(503, "overloaded: this client endpoint holds its share of the L7 processor's "
                              "connections", False)
REFUSAL_FLOWS_PER_S = 10  # connections refused over a cap, per client endpoint and second, reported as flows


class Proxy:
    def __init__(self, config: L7Config, *, config_path: str | None = None, flows: FlowSink | None = None,
                 metrics: L7Metrics | None = None, resolver: OriginalDstResolver | None = None,
                 options: Options = Options(), rng: random.Random | None = None,
                 policy: KernelPolicy | None = None) -> None:
        self.loop = asyncio.get_running_loop()
        self.config = config
        self.config_path = config_path
        self._config_mtime = os.stat(config_path).st_mtime_ns if config_path else 0
        self.flows = flows or FlowSink(None)
        self.metrics = metrics or L7Metrics()
        self.resolver = resolver
        self.options = options
        self.rng = rng or random.Random()
        self.clusters = ClusterStates(self.rng, self.loop.time)
        self.pools = Pools(self.loop, self._upstream_opened)
        self.routes = RouteCache(self.rng)
        # The kernel's policy, asked before an upstream flow is dialled (policy_check.py); OPEN: no kernel.
        self.gate: PolicyGate | OpenGate = PolicyGate(policy, config.endpoint_at) if policy is not None else OPEN
        self.admission = Admission(Limits.from_nofile(resource.getrlimit(resource.RLIMIT_NOFILE)[0],
                                                      options.max_connections_per_endpoint))
        self.listener: Listener | None = None  # set by `serve`, for its counters
        self._refusal_flows: dict[int, list[int]] = {}  # client -> [second, flows]: refusals reported as flows
        self._mirrors = 0
        # (backend address, client mark) -> istio_metrics.TCP_LABELS
        self._opened_labels: dict[tuple[tuple[str, int], int], tuple[str, ...]] = {}
        self.metrics.processor = self._processor_metrics
        self._tick_handle = self.loop.call_later(options.flush_interval, self._tick)

    # -- control path --

    def reload(self, force: bool = False) -> bool:
        """Re-read the config file if it changed; on an error keep serving the old snapshot."""
        if not self.config_path:
            return False
        try:
            mtime = os.stat(self.config_path).st_mtime_ns
        except OSError:
            return False
        if mtime == self._config_mtime and not force:
            return False
        self._config_mtime = mtime
        try:
            new = load_file(self.config_path)
        except SnapshotError as e:
            print(f"l7: keeping the previous config: {e}", file=sys.stderr)
            return False
        self.config = new  # requests in flight finish on the snapshot they started with
        self.gate.invalidate(new.endpoint_at)  # which backends are this node's endpoints may have changed
        self.pools.retain(b.address for c in new.clusters.values() for b in c.backends)
        return True

    def _tick(self) -> None:
        self.flows.flush()
        self.gate.refresh()  # one map read: the kernel's policy revision
        self._tick_handle = self.loop.call_later(self.options.flush_interval, self._tick)

    def close(self) -> None:
        self._tick_handle.cancel()
        self.flows.close()
        self.pools.close()

    def _label_backend(self, d: RouteDecision, backend: UpstreamHost, conn: ClientConnection) -> None:
        """Note (once) the istio_tcp_connections_opened_total labels of connections to ``backend`` for
        ``conn``'s client (pools, and so connections, are per client mark: pool.py invariant 6)."""
        key = (backend.address, conn.mark)
        if key not in self._opened_labels:
            self._opened_labels[key] = (REPORTER, source_labels(conn)[0], *destination_labels(d.service, backend),
                                        "none")

    def _upstream_opened(self, address: tuple[str, int], mark: int) -> None:
        labels = self._opened_labels.get((address, mark))
        if labels is not None:
            self.metrics.connection_opened(labels)

    # -- accepting --

    def resolve(self, sock: socket.socket | None) -> tuple[OriginalDst | None, int] | None:
        """Where a connection was going and who sent it (the resolver), with the SO_MARK its upstream
        connections carry; None: refuse it (the datapath did not redirect it, or it names an identity no
        mark can carry: never forward a connection without the identity it must carry)."""
        resolver = self.resolver
        if resolver is None:
            return _ANONYMOUS
        dst = resolver.resolve(sock)
        if dst is None:
            return None if getattr(resolver, "required", False) else _ANONYMOUS
        try:
            return dst, (origdst.upstream_mark(dst.source_identity, dst.source_ep_id) if dst.source_identity else 0)
        except ValueError:
            return None

    def accept(self, sock: socket.socket) -> None:
        """A connection the listener accepted: who sent it, whether its endpoint has room (admission.py),
        then a ClientConnection for it."""
        origin = self.resolve(sock)
        if origin is None:
            sock.close()
            return
        dst = origin[0]
        client = (dst.source_ep_id or UNKNOWN) if dst is not None else UNKNOWN
        why = self.admission.admit(client)
        if why is not None:
            self._refuse_connection(sock, dst, client, why)
            return
        self.loop.create_task(self._attach(sock, origin, client))

    async def _attach(self, sock: socket.socket, origin: tuple[OriginalDst | None, int], client: int) -> None:
        made: list[ClientConnection] = []

        def protocol() -> ClientConnection:
            made.append(ClientConnection(self, origin, client))
            return made[0]

        try:
            await self.loop.connect_accepted_socket(protocol, sock)
        except Exception:  # the client went already (or the loop is closing): no protocol holds the slot
            if not made or not made[0].made:
                self.admission.release(client)
            sock.close()

    def _refuse_connection(self, sock: socket.socket, dst: OriginalDst | None, client: int, why: str) -> None:
        """A connection over its endpoint's share (or the worker's): a short 503 (flags.OM), closed at once,
        counted (Admission.refused) and, a few per second and endpoint, reported as a DROPPED flow."""
        peer = None
        try:
            sock.setblocking(False)
            sock.send(_OVERLOADED)
            peer = sock.getpeername()
        except OSError:
            pass
        local = _sockname(sock)
        sock.close()
        second = int(self.loop.time())
        seen = self._refusal_flows.get(client)
        if seen is None or seen[0] != second:
            if len(self._refusal_flows) > 4096:
                self._refusal_flows.clear()
            seen = self._refusal_flows[client] = [second, 0]
        if seen[1] >= REFUSAL_FLOWS_PER_S or peer is None:
            return
        seen[1] += 1
        limits = self.admission.limits
        cap = limits.per_endpoint if why == ENDPOINT else limits.per_worker
        dst_ip, dst_port = (dst.ip, dst.port) if dst is not None and dst.ip else local
        self.flows.add((time.time_ns(), 0, "", "", 503, flags.OM, peer[0], peer[1], dst_ip, dst_port, "", "", "", "",
                        "", "unknown", client_labels(self.config, dst)[0], "DROPPED",
                        _drop_extra("L7_CONNECTION_LIMIT") + f',"Summary":"connection refused: {why} {cap} '
                        f'(per worker)"'))

    def _processor_metrics(self) -> Iterator:
        """meshagent_l7_* families of this worker, for istio_metrics' collector."""
        refused = CounterMetricFamily("meshagent_l7_connections_refused",
                                      "Client connections the L7 processor refused over a connection limit",
                                      labels=["source_workload", "source_workload_namespace", "reason"])
        for (client, why), n in list(self.admission.refused.items()):
            workload, namespace = _client_names(self.config, client)
            refused.add_metric([workload, namespace, why], n)
        yield refused
        limit = GaugeMetricFamily("meshagent_l7_connection_limit",
                                  "Client connections one worker of the L7 processor admits", labels=["scope"])
        limit.add_metric(["endpoint"], self.admission.limits.per_endpoint)
        limit.add_metric(["worker"], self.admission.limits.per_worker)
        yield limit
        held = GaugeMetricFamily("meshagent_l7_client_connections", "Client connections this worker holds")
        held.add_metric([], self.admission.total)
        yield held
        errors = CounterMetricFamily("meshagent_l7_accept_errors", "accept() failures of the L7 processor's "
                                     "listener (it pauses accepting after EMFILE and the like)", labels=["errno"])
        for name, n in list((self.listener.errors if self.listener is not None else {}).items()):
            errors.add_metric([name], n)
        yield errors

    # -- the policy check --

    def _check(self, conn: ClientConnection, backend: UpstreamHost, pool: BackendPool) -> Denial | None:
        """The kernel's verdict on ``conn``'s client connecting to ``backend`` (policy_check.py); an
        allow is remembered by the pool until the gate's generation moves."""
        gate = self.gate
        dst = conn.dst
        denial = gate.check(conn.client_id, dst.source_identity if dst is not None else None, backend.ip,
                            backend.port)
        if denial is None:
            pool.admitted = gate.generation
        return denial

    # -- the request path --

    def serve(self, conn: ClientConnection, head: Request, body: bytes) -> None:
        """Serve one request of ``conn`` (which is busy until this path calls ``conn.done``): on the fast
        path when the request allows it, else in a `_slow` task."""
        t0 = time.perf_counter_ns()
        d, dst_ip, dst_port = self.routes.lookup(self.config, head, conn.original, conn.local[1], conn.client_id)
        if head.upgrade:
            self.loop.create_task(self._tunnel(conn, head, body, d, dst_ip, dst_port, t0))
            return
        if d.delay or d.mirror is not None:
            self.loop.create_task(self._slow(conn, head, body, d, dst_ip, dst_port, t0))
            return
        if d.status:
            keep = head.keep_alive and not conn.closing
            conn.write(_local_response(d.status, d.reason, keep, d.local_headers, d.local_body))
            self._record(conn, head, d, d.status, None, dst_ip, dst_port, time.perf_counter_ns() - t0, d.flags)
            conn.done(keep)
            return
        if d.timeout or d.retries.per_try_timeout:
            self.loop.create_task(self._slow(conn, head, body, d, dst_ip, dst_port, t0))
            return
        state = self.clusters.get(d.cluster)
        backend = state.pick(key=hash_key(state.hash_by, conn, head))
        up = pool = None
        if backend is not None:
            self._label_backend(d, backend, conn)
            pool = self.pools.get(backend.address, d.cluster.policy.pool, conn.mark)
            if pool.admitted != self.gate.generation:
                denial = self._check(conn, backend, pool)
                if denial is not None:
                    keep = head.keep_alive and not conn.closing
                    conn.write(_FORBIDDEN[not keep])
                    self._record(conn, head, d, 403, backend, dst_ip, dst_port, time.perf_counter_ns() - t0,
                                 flags.UAEX, denial)
                    conn.done(keep)
                    return
            up = pool.try_acquire()
        if up is None:  # no healthy backend (a 503 there), or a connection to open or wait for
            self.loop.create_task(self._slow(conn, head, body, d, dst_ip, dst_port, t0, (backend, None)))
            return
        state.started(backend)
        ex = conn.exchange
        if ex is None:
            ex = conn.exchange = Exchange(self, conn)
        ex.start(head, body, d, dst_ip, dst_port, t0, state, backend, pool, up)
        up.send(self._request_bytes(head, body, d), head.method)

    async def _slow(self, conn: ClientConnection, head: Request, body: bytes, d: RouteDecision, dst_ip: str,
                    dst_port: int, t0: int, first: tuple | None = None) -> None:
        """Serve one request with coroutines: fault delay, timeouts, retries, mirror, waiting for a
        connection. ``first``: what the fast path did already, (backend picked for the first attempt,
        None or (its connection, reused, response head read or None) when the request was sent)."""
        try:
            keep = head.keep_alive and not conn.closing
            if d.delay:
                await asyncio.sleep(d.delay)
            backend, denial = None, None
            if d.status:
                status, why = d.status, d.flags
                conn.write(_local_response(status, d.reason, keep, d.local_headers, d.local_body))
            else:
                if d.mirror is not None and self._mirrors < self.options.max_mirrors:
                    self._mirror(d, head, body, conn)
                status, backend, keep, why, denial = await self._forward(conn, head, body, d, keep, first)
                if d.delay:
                    why = flags.join(d.flags, why)
            self._record(conn, head, d, status, backend, dst_ip, dst_port, time.perf_counter_ns() - t0, why, denial)
        except Exception as e:
            conn.internal_error(e)
            return
        conn.done(keep)

    def _request_bytes(self, head: Request, body: bytes, d: RouteDecision, authority: str | None = None,
                       extra: bytes = b"") -> bytes:
        authority = authority or d.authority
        if d.request_headers or authority:
            headers = [(k, v) for k, v in head.headers if k not in HOP_BY_HOP]
            if d.request_headers:
                headers = d.request_headers.apply(headers)
            if authority:
                headers = [(k, v) for k, v in headers if k != "host"]
                headers.append(("host", authority))
            fields = "".join([f"{k}: {v}\r\n" for k, v in headers]).encode("latin-1")
        else:
            fields = head.fwd or head.forwarded()  # the client's field lines as parsed: nothing to re-encode
        method = head.method
        framing = b"content-length: %d\r\n\r\n" % len(body) if body or method in _BODY_METHODS else b"\r\n"
        return b"".join((f"{method} {d.path} HTTP/1.1\r\n".encode("latin-1"), fields, extra, framing, body))

    async def _forward(self, conn: ClientConnection, head: Request, body: bytes, d: RouteDecision, keep: bool,
                       first: tuple | None = None) -> tuple[int, UpstreamHost | None, bool, str, Denial | None]:
        """Try the cluster's backends under the retry policy; stream the response that ends it.
        Returns (status, backend that answered (or the one the policy denied) or None, keep the client
        connection, response flags, the policy's denial or None). ``first``: as for `_slow`."""
        loop = self.loop
        state = self.clusters.get(d.cluster)
        key = hash_key(state.hash_by, conn, head)
        limits = d.cluster.policy.pool
        retries = d.retries
        deadline = loop.time() + d.timeout if d.timeout else None
        data = self._request_bytes(head, body, d)
        tried: list[UpstreamHost] = []
        status, reason, why = 503, "no healthy upstream", flags.UH
        failure = ""
        for attempt in range(retries.attempts + 1):
            sent = None
            if first is not None:
                backend, sent = first
                first = None
            else:
                backend = state.pick(tried, key)
            if backend is None:
                status, reason, why = 503, "no healthy upstream", flags.UH
                break
            tried.append(backend)
            self._label_backend(d, backend, conn)
            attempt_deadline = deadline
            if retries.per_try_timeout:
                per_try = loop.time() + retries.per_try_timeout
                attempt_deadline = per_try if deadline is None else min(per_try, deadline)
            pool = self.pools.get(backend.address, limits, conn.mark)
            if sent is None and pool.admitted != self.gate.generation:
                denial = self._check(conn, backend, pool)
                if denial is not None:
                    conn.write(_FORBIDDEN[not keep])
                    return 403, backend, keep, flags.UAEX, denial
            if sent is None:
                state.started(backend)
            try:
                async with asyncio.timeout_at(attempt_deadline) if attempt_deadline else _NO_TIMEOUT:
                    up, resp = await self._exchange(pool, data, head.method, sent)
            except TimeoutError:  # _exchange has discarded the connection
                state.finished(backend, failed=True)
                status, reason, why, failure = 504, "upstream request timeout", flags.UT, "timeout"
                if deadline is not None and loop.time() >= deadline:
                    break  # the route's timeout: no retry after it
            except UpstreamError as e:
                state.finished(backend, failed=True)
                status, reason, failure = 503, f"upstream connect error or disconnect/reset before headers: {e}", \
                    e.kind
                why = flags.UF if e.kind == "connect" else flags.UC
                if e.kind == "connect":  # a policy change the timer has not seen yet drops SYNs silently
                    self.gate.refresh()
                    denial = self._check(conn, backend, pool) if pool.admitted != self.gate.generation else None
                    if denial is not None:
                        conn.write(_FORBIDDEN[not keep])
                        return 403, backend, keep, flags.UAEX, denial
            except PoolOverflow as e:
                state.finished(backend, None)  # not the backend's fault: outlier detection ignores it
                status, reason, why = 503, f"upstream overflow: {e}", flags.UO
                break
            else:
                state.finished(backend, resp.status)
                retriable = should_retry(retries, resp.status)
                if attempt < retries.attempts and retriable:
                    pool.discard(up)  # cheaper than draining a body we will not use
                    status, reason = resp.status, ""
                    continue
                keep, cut = await self._respond(conn, pool, up, resp, d, head, keep, deadline)
                exhausted = flags.URX if retriable and retries.attempts else flags.NONE  # retriable, none left
                return resp.status, backend, keep, flags.join(exhausted, cut), None
            if attempt >= retries.attempts or not should_retry(retries, failure=failure):
                if attempt >= retries.attempts and retries.attempts and should_retry(retries, failure=failure):
                    why = flags.join(why, flags.URX)  # the retries ran out, not the retry policy
                break
        conn.write(_local_response(status, reason or "upstream error", keep))
        return status, None, keep, why, None

    async def _exchange(self, pool, data: bytes, method: str,
                        sent: tuple | None = None) -> tuple[UpstreamConnection, Response]:
        """Send one request and read the response head; a stale reused connection is retried once on
        a fresh one (the peer closed it while idle, before reading anything we sent). ``sent``: (the
        connection, reused, the response head if read) when the fast path has sent the request."""
        for _ in range(2):
            resp = None
            if sent is not None:
                up, reused, resp = sent
                sent = None
            else:
                up, reused = await pool.acquire()
                up.send(data, method)
            try:
                if resp is None:
                    resp = await up.next_event()
                while isinstance(resp, Response) and 100 <= resp.status < 200:  # interim 1xx: not forwarded
                    if await up.next_event() is not EndOfMessage:
                        raise UpstreamError("reset", "bad interim response", True)
                    resp = await up.next_event()
            except UpstreamError as e:
                pool.discard(up)
                if reused and not e.received:
                    continue
                raise
            except BaseException:  # timeout or cancellation: the connection has a response in flight
                pool.discard(up)
                raise
            return up, resp
        raise UpstreamError("reset", "upstream closed the connection", False)

    async def _respond(self, conn: ClientConnection, pool, up: UpstreamConnection, resp: Response,
                       d: RouteDecision, head: Request, keep: bool, deadline: float | None) -> tuple[bool, str]:
        """Write the upstream response to the client, streaming the body; returns (keep-alive, flags: UC
        if the backend broke mid-body, UT if the route's timeout struck then, else none)."""
        pending, chunked, no_body, keep = response_head(resp, d, head, keep)
        write = conn.write
        try:
            async with asyncio.timeout_at(deadline) if deadline else _NO_TIMEOUT:
                while True:
                    ev = await up.next_event()
                    if ev is EndOfMessage:
                        break
                    if isinstance(ev, Data) and not no_body:
                        data = b"%x\r\n%b\r\n" % (len(ev.data), ev.data) if chunked else ev.data
                        if pending:
                            data, pending = pending + data, b""
                        write(data)
        except (UpstreamError, TimeoutError) as e:
            pool.discard(up)
            if pending:
                write(pending)
            return False, flags.UT if isinstance(e, TimeoutError) else flags.UC  # cut: the client sees the close
        if chunked:
            pending += b"0\r\n\r\n"
        if pending:
            write(pending)
        pool.release(up)
        return keep, flags.NONE

    async def _tunnel(self, conn: ClientConnection, head: Request, body: bytes, d: RouteDecision, dst_ip: str,
                      dst_port: int, t0: int) -> None:
        """An Upgrade request (WebSocket, h2c): routed as any request, sent upstream with its Upgrade
        header on a connection of its own; a 101 splices the two connections (tunnel.py), any other
        answer is forwarded and the client connection closes (its bytes after the request are not
        HTTP). Retries, mirrors and pooling do not apply to it."""
        status, backend, up, pool, state, why, denial = 503, None, None, None, None, d.flags, None
        try:
            if d.delay:
                await asyncio.sleep(d.delay)
            if d.status:
                status = d.status
                conn.write(_local_response(status, d.reason, False, d.local_headers, d.local_body))
            else:
                state = self.clusters.get(d.cluster)
                backend = state.pick(key=hash_key(state.hash_by, conn, head))
                if backend is not None:
                    self._label_backend(d, backend, conn)
                    pool = self.pools.get(backend.address, d.cluster.policy.pool, conn.mark)
                    if pool.admitted != self.gate.generation:
                        denial = self._check(conn, backend, pool)
                if backend is None:
                    why = flags.join(why, flags.UH)
                    conn.write(_local_response(503, "no healthy upstream", False))
                elif denial is not None:
                    status, why = 403, flags.join(why, flags.UAEX)
                    conn.write(_FORBIDDEN[1])
                else:
                    state.started(backend)
                    upgrade = next((v for k, v in head.headers if k == "upgrade"), "")
                    extra = f"connection: upgrade\r\nupgrade: {upgrade}\r\n".encode("latin-1")
                    try:
                        async with asyncio.timeout(d.timeout or UPGRADE_TIMEOUT):
                            up, _ = await pool.acquire()
                            up.send(self._request_bytes(head, body, d, extra=extra), head.method)
                            resp = await up.next_event()
                    except TimeoutError:
                        state.finished(backend, failed=True)
                        status, why = 504, flags.join(why, flags.UT)
                        conn.write(_local_response(504, "upstream request timeout", False))
                    except PoolOverflow as e:
                        state.finished(backend, None)  # not the backend's fault
                        why = flags.join(why, flags.UO)
                        conn.write(_local_response(503, f"upstream overflow: {e}", False))
                    except UpstreamError as e:
                        state.finished(backend, failed=True)
                        why = flags.join(why, flags.UF if e.kind == "connect" else flags.UC)
                        conn.write(_local_response(503, f"upstream connect error or disconnect/reset before "
                                                        f"headers: {e}", False))
                    else:
                        state.finished(backend, resp.status)
                        status = resp.status
                        if status == 101:
                            conn.write(_upgrade_response(resp, d))
                            client_rest, conn.reader.upgraded = conn.reader.upgraded or b"", b""
                            upstream_rest, up.reader.upgraded = up.reader.upgraded or b"", b""
                            spliced_up, spliced_pool, up = up, pool, None  # the tunnel owns it now

                            def closed(conn=conn, pool=spliced_pool, up=spliced_up) -> None:
                                pool.discard(up)
                                conn.release()  # its admission slot: the tunnel had its transport

                            tunnel.splice(conn.transport, spliced_up.transport, client_rest, upstream_rest, closed,
                                          d.cluster.policy.pool.idle_timeout)
                            conn.spliced()
                        else:  # refused (400, 426...): an ordinary response, and the connection closes
                            _, cut = await self._respond(conn, pool, up, resp, d, head, False, None)
                            why = flags.join(why, cut)
                            up = None
            self._record(conn, head, d, status, backend, dst_ip, dst_port, time.perf_counter_ns() - t0, why, denial)
        except Exception as e:
            conn.internal_error(e)
            return
        finally:
            if up is not None:
                pool.discard(up)
        if status != 101:
            conn.done(False)

    def _mirror(self, d: RouteDecision, head: Request, body: bytes, conn: ClientConnection) -> None:
        cluster = d.mirror
        state = self.clusters.get(cluster)
        backend = state.pick()
        if backend is None:
            return
        pool = self.pools.get(backend.address, cluster.policy.pool, conn.mark)
        if pool.admitted != self.gate.generation and self._check(conn, backend, pool) is not None:
            return  # the client may not reach the mirror: a shadow copy is not worth a 403 or a silent drop
        host = d.authority or head.host or cluster.service.fqdn
        name, _, port = host.partition(":")
        data = self._request_bytes(head, body, d, f"{name}-shadow" + (f":{port}" if port else ""))
        self._mirrors += 1
        self.loop.create_task(self._send_mirror(pool, data, head.method))

    async def _send_mirror(self, pool, data: bytes, method: str) -> None:
        """Fire and forget: the mirror's response is read and dropped; failures are ignored."""
        up = None
        try:
            async with asyncio.timeout(30):
                up, _ = await self._exchange(pool, data, method)
                while await up.next_event() is not EndOfMessage:
                    pass
            pool.release(up)
        except (UpstreamError, PoolOverflow, TimeoutError, OSError):
            if up is not None:
                pool.discard(up)
        finally:
            self._mirrors -= 1

    # -- records --

    def _record(self, conn: ClientConnection, head: Request, d: RouteDecision, status: int,
                backend: UpstreamHost | None, dst_ip: str, dst_port: int, latency_ns: int, why: str = flags.NONE,
                denial: Denial | None = None) -> None:
        """One flow and one metric sample for a request answered with ``status`` and response flags ``why``."""
        if conn.gone:
            why = flags.join(why, flags.DC)
        if denial is not None:  # DROPPED, naming the rule: not the connection's usual records
            rec = _Records(conn, d, backend, dst_ip, dst_port, denial)
        else:
            rec = conn.rec
            if rec is None or rec.d is not d or rec.backend is not backend or rec.dst_port != dst_port \
                    or rec.dst_ip != dst_ip:
                rec = conn.rec = _Records(conn, d, backend, dst_ip, dst_port)
        self.flows.pending.append((time.time_ns(), latency_ns, head.method, head.target, status, why, rec.flow))
        key = status if why is _NO_FLAGS else (status, why)
        row = rec.rows.get(key)
        if row is None:
            row = rec.rows[key] = self.metrics.row(rec.labels + (str(status), why, "none"))
        observe(row, latency_ns / 1e6)

    def record_refused(self, conn: ClientConnection, status: int, why: str, head: Request | None = None,
                       reason: str = "") -> None:
        """A request the processor refused before routing it (malformed: DPE; too slow: SI): a DROPPED
        flow to where the client sent it, and a metric sample with no destination."""
        dst_ip, dst_port = conn.original or conn.local
        src_workload, src_ns, src_app = source_labels(conn)
        self.flows.add((time.time_ns(), 0, head.method if head else "", head.target if head else "", status, why,
                        conn.peer[0], conn.peer[1], dst_ip, dst_port, "", "", "", "", "", "unknown", src_workload,
                        "DROPPED", _drop_extra(reason)))
        observe(self.metrics.row((REPORTER, src_workload, src_ns, src_app, *destination_labels(None, None), "http",
                                  str(status), why, "none")), 0.0)


def _client_names(config: L7Config, client: int) -> tuple[str, str]:
    known = config.clients.get(client) if client != UNKNOWN else None
    return (known.workload, known.namespace) if known is not None else ("unknown", "unknown")


def _sockname(sock: socket.socket) -> tuple[str, int]:
    try:
        return sock.getsockname()[:2]
    except OSError:
        return "", 0


_ANONYMOUS = (None, 0)  # `Proxy.resolve` without a resolver: route by the Host header, no mark
_NO_FLAGS = flags.NONE


async def serve(config_path: str, host: str, port: int, *, flows_path: str | None = None,
                metrics_addr: tuple[str, int] | None = None, reuse_port: bool = False,
                resolver: OriginalDstResolver | None = None, options: Options = Options(),
                reload_interval: float = 1.0, ready: asyncio.Event | None = None,
                policy: KernelPolicy | None = None) -> None:
    """Run one worker until SIGTERM/SIGINT: bind, serve, poll the config file for changes (SIGHUP
    reloads at once). ``policy``: the node's pinned policy maps, for the check before each new
    upstream flow (policy_check.py)."""
    loop = asyncio.get_running_loop()
    metrics = L7Metrics()
    proxy = Proxy(load_file(config_path), config_path=config_path,
                  flows=FlowSink(flows_path, node_name=options.node_name), metrics=metrics,
                  resolver=resolver, options=options, policy=policy)
    listener = proxy.listener = Listener(loop, bind(host, port, reuse_port), proxy.accept)
    listener.start()
    if metrics_addr is not None:
        from prometheus_client import start_http_server
        start_http_server(metrics_addr[1], metrics_addr[0], registry=metrics.registry())
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, lambda: proxy.reload(force=True))
    bound = listener.sock.getsockname()  # printed once signals are handled: "ready" for supervisors
    # One write(2) per line: the lines of several workers sharing stderr never interleave.
    os.write(2, f"l7: listening on {bound[0]}:{bound[1]} (pid {os.getpid()})\n".encode())

    async def poll() -> None:
        while True:
            await asyncio.sleep(reload_interval)
            proxy.reload()

    poller = loop.create_task(poll())
    if ready is not None:
        ready.set()
    try:
        await stop.wait()
    finally:
        poller.cancel()
        listener.close()
        proxy.close()
