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
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import sys
import time
from collections import deque
from dataclasses import dataclass
from http import HTTPStatus
from urllib.parse import parse_qsl

from . import origdst, tunnel
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
from .origdst import OriginalDstResolver
from .pool import BackendPool, PoolOverflow, Pools, UpstreamConnection, UpstreamError
from .routecache import RouteCache
from .routing import RouteDecision, should_retry
from .snapshot import L7Config, Service, SnapshotError, UpstreamHost, load_file

__all__ = ["Options", "Proxy", "serve"]


@dataclass(frozen=True)
class Options:
    header_timeout: float = 10.0  # a request head must arrive within this once it has started
    idle_timeout: float = 60.0  # a keep-alive client connection with no request is closed after this
    max_pipelined: int = 16  # requests queued per client connection before we stop reading
    flush_interval: float = 0.25
    max_mirrors: int = 64  # mirrored requests in flight per worker; more are skipped
    node_name: str = ""


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


class ClientConnection(asyncio.Protocol):
    """One downstream connection: reads requests, serves them in order, keeps the connection alive."""

    __slots__ = ("proxy", "transport", "reader", "queue", "busy", "closing", "peer", "local", "dst", "mark",
                 "_cur", "_body", "_timer", "_timer_kind", "_deadline", "_paused", "_serving", "rec", "exchange",
                 "original", "client_id")

    def __init__(self, proxy: Proxy) -> None:
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
        self._paused = False
        self._serving = False  # `_serve_queued` is on the stack
        self.rec: _Records | None = None  # the last request's record labels: the next one likely shares them
        self.exchange: Exchange | None = None  # the fast path's, made on first use
        self.original: tuple[str, int] | None = None  # the original destination's (ip, port), when resolved
        self.client_id: int | None = None  # the client's endpoint id, when the datapath named it

    # -- asyncio callbacks --

    def connection_made(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        self.peer = transport.get_extra_info("peername") or ("", 0)
        self.local = transport.get_extra_info("sockname") or ("", 0)
        self.dst = None
        self.mark = 0  # SO_MARK of upstream connections: the client's identity, when known
        resolver = self.proxy.resolver
        if resolver is not None:
            dst = self.dst = resolver.resolve(transport.get_extra_info("socket"))
            if dst is not None:
                self.original = (dst.ip, dst.port)
                self.client_id = dst.source_ep_id
            try:
                if dst is not None and dst.source_identity:
                    self.mark = origdst.upstream_mark(dst.source_identity, dst.source_ep_id)
                elif dst is None and getattr(resolver, "required", False):
                    raise ValueError("not redirected by the datapath")
            except ValueError:  # never forward a connection without the identity it must carry
                self.closing = True
                transport.abort()
                return
        self._arm("idle")

    def data_received(self, data: bytes) -> None:
        if self.closing:
            return
        if self.reader.upgraded is not None:  # not HTTP any more: for the tunnel, if the backend agrees
            self.reader.upgraded += data
            if len(self.reader.upgraded) > UPGRADE_HOLD_LIMIT:
                self.transport.pause_reading()  # tunnel.splice resumes it
            return
        starts = self._cur is None and self._timer_kind == "idle"
        queue = self.queue
        queued = len(queue)
        try:
            self.reader.receive_data(data)
        except RemoteProtocolError as e:
            while len(queue) > queued:  # a chunk with an error is refused whole: nothing in it is served
                queue.pop()
            self._refuse(e)
        # A request has started and its head is not all in: it gets header_timeout, not idle_timeout. (A
        # head that arrived whole needs no timer: re-arming one per request would cost a TimerHandle.)
        if starts and self._timer_kind == "idle" and self.reader.in_head:
            self._arm("header")
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
        return True  # keep our side open until queued responses are written

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        self._timer_kind = ""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def write(self, data: bytes) -> None:
        # The client may have gone while we waited upstream; asyncio would log every such write.
        if not self.transport.is_closing():
            self.transport.write(data)

    # -- reading: the request reader's sink --

    def head(self, req: Request) -> None:
        self._cur = req
        self._timer_kind = ""  # the head is in: no header timeout any more
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
            self.proxy.record_refused(self, e.status_hint)

    # -- timers --
    # One lazy timer per connection: re-arming only moves a deadline, so a keep-alive request costs
    # no TimerHandle; when the timer fires early it re-schedules itself at the current deadline.

    def _arm(self, kind: str) -> None:
        opts = self.proxy.options
        self._deadline = self.proxy.loop.time() + (opts.header_timeout if kind == "header" else opts.idle_timeout)
        self._timer_kind = kind
        timer = self._timer
        if timer is None or self._deadline < timer.when():  # only an earlier deadline needs a new handle
            if timer is not None:
                timer.cancel()
            self._timer = self.proxy.loop.call_at(self._deadline, self._timer_fired)

    def _cancel_timer(self) -> None:
        self._timer_kind = ""

    def _timer_fired(self) -> None:
        self._timer = None
        kind = self._timer_kind
        if not kind or self.busy or self.closing:
            return
        if self.proxy.loop.time() < self._deadline:
            self._timer = self.proxy.loop.call_at(self._deadline, self._timer_fired)
            return
        self._timer_kind = ""
        self.closing = True
        if kind == "header":
            self.transport.write(_local_response(408, "request header read timeout", False))
        self.transport.close()

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
            elif self._cur is None:
                self._arm("idle")

    def done(self, keep: bool) -> None:
        """The request being served is answered; ``keep``: the connection stays open for more."""
        self.busy = False
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
        elif self._cur is None:
            self._arm("idle")

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
                 "status", "pending", "chunked", "no_body", "keep", "_broken")

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
                           time.perf_counter_ns() - self.t0)
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


