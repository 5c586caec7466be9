"""The L7 processor on asyncio/uvloop: the only module here that does network I/O.

One `Proxy` per worker process holds the config snapshot, the per-cluster balancers, the upstream
pools, the flow sink and the metrics. Each accepted client connection is a `ClientConnection`
protocol: `http1.RequestReader` turns its bytes into requests, `routing.route` decides, and
`Proxy.handle` carries the decision out (fault delay/abort, retries under the route timeout, header
edits, mirror), streams the response back and records one flow and one metric sample.

Hot-path rules: no logging, no per-request tasks other than the one that serves a connection's
queued requests, flows and metrics appended to in-memory batches. Errors printed to stderr are
reserved for the control path (config reloads, startup).

The original destination of a connection comes from an `OriginalDstResolver` when one is plugged
in (the kernel-side redirect: userspace_l7.origdst) and otherwise from each request's Host header.
When the resolver names the client's identity, upstream connections for that client carry it as
their SO_MARK (origdst.upstream_mark) and are pooled apart from every other identity's.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import socket
import sys
import time
from collections import deque
from dataclasses import dataclass
from typing import Protocol

from . import config as cfg
from . import origdst
from .balancer import ClusterStates
from .config import Backend, L7Config
from .flows import FlowSink
from .http1 import (
    ConnectionClosed,
    Data,
    EndOfMessage,
    RemoteProtocolError,
    Request,
    RequestReader,
    Response,
)
from .metrics import L7Metrics
from .pool import PoolOverflow, Pools, UpstreamConnection, UpstreamError
from .routing import RouteDecision, parse_authority, route, should_retry

__all__ = ["OriginalDst", "OriginalDstResolver", "Options", "Proxy", "serve"]


@dataclass(frozen=True, slots=True)
class OriginalDst:
    ip: str
    port: int
    source_workload: str = "unknown"
    source_principal: str = ""  # spiffe://... once mTLS lands
    source_identity: int | None = None  # the client's security identity, from the datapath


class OriginalDstResolver(Protocol):
    """Where a redirected connection was going (and who sent it). Called once per accepted
    connection with its socket; None: fall back to the Host header of each request, unless the
    resolver has a true ``required`` attribute: then the connection is closed."""

    def resolve(self, sock: socket.socket) -> OriginalDst | None: ...


@dataclass(frozen=True)
class Options:
    header_timeout: float = 10.0  # a request head must arrive within this once it has started
    idle_timeout: float = 60.0  # a keep-alive client connection with no request is closed after this
    max_pipelined: int = 16  # requests queued per client connection before we stop reading
    flush_interval: float = 0.25
    max_mirrors: int = 64  # mirrored requests in flight per worker; more are skipped
    node_name: str = ""


HOP_BY_HOP = frozenset(("connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding",
                        "upgrade", "content-length", "expect"))
REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed", 408: "Request Timeout",
           413: "Content Too Large", 431: "Request Header Fields Too Large", 500: "Internal Server Error",
           501: "Not Implemented", 502: "Bad Gateway", 503: "Service Unavailable", 504: "Gateway Timeout"}
NO_BODY_STATUS = frozenset((204, 304))
_NO_TIMEOUT = contextlib.nullcontext()  # reusable; `async with` works on it


def _local_response(status: int, text: str, keep_alive: bool, extra: list[tuple[str, str]] = ()) -> bytes:
    body = (text + "\n").encode()
    head = [f"HTTP/1.1 {status} {REASONS.get(status, 'Unknown')}\r\ncontent-type: text/plain\r\n"
            f"content-length: {len(body)}\r\n"]
    head.extend(f"{k}: {v}\r\n" for k, v in extra)
    if not keep_alive:
        head.append("connection: close\r\n")
    head.append("\r\n")
    return "".join(head).encode("latin-1") + body


class ClientConnection(asyncio.Protocol):
    """One downstream connection: reads requests, serves them in order, keeps the connection alive."""

    __slots__ = ("proxy", "transport", "reader", "queue", "busy", "closing", "peer", "local", "dst", "mark",
                 "_cur", "_body", "_timer", "_timer_kind", "_deadline", "_paused")

    def __init__(self, proxy: Proxy) -> None:
        self.proxy = proxy
        self.reader = RequestReader()
        self.queue: deque[tuple[Request, bytes]] = deque()
        self.busy = False
        self.closing = False
        self._cur: Request | None = None
        self._body: list[bytes] = []
        self._timer: asyncio.TimerHandle | None = None
        self._timer_kind = ""
        self._deadline = 0.0
        self._paused = False

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
            try:
                if dst is not None and dst.source_identity:
                    self.mark = origdst.upstream_mark(dst.source_identity)
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
        if self._cur is None and self._timer_kind == "idle":
            self._arm("header")  # a request has started: it gets header_timeout, not idle_timeout
        try:
            self.reader.receive_data(data)
            self._pump()
        except RemoteProtocolError as e:
            self._refuse(e)

    def eof_received(self) -> bool:
        try:
            self.reader.receive_data(b"")
            self._pump()
        except RemoteProtocolError:
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

    # -- reading --

    def _pump(self) -> None:
        reader = self.reader
        while True:
            ev = reader.next_event()
            if isinstance(ev, Data):
                self._body.append(ev.data)
            elif ev is EndOfMessage:
                body = b"".join(self._body) if self._body else b""
                self.queue.append((self._cur, body))
                self._cur, self._body = None, []
                if not self.busy:
                    self.busy = True
                    self.proxy.loop.create_task(self._serve())
                if len(self.queue) >= self.proxy.options.max_pipelined and not self._paused:
                    self._paused = True
                    self.transport.pause_reading()
            elif isinstance(ev, Request):
                self._cur = ev
                self._cancel_timer()
                if ev.expect_continue:
                    self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            elif ev is ConnectionClosed:
                self.closing = True
                if not self.busy:
                    self.transport.close()
                return
            else:  # NEED_DATA
                return

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

    async def _serve(self) -> None:
        try:
            while self.queue and not self.transport.is_closing():
                head, body = self.queue.popleft()
                if self._paused and len(self.queue) < self.proxy.options.max_pipelined:
                    self._paused = False
                    self.transport.resume_reading()
                keep = await self.proxy.handle(self, head, body)
                if not keep:
                    self.closing = True
                    self.queue.clear()
                    self.transport.close()
                    return
        except Exception as e:  # a bug: never leave the client hanging, never kill the worker
            print(f"l7: internal error serving {self.peer}: {type(e).__name__}: {e}", file=sys.stderr)
            self.closing = True
            self.transport.close()
            return
        finally:
            self.busy = False
        if self.closing:
            self.transport.close()
        elif self._cur is None:
            self._arm("idle")


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
        self._mirrors = 0
        self._opened_labels: dict[tuple[str, int], tuple[str, str, str, str]] = {}
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
            new = cfg.load_file(self.config_path)
        except cfg.ConfigError as e:
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

    def _upstream_opened(self, address: tuple[str, int]) -> None:
        labels = self._opened_labels.get(address)
        if labels is not None:
            self.metrics.connection_opened(labels)

    # -- the request path --

    async def handle(self, conn: ClientConnection, head: Request, body: bytes) -> bool:
        """Serve one request; returns whether the client connection stays open."""
        t0 = time.perf_counter_ns()
        keep = head.keep_alive and not conn.closing
        dst = conn.dst
        if dst is not None:
            d = route(self.config, head, (dst.ip, dst.port), self.rng)
            dst_ip, dst_port = dst.ip, dst.port
        else:
            dst_ip, dst_port = parse_authority(head.host or "", conn.local[1])
            d = route(self.config, head, (dst_ip, dst_port), self.rng)
        if d.delay:
            await asyncio.sleep(d.delay)
        backend = None
        if d.status:
            status = d.status
            conn.write(_local_response(status, d.reason, keep))
        else:
            if d.mirror is not None and self._mirrors < self.options.max_mirrors:
                self._mirror(d, head, body, conn.mark)
            status, backend, keep = await self._forward(conn, head, body, d, keep)
        self._record(conn, head, d, status, backend, dst_ip, dst_port, time.perf_counter_ns() - t0)
        return keep

    def _request_bytes(self, head: Request, body: bytes, d: RouteDecision, authority: str | None = None) -> bytes:
        headers = [(k, v) for k, v in head.headers if k not in HOP_BY_HOP]
        if d.request_headers:
            headers = d.request_headers.apply(headers)
        authority = authority or d.authority
        if authority:
            headers = [(k, v) for k, v in headers if k != "host"]
            headers.append(("host", authority))
        lines = [f"{head.method} {d.path} HTTP/1.1\r\n"]
        lines.extend(f"{k}: {v}\r\n" for k, v in headers)
        if body or head.method in ("POST", "PUT", "PATCH"):
            lines.append(f"content-length: {len(body)}\r\n")
        lines.append("\r\n")
        data = "".join(lines).encode("latin-1")
        return data + body if body else data

    async def _forward(self, conn: ClientConnection, head: Request, body: bytes, d: RouteDecision,
                       keep: bool) -> tuple[int, Backend | None, bool]:
        """Try the cluster's backends under the retry policy; stream the response that ends it.
        Returns (status, backend that answered or None, keep the client connection)."""
        loop = self.loop
        state = self.clusters.get(d.cluster)
        limits = d.cluster.policy.pool
        retries = d.retries
        deadline = loop.time() + d.timeout if d.timeout else None
        data = self._request_bytes(head, body, d)
        tried: list[Backend] = []
        status, reason = 503, "no healthy upstream"
        failure = ""
        for attempt in range(retries.attempts + 1):
            backend = state.pick(tried)
            if backend is None:
                status, reason = 503, "no healthy upstream"
                break
            tried.append(backend)
            if backend.address not in self._opened_labels:
                self._opened_labels[backend.address] = ("unknown", backend.workload, d.service.fqdn, "none")
            attempt_deadline = deadline
            if retries.per_try_timeout:
                per_try = loop.time() + retries.per_try_timeout
                attempt_deadline = per_try if deadline is None else min(per_try, deadline)
            pool = self.pools.get(backend.address, limits, conn.mark)
            state.started(backend)
            try:
                async with asyncio.timeout_at(attempt_deadline) if attempt_deadline else _NO_TIMEOUT:
                    up, resp = await self._exchange(pool, data, head.method)
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

    async def _exchange(self, pool, data: bytes, method: str) -> tuple[UpstreamConnection, Response]:
        """Send one request and read the response head; a stale reused connection is retried once on
        a fresh one (the peer closed it while idle, before reading anything we sent)."""
        for _ in range(2):
            up, reused = await pool.acquire()
            up.send(data, method)
            try:
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
        headers = [(k, v) for k, v in resp.headers if k not in HOP_BY_HOP]
        if d.response_headers:
            headers = d.response_headers.apply(headers)
        no_body = head.method == "HEAD" or resp.status in NO_BODY_STATUS
        chunked = False
        if resp.content_length is not None and resp.status not in NO_BODY_STATUS:
            headers.append(("content-length", str(resp.content_length)))
        elif not no_body:
            if head.http_version == "1.1":
                chunked = True
                headers.append(("transfer-encoding", "chunked"))
            else:
                keep = False  # HTTP/1.0 client: the body ends when we close
        if not keep:
            headers.append(("connection", "close"))
        elif head.http_version == "1.0":
            headers.append(("connection", "keep-alive"))
        lines = [f"HTTP/1.1 {resp.status} {resp.reason or REASONS.get(resp.status, '')}\r\n"]
        lines.extend(f"{k}: {v}\r\n" for k, v in headers)
        lines.append("\r\n")
        write = conn.write
        # The head goes out with the first body bytes (usually the whole body): one send, not two.
        pending = "".join(lines).encode("latin-1")
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

    def _record(self, conn: ClientConnection, head: Request, d: RouteDecision, status: int, backend: Backend | None,
                dst_ip: str, dst_port: int, latency_ns: int) -> None:
        svc = d.service
        fqdn = svc.fqdn if svc is not None else "unknown"
        src_workload = conn.dst.source_workload if conn.dst is not None else "unknown"
        dst_workload = backend.workload if backend is not None else "unknown"
        self.flows.add((time.time_ns(), latency_ns, head.method, head.target, status, conn.peer[0], conn.peer[1],
                        dst_ip, dst_port, d.route_name, d.subset, svc.fqdn if svc is not None else "",
                        svc.namespace if svc is not None else "",
                        f"{backend.ip}:{backend.port}" if backend is not None else "", dst_workload, src_workload,
                        "FORWARDED"))
        self.metrics.request((src_workload, dst_workload, fqdn, str(status), "none"), latency_ns / 1e6)

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
    proxy = Proxy(cfg.load_file(config_path), config_path=config_path,
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