def source_labels(conn: ClientConnection) -> tuple[str, str, str]:
    """The client's workload, namespace and app for metrics: from the agent's config (agent/l7_snapshot.py)
    when the datapath named the client's endpoint, else what the resolver said."""
    client = conn.proxy.config.clients.get(conn.client_id) if conn.client_id else None
    if client is not None:
        return client.workload, client.namespace, client.labels.get("app", "unknown")
    return (conn.dst.source_workload if conn.dst is not None else "unknown"), "unknown", "unknown"


def destination_labels(svc: Service | None, backend: UpstreamHost | None) -> tuple[str, ...]:
    """istio_metrics.DESTINATION_LABELS of a request to ``backend`` of ``svc`` (None: answered here)."""
    labels = backend.labels if backend is not None else {}
    return (backend.workload if backend is not None else "unknown",
            svc.namespace if backend is not None and svc is not None else "unknown",
            labels.get("app", "unknown"), labels.get("version", "unknown"),
            svc.fqdn if svc is not None else "unknown", svc.name if svc is not None else "unknown",
            svc.namespace if svc is not None else "unknown")


class _Records:
    """What the flows and metric samples of one connection's requests to one route, backend and original
    destination share, built once: per request only the counters, a timestamp and a queued tuple remain."""

    __slots__ = ("d", "backend", "dst_ip", "dst_port", "flow", "labels", "rows")

    def __init__(self, conn: ClientConnection, d: RouteDecision, backend: UpstreamHost | None, dst_ip: str,
                 dst_port: int) -> None:
        self.d, self.backend, self.dst_ip, self.dst_port = d, backend, dst_ip, dst_port
        svc = d.service
        service, namespace = (svc.fqdn, svc.namespace) if svc is not None else ("", "")
        src_workload, src_ns, src_app = source_labels(conn)
        if backend is not None:
            dst_workload, upstream = backend.workload, f"{backend.ip}:{backend.port}"
            # As Hubble shows a request through Cilium's proxy: to the backend that answered (its
            # service is in destination.service), so IP.destination and destination.* name one endpoint.
            flow_ip, flow_port = backend.ip, backend.port
        else:
            dst_workload, upstream = "unknown", ""
            flow_ip, flow_port = dst_ip, dst_port  # answered here: where the client sent it
        peer = conn.peer
        self.flow = (peer[0], peer[1], flow_ip, flow_port, d.route_name, d.subset, service, namespace, upstream,
                     dst_workload, src_workload, "FORWARDED")  # flow_export.FlowShared
        # istio_metrics.REQUEST_LABELS, but for response code and security policy
        self.labels = (REPORTER, src_workload, src_ns, src_app, *destination_labels(svc, backend), "http")
        self.rows: dict[int, list] = {}  # status -> L7Metrics.row


class Proxy:
    def __init__(self, config: L7Config, *, config_path: str | None = None, flows: FlowSink | None = None,
                 metrics: L7Metrics | None = None, resolver: OriginalDstResolver | None = None,
                 options: Options = Options(), rng: random.Random | None = None) -> None:
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
        self._mirrors = 0
        # (backend address, client mark) -> istio_metrics.TCP_LABELS
        self._opened_labels: dict[tuple[tuple[str, int], int], tuple[str, ...]] = {}
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
        self.pools.retain(b.address for c in new.clusters.values() for b in c.backends)
        return True

    def _tick(self) -> None:
        self.flows.flush()
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
            self._record(conn, head, d, d.status, None, dst_ip, dst_port, time.perf_counter_ns() - t0)
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
            backend = None
            if d.status:
                status = d.status
                conn.write(_local_response(status, d.reason, keep, d.local_headers, d.local_body))
            else:
                if d.mirror is not None and self._mirrors < self.options.max_mirrors:
                    self._mirror(d, head, body, conn.mark)
                status, backend, keep = await self._forward(conn, head, body, d, keep, first)
            self._record(conn, head, d, status, backend, dst_ip, dst_port, time.perf_counter_ns() - t0)
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

    async def _forward(self, conn: ClientConnection, head: Request, body: bytes, d: RouteDecision,
                       keep: bool, first: tuple | None = None) -> tuple[int, UpstreamHost | None, bool]:
        """Try the cluster's backends under the retry policy; stream the response that ends it.
        Returns (status, backend that answered or None, keep the client connection). ``first``: as
        for `_slow`."""
        loop = self.loop
        state = self.clusters.get(d.cluster)
        key = hash_key(state.hash_by, conn, head)
        limits = d.cluster.policy.pool
        retries = d.retries
        deadline = loop.time() + d.timeout if d.timeout else None
        data = self._request_bytes(head, body, d)
        tried: list[UpstreamHost] = []
        status, reason = 503, "no healthy upstream"
        failure = ""
        for attempt in range(retries.attempts + 1):
            sent = None
            if first is not None:
                backend, sent = first
                first = None
            else:
                backend = state.pick(tried, key)
            if backend is None:
                status, reason = 503, "no healthy upstream"
                break
            tried.append(backend)
            self._label_backend(d, backend, conn)
            attempt_deadline = deadline
            if retries.per_try_timeout:
                per_try = loop.time() + retries.per_try_timeout
                attempt_deadline = per_try if deadline is None else min(per_try, deadline)
            pool = self.pools.get(backend.address, limits, conn.mark)
            if sent is None:
                state.started(backend)
            try:
                async with asyncio.timeout_at(attempt_deadline) if attempt_deadline else _NO_TIMEOUT:
                    up, resp = await self._exchange(pool, data, head.method, sent)
            except TimeoutError:  # _exchange has discarded the connection
                state.finished(backend, failed=True)
                if deadline is not None and loop.time() >= deadline:
                    status, reason = 504, "upstream request timeout"
                    break
                status, reason, failure = 504, "upstream request timeout", "timeout"
            except UpstreamError as e:
                state.finished(backend, failed=True)
                status, reason, failure = 503, f"upstream connect error or disconnect/reset before headers: {e}", \
                    e.kind
            except PoolOverflow as e:
                state.finished(backend, None)  # not the backend's fault: outlier detection ignores it
                status, reason = 503, f"upstream overflow: {e}"
                break
            else:
                state.finished(backend, resp.status)
                if attempt < retries.attempts and should_retry(retries, resp.status):
                    pool.discard(up)  # cheaper than draining a body we will not use
                    status, reason = resp.status, ""
                    continue
                keep = await self._respond(conn, pool, up, resp, d, head, keep, deadline)
                return resp.status, backend, keep
            if attempt >= retries.attempts or not should_retry(retries, failure=failure):
                break
        conn.write(_local_response(status, reason or "upstream error", keep))
        return status, None, keep

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
                       d: RouteDecision, head: Request, keep: bool, deadline: float | None) -> bool:
        """Write the upstream response to the client, streaming the body; returns keep-alive."""
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
        except (UpstreamError, TimeoutError):
            pool.discard(up)
            if pending:
                write(pending)
            return False  # the response is cut: the client must see the connection close
        if chunked:
            pending += b"0\r\n\r\n"
        if pending:
            write(pending)
        pool.release(up)
        return keep

    async def _tunnel(self, conn: ClientConnection, head: Request, body: bytes, d: RouteDecision, dst_ip: str,
                      dst_port: int, t0: int) -> None:
        """An Upgrade request (WebSocket, h2c): routed as any request, sent upstream with its Upgrade
        header on a connection of its own; a 101 splices the two connections (tunnel.py), any other
        answer is forwarded and the client connection closes (its bytes after the request are not
        HTTP). Retries, mirrors and pooling do not apply to it."""
        status, backend, up, pool, state = 503, None, None, None, None
        try:
            if d.delay:
                await asyncio.sleep(d.delay)
            if d.status:
                status = d.status
                conn.write(_local_response(status, d.reason, False, d.local_headers, d.local_body))
            else:
                state = self.clusters.get(d.cluster)
                backend = state.pick(key=hash_key(state.hash_by, conn, head))
                if backend is None:
                    conn.write(_local_response(503, "no healthy upstream", False))
                else:
                    self._label_backend(d, backend, conn)
                    pool = self.pools.get(backend.address, d.cluster.policy.pool, conn.mark)
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
                        status = 504
                        conn.write(_local_response(504, "upstream request timeout", False))
                    except PoolOverflow as e:
                        state.finished(backend, None)  # not the backend's fault
                        conn.write(_local_response(503, f"upstream overflow: {e}", False))
                    except UpstreamError as e:
                        state.finished(backend, failed=True)
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
                            tunnel.splice(conn.transport, spliced_up.transport, client_rest, upstream_rest,
                                          lambda: spliced_pool.discard(spliced_up),
                                          d.cluster.policy.pool.idle_timeout)
                            conn.spliced()
                        else:  # refused (400, 426...): an ordinary response, and the connection closes
                            await self._respond(conn, pool, up, resp, d, head, False, None)
                            up = None
            self._record(conn, head, d, status, backend, dst_ip, dst_port, time.perf_counter_ns() - t0)
        except Exception as e:
            conn.internal_error(e)
            return
        finally:
            if up is not None:
                pool.discard(up)
        if status != 101:
            conn.done(False)

    def _mirror(self, d: RouteDecision, head: Request, body: bytes, mark: int = 0) -> None:
        cluster = d.mirror
        state = self.clusters.get(cluster)
        backend = state.pick()
        if backend is None:
            return
        host = d.authority or head.host or cluster.service.fqdn
        name, _, port = host.partition(":")
        data = self._request_bytes(head, body, d, f"{name}-shadow" + (f":{port}" if port else ""))
        self._mirrors += 1
        self.loop.create_task(self._send_mirror(self.pools.get(backend.address, cluster.policy.pool, mark), data,
                                                head.method))

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
                backend: UpstreamHost | None, dst_ip: str, dst_port: int, latency_ns: int) -> None:
        rec = conn.rec
        if rec is None or rec.d is not d or rec.backend is not backend or rec.dst_port != dst_port \
                or rec.dst_ip != dst_ip:
            rec = conn.rec = _Records(conn, d, backend, dst_ip, dst_port)
        self.flows.pending.append((time.time_ns(), latency_ns, head.method, head.target, status, rec.flow))
        row = rec.rows.get(status)
        if row is None:
            row = rec.rows[status] = self.metrics.row(rec.labels + (str(status), "none"))
        observe(row, latency_ns / 1e6)

    def record_refused(self, conn: ClientConnection, status: int) -> None:
        self.flows.add((time.time_ns(), 0, "", "", status, conn.peer[0], conn.peer[1], conn.local[0], conn.local[1],
                        "", "", "", "", "", "unknown", "unknown", "DROPPED"))


async def serve(config_path: str, host: str, port: int, *, flows_path: str | None = None,
                metrics_addr: tuple[str, int] | None = None, reuse_port: bool = False,
                resolver: OriginalDstResolver | None = None, options: Options = Options(),
                reload_interval: float = 1.0, ready: asyncio.Event | None = None) -> None:
    """Run one worker until SIGTERM/SIGINT: bind, serve, poll the config file for changes (SIGHUP
    reloads at once)."""
    loop = asyncio.get_running_loop()
    metrics = L7Metrics()
    proxy = Proxy(load_file(config_path), config_path=config_path,
                  flows=FlowSink(flows_path, node_name=options.node_name), metrics=metrics,
                  resolver=resolver, options=options)
    server = await loop.create_server(lambda: ClientConnection(proxy), host, port, reuse_port=reuse_port or None,
                                      backlog=1024)
    if metrics_addr is not None:
        from prometheus_client import start_http_server
        start_http_server(metrics_addr[1], metrics_addr[0], registry=metrics.registry())
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, lambda: proxy.reload(force=True))
    bound = server.sockets[0].getsockname()  # printed once signals are handled: "ready" for supervisors
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
        server.close()
        proxy.close()
