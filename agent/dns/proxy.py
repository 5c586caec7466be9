"""`DnsProxy`: the node's DNS server for its endpoints, on UDP and TCP.

Every question goes through the same steps:

    parse          garbage: dropped (header unreadable) or FORMERR; other opcodes NOTIMP (message.py)
    asking client  the endpoint of this node whose address sent it; any other source: REFUSED
    policy         hook.check(endpoint, name, type): a name outside the endpoint's DNS rules is
                   REFUSED, with a DROPPED DNS flow naming the rule
    zone           the mesh's own names (zone.py), answered with authority
    cache          upstream answers within their TTLs (cache.py)
    upstream       the node's resolvers, UPSTREAM_TIMEOUT_S in all, else SERVFAIL (upstream.py);
                   questions asked at once for the same name and type share one upstream query
    observe        hook.observed(endpoint, name, IPs, TTL) before the answer leaves, so that policy
                   allowing those IPs (toFQDNs) is in the datapath when the client connects
    answer         an event for a DNS flow (handed to the agent in batches, ``on_events``) and the counters

The fast path: an answer built once is kept as bytes (cache.WireCache), keyed by the query's bytes
after its ID, so a stub resolver that asks the same question again is answered with one dict
lookup, the policy check and a flow, no parsing. It is used only while the answer would read the
same (the zone unchanged, the TTL not a second lower).

Threads: one asyncio loop (uvloop) in a thread of its own. Forwarding has many questions waiting on
upstreams at once, each with a deadline, and TCP clients each with their own timeouts: timers and
sockets that asyncio multiplexes with no thread per question. The agent's other threads only call
`update()` (which hands the new snapshot to the loop) and read counters. ``hook.observed`` may
block, so it runs in a small thread pool, never on the loop; a hook may offer
``observed_fast(endpoint, name, IPs, TTL) -> bool``, called on the loop, which must not block and
returns True when nothing is left to wait for (then no thread is used).

Bounds: at most MAX_PENDING questions in progress (beyond: dropped, counted), MAX_INFLIGHT distinct
upstream questions (beyond: SERVFAIL at once), MAX_TCP_CLIENTS TCP connections (beyond: closed at
once), and on each TCP connection TCP_IDLE_TIMEOUT_S for the next question to start and
TCP_IO_TIMEOUT_S for it to arrive whole or for its answer to be taken.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import socket
import struct
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol

import uvloop
from dnslib import RCODE

from agent.dns.cache import DnsCache, WireCache
from agent.dns.message import (
    Query,
    Rejection,
    answer_ips,
    forwarded_reply,
    parse_query,
    query_error,
    to_wire,
    zone_reply,
)
from agent.dns.upstream import UpstreamError, Upstreams
from agent.dns.zone import MeshZone
from agent.errors import MeshError

log = logging.getLogger("meshagent.dns")

MAX_PENDING = 4096  # questions in progress (waiting on an upstream or on the policy hook)
MAX_INFLIGHT = 256  # distinct questions asked upstream at once (each holds a socket)
MAX_TCP_CLIENTS = 256
UDP_RCVBUF = 1 << 20  # bytes of questions the kernel holds for us (up to net.core.rmem_max)
TCP_IDLE_TIMEOUT_S = 10.0  # for the next question on an open connection (RFC 7766 suggests seconds)
TCP_IO_TIMEOUT_S = 5.0  # for a started question to arrive whole, and for an answer to be taken
OBSERVE_TIMEOUT_S = 1.0  # the longest an answer waits for hook.observed (the hook bounds itself too)
OBSERVE_THREADS = 4
EVENT_FLUSH_S = 0.05  # events go to the agent in batches, as often as the ring buffer is drained
EVENT_BATCH_MAX = 4096
RCODE_NAMES = {0: "NOERROR", 1: "FORMERR", 2: "SERVFAIL", 3: "NXDOMAIN", 4: "NOTIMP", 5: "REFUSED", 16: "BADVERS"}


class DnsProxyError(MeshError):
    """The DNS proxy cannot run as configured (its address is taken or not on this node)."""

    culprit = "node"


@dataclass(frozen=True)
class DnsClient:
    """The endpoint that asked: one of this node's endpoints, found by the query's source address."""

    name: str
    namespace: str
    ip: str
    ep_id: int = 0
    identity: int = 0


@dataclass(frozen=True)
class DnsVerdict:
    """The policy hook's decision on one question. ``rule_id``: the deciding rule's id in the agent's
    compiled rules (flows name it as they name an L4 rule); ``description``: what the rule says, for
    a rule without an id."""

    allowed: bool
    rule_id: int = 0
    description: str = ""
    # Refused for names outside the mesh only: a name the mesh zone answers is answered anyway.
    mesh_names: bool = False


ALLOWED = DnsVerdict(True)


class DnsPolicyHook(Protocol):
    """What the proxy asks of DNS policy (agent/dns/fqdn.py implements it; `AllowAll` by default)."""

    def check(self, endpoint: DnsClient, qname: str, qtype: str) -> DnsVerdict:
        """May ``endpoint`` look up ``qname`` (as asked, trailing dot) of type ``qtype`` ("A")? Runs
        on the proxy's loop: must not block."""
        ...

    def observed(self, endpoint: DnsClient, qname: str, ips: tuple[str, ...], ttl: int) -> None:
        """The answer about to be given to ``endpoint``: its addresses and lowest TTL. Called before the
        answer leaves, in a worker thread; may block (bounded) until the datapath allows ``ips``."""
        ...


class AllowAll:
    """The default hook: every name may be looked up, nothing is recorded."""

    def check(self, endpoint: DnsClient, qname: str, qtype: str) -> DnsVerdict:
        return ALLOWED

    def observed(self, endpoint: DnsClient, qname: str, ips: tuple[str, ...], ttl: int) -> None:
        return None

    def observed_fast(self, endpoint: DnsClient, qname: str, ips: tuple[str, ...], ttl: int) -> bool:
        return True


@dataclass(frozen=True)
class DnsSnapshot:
    """What the proxy answers from, rebuilt by the agent on every reconcile and swapped whole."""

    zone: MeshZone
    clients: Mapping[str, DnsClient] = field(default_factory=dict)  # this node's endpoints by address


@dataclass(frozen=True)
class DnsAnswer:
    """What one answer says, for its flow: made once and kept with an answer the proxy gives again
    (the fast path), so each further flow of it costs only a reference."""

    qname: str  # as asked, trailing dot
    qtype: str
    rcode: int
    ips: tuple[str, ...] = ()
    ttl: int = 0  # the lowest TTL of the answer records
    cnames: tuple[str, ...] = ()
    rrtypes: tuple[str, ...] = ()
    mesh: bool = False  # answered by the mesh zone, not from upstream (or the cache of upstream answers)


class DnsEvent(NamedTuple):
    """One answered (or refused) question, for the agent to turn into a flow (agent/flows.py
    dns_flow_of, when it is read). The proxy hands over plain tuples of these fields in this order
    (one is made per question, and a tuple is the cheapest thing to make); ``DnsEvent(*event)``
    names them."""

    time_ns: int
    client: DnsClient
    client_port: int
    server: tuple[str, int]  # the resolver address the client asked (its original destination)
    protocol: str  # "UDP" | "TCP"
    answer: DnsAnswer
    latency_ns: int = 0
    verdict: DnsVerdict = ALLOWED


class DnsCounters:
    """The proxy's counts (meshagent_dns_* metrics). Written on the loop, read by the metrics thread."""

    def __init__(self) -> None:
        self.requests: dict[str, int] = {}  # by qtype
        self.responses: dict[str, int] = {}  # by rcode name
        self.dropped: dict[str, int] = {}  # by reason: garbage, response, overload, tcp-clients
        self.cache_hits = 0
        self.cache_misses = 0
        self.unknown_clients = 0  # questions from an address that is no endpoint of this node
        self.policy_refused = 0

    def count(self, table: dict[str, int], key: str) -> None:
        table[key] = table.get(key, 0) + 1

    def snapshot(self) -> dict[str, Any]:
        return {"requests": dict(self.requests), "responses": dict(self.responses), "dropped": dict(self.dropped),
                "cache_hits": self.cache_hits, "cache_misses": self.cache_misses,
                "unknown_clients": self.unknown_clients, "policy_refused": self.policy_refused}


class _Udp(asyncio.DatagramProtocol):
    def __init__(self, proxy: DnsProxy):
        self.proxy = proxy
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple) -> None:
        try:
            proxy = self.proxy
            fast = proxy._fast(data, addr, True)
            if fast is not None:
                self.transport.sendto(fast, addr)
            else:
                proxy._on_datagram(self.transport, data, addr)
        except Exception:  # a bug must cost one answer, never the proxy
            log.exception("DNS proxy: answering %s failed", addr)

    def error_received(self, exc: Exception) -> None:
        pass  # ICMP errors for answers to clients that went away: nothing to do


class DnsProxy:
    """The node's DNS proxy on (``host``, ``port``), UDP and TCP. `start()` binds (raising
    DnsProxyError) and runs the loop thread; `update()` swaps the snapshot; `stop()` ends it."""

    def __init__(self, host: str, port: int, upstreams: Upstreams, snapshot: DnsSnapshot,
                 hook: DnsPolicyHook | None = None, on_events: Callable[[list[tuple]], None] | None = None,
                 original_dst: Callable[[str, int, str], tuple[str, int] | None] | None = None,
                 cache_entries: int = 10_000):
        self.host, self.port = host, port
        self.upstreams = upstreams
        self.hook = hook or AllowAll()
        self.on_events = on_events  # answered questions, in batches (flows)
        self._events: list[tuple] = []  # DnsEvent fields
        self._wall_offset_ns = time.time_ns() - time.monotonic_ns()  # flow times: one clock read a question
        self._server = (host, 53)  # the resolver a flow names when original_dst does not know it
        # The resolver a redirected client asked (client ip, port, "UDP"|"TCP"); None: this proxy.
        self.original_dst = original_dst
        self.counters = DnsCounters()
        self.cache = DnsCache(cache_entries)
        self.wire = WireCache(cache_entries)
        self._snap = snapshot
        self._inflight: dict[tuple[str, int], asyncio.Future] = {}
        self._pending = 0
        self._tcp_clients = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._socks: list[socket.socket] = []
        self._pool = concurrent.futures.ThreadPoolExecutor(OBSERVE_THREADS, thread_name_prefix="dns-observe")
        self._started = threading.Event()
        self._start_error: BaseException | None = None

    # ---- life -----------------------------------------------------------------------------------

    @property
    def hook(self) -> DnsPolicyHook:
        return self._hook

    @hook.setter
    def hook(self, hook: DnsPolicyHook) -> None:
        self._hook = hook
        self._observed_fast = getattr(hook, "observed_fast", None)

    @property
    def address(self) -> tuple[str, int]:
        return self.host, self.port

    def start(self) -> None:
        # Port 0 (tests): the first free UDP port whose TCP twin is free too; a few tries.
        for attempt in range(10 if self.port == 0 else 1):
            try:
                self._socks = self._bind(self.port)
                break
            except OSError as e:
                if attempt == 9 or self.port != 0:
                    raise DnsProxyError(
                        f"DNS proxy cannot listen on {self.host}:{self.port} (UDP and TCP): {e.strerror}; "
                        "set dns_proxy_port to a free port, or dns_proxy: false") from None
        self.port = self._socks[0].getsockname()[1]
        for s in self._socks:
            s.setblocking(False)
        self._thread = threading.Thread(target=self._run, name="dns-proxy", daemon=True)
        self._thread.start()
        self._started.wait(10)
        if self._start_error is not None:
            raise DnsProxyError(f"DNS proxy failed to start: {self._start_error}")

    def _bind(self, port: int) -> list[socket.socket]:
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            udp.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, UDP_RCVBUF)  # a burst waits; more is dropped
            udp.bind((self.host, port))
            tcp.bind((self.host, udp.getsockname()[1]))
            tcp.listen(128)
        except OSError:
            udp.close()
            tcp.close()
            raise
        return [udp, tcp]

    def _run(self) -> None:
        loop = uvloop.new_event_loop()
        self._loop = loop
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(self._serve())
        except BaseException as e:  # reported to start()
            self._start_error = e
            self._started.set()
            loop.close()
            return
        self._started.set()
        try:
            loop.run_forever()
        finally:
            for task in asyncio.all_tasks(loop):
                task.cancel()
            loop.run_until_complete(asyncio.sleep(0))
            loop.close()

    async def _serve(self) -> None:
        loop = asyncio.get_running_loop()
        udp, tcp = self._socks
        await loop.create_datagram_endpoint(lambda: _Udp(self), sock=udp)
        await asyncio.start_server(self._tcp_client, sock=tcp)

    def stop(self) -> None:
        loop, thread = self._loop, self._thread
        if loop is not None and thread is not None and thread.is_alive():
            loop.call_soon_threadsafe(self._flush)
            loop.call_soon_threadsafe(loop.stop)
            thread.join(5)
        self._close_socks()
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _close_socks(self) -> None:
        for s in self._socks:
            s.close()

    def update(self, snapshot: DnsSnapshot) -> None:
        """Answer from ``snapshot`` from now on (called by the agent after each reconcile). The same
        names and clients as now change nothing, so the kept answers stay."""
        if snapshot == self._snap:
            return
        loop = self._loop
        if loop is not None and loop.is_running():
            loop.call_soon_threadsafe(self._swap, snapshot)
        else:
            self._swap(snapshot)

    def _swap(self, snapshot: DnsSnapshot) -> None:
        self._snap = snapshot
        self.wire.clear()  # kept answers were built from the old zone and clients

    # ---- UDP --------------------------------------------------------------------------------------

    def _on_datagram(self, transport: asyncio.DatagramTransport, data: bytes, addr: tuple) -> None:
        """A datagram the fast path did not answer: answered by a task."""
        if self._pending >= MAX_PENDING:
            self.counters.count(self.counters.dropped, "overload")
            return
        self._pending += 1
        task = asyncio.ensure_future(self._answer(data, addr, True))
        task.add_done_callback(lambda t: self._udp_done(t, transport, addr))

    def _udp_done(self, task: asyncio.Task, transport: asyncio.DatagramTransport, addr: tuple) -> None:
        self._pending -= 1
        if task.cancelled():
            return
        if task.exception() is not None:
            log.error("DNS proxy: answering %s failed", addr, exc_info=task.exception())
            return
        reply = task.result()
        if reply is not None and not transport.is_closing():
            transport.sendto(reply, addr)

    # ---- TCP --------------------------------------------------------------------------------------

    async def _tcp_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._tcp_clients >= MAX_TCP_CLIENTS:
            self.counters.count(self.counters.dropped, "tcp-clients")
            writer.close()
            return
        self._tcp_clients += 1
        try:
            addr = writer.get_extra_info("peername")
            while True:
                try:
                    async with asyncio.timeout(TCP_IDLE_TIMEOUT_S):
                        head = await reader.readexactly(2)
                    (length,) = struct.unpack("!H", head)
                    async with asyncio.timeout(TCP_IO_TIMEOUT_S):
                        data = await reader.readexactly(length)
                except (asyncio.IncompleteReadError, TimeoutError, ConnectionError):
                    return  # closed, stalled or idle: the connection ends
                reply = self._fast(data, addr, False)
                if reply is None:
                    if self._pending >= MAX_PENDING:
                        self.counters.count(self.counters.dropped, "overload")
                        return
                    self._pending += 1
                    try:
                        reply = await self._answer(data, addr, False)
                    finally:
                        self._pending -= 1
                if reply is None:
                    return  # not DNS: there is no telling where its next message would start
                writer.write(struct.pack("!H", len(reply)) + reply)
                try:
                    async with asyncio.timeout(TCP_IO_TIMEOUT_S):
                        await writer.drain()
                except (TimeoutError, ConnectionError):
                    return
        finally:
            self._tcp_clients -= 1
            writer.close()

    # ---- answering --------------------------------------------------------------------------------

    def _fast(self, data: bytes, addr: tuple, udp: bool) -> bytes | None:
        """The kept answer to these exact bytes, if there is one and nothing else must happen first."""
        started = time.monotonic_ns()
        snap = self._snap
        client = snap.clients.get(addr[0])
        if client is None or len(data) < 12:
            return None
        now = started / 1e9
        hit = self.wire.get((udp, client.namespace, data[2:]), now)
        if hit is None:
            return None
        meta: DnsAnswer = hit.meta
        try:
            verdict = self._hook.check(client, meta.qname, meta.qtype)
            if not verdict.allowed and not (verdict.mesh_names and meta.mesh):
                return None  # the slow path refuses it and says why
            if meta.ips:
                fast = self._observed_fast
                if fast is None or not fast(client, meta.qname, meta.ips, meta.ttl):
                    return None  # the slow path waits for the hook
        except Exception:
            return None  # the slow path asks again, and answers SERVFAIL if the hook fails there too
        c = self.counters
        c.requests[meta.qtype] = c.requests.get(meta.qtype, 0) + 1
        rcode = RCODE_NAMES.get(meta.rcode) or str(meta.rcode)
        c.responses[rcode] = c.responses.get(rcode, 0) + 1
        if not meta.mesh:
            c.cache_hits += 1
        self._event(client, addr, udp, meta, started, ALLOWED)
        return data[:2] + hit.tail

    async def _answer(self, data: bytes, addr: tuple, udp: bool) -> bytes | None:
        """The answer to one message from ``addr`` (None: send nothing)."""
        started = time.monotonic_ns()
        c = self.counters
        query = parse_query(data, udp)
        if isinstance(query, Rejection):
            c.count(c.dropped if query.reply is None else c.responses,
                    query.reason if query.reply is None else RCODE_NAMES.get(query.rcode, str(query.rcode)))
            return query.reply
        c.count(c.requests, query.qtype)
        snap = self._snap
        client = snap.clients.get(addr[0])
        if client is None:
            c.unknown_clients += 1
            return self._error(query, RCODE.REFUSED)
        try:
            verdict = self._hook.check(client, query.qname, query.qtype)
        except Exception:
            log.exception("DNS policy check of %s for %s failed", query.qname, client.name)
            return self._error(query, RCODE.SERVFAIL)
        answer = snap.zone.lookup(query.qname, query.qtype, client.namespace)
        if not verdict.allowed and not (verdict.mesh_names and answer is not None):
            c.policy_refused += 1
            self._event(client, addr, udp, DnsAnswer(query.qname, query.qtype, RCODE.REFUSED), started, verdict)
            return self._error(query, RCODE.REFUSED)

        now = time.monotonic()
        if answer is not None:
            reply, steady_until = zone_reply(query, answer), float("inf")  # until the next snapshot
        else:
            entry = self.cache.get(query.key, now)
            if entry is not None:
                c.cache_hits += 1
                reply, steady_until = forwarded_reply(query, entry.reply, entry.age(now)), entry.steady_until(now)
            else:
                c.cache_misses += 1
                try:
                    upstream = await self._forward(query)
                except UpstreamError:
                    self._event(client, addr, udp, DnsAnswer(query.qname, query.qtype, RCODE.SERVFAIL), started,
                                ALLOWED)
                    return self._error(query, RCODE.SERVFAIL)
                now = time.monotonic()
                entry = self.cache.put(query.key, upstream, now)
                reply = forwarded_reply(query, upstream)
                steady_until = entry.steady_until(now) if entry is not None else now

        wire, truncated = to_wire(reply, query.max_udp if udp else None)
        ips, ttl, cnames, rrtypes = answer_ips(reply)
        rcode = reply.header.rcode
        meta = DnsAnswer(query.qname, query.qtype, rcode, ips if not truncated else (), ttl, cnames, rrtypes,
                     answer is not None)
        if ips and not truncated:
            await self._observe(client, query.qname, ips, ttl)
        if self._snap is snap:  # answers of a replaced snapshot are not kept
            self.wire.put((udp, client.namespace, bytes(data[2:])), wire[2:], steady_until, meta, now)
        c.count(c.responses, RCODE_NAMES.get(rcode, str(rcode)))
        self._event(client, addr, udp, meta, started, ALLOWED)
        return wire

    def _error(self, query: Query, rcode: int) -> bytes:
        self.counters.count(self.counters.responses, RCODE_NAMES[rcode])
        return query_error(query, rcode)

    async def _forward(self, query: Query):
        """The upstream answer to ``query``; one upstream question for everyone asking it at once."""
        key = query.key
        shared = self._inflight.get(key)
        if shared is not None:
            return await asyncio.shield(shared)
        if len(self._inflight) >= MAX_INFLIGHT:
            raise UpstreamError("overload", f"{MAX_INFLIGHT} questions already wait on upstreams")
        future = asyncio.get_running_loop().create_future()
        self._inflight[key] = future
        try:
            reply = await self.upstreams.ask(query)
        except UpstreamError as e:
            future.set_exception(e)
            future.exception()  # retrieved: nobody else may be waiting
            raise
        except BaseException as e:
            future.set_exception(UpstreamError("error", str(e)))
            future.exception()
            raise
        else:
            future.set_result(reply)
            return reply
        finally:
            del self._inflight[key]

    async def _observe(self, client: DnsClient, qname: str, ips: tuple[str, ...], ttl: int) -> None:
        hook, fast = self._hook, self._observed_fast
        try:
            if fast is not None and fast(client, qname, ips, ttl):
                return
            loop = asyncio.get_running_loop()
            await asyncio.wait_for(loop.run_in_executor(self._pool, hook.observed, client, qname, ips, ttl),
                                   OBSERVE_TIMEOUT_S)
        except TimeoutError:
            log.warning("DNS policy hook took over %.1fs for %s (%s): answered anyway", OBSERVE_TIMEOUT_S, qname,
                        client.name)
        except Exception:
            log.exception("DNS policy hook failed for %s (%s): answered anyway", qname, client.name)

    def _event(self, client: DnsClient, addr: tuple, udp: bool, answer: DnsAnswer, started_ns: int,
               verdict: DnsVerdict) -> None:
        if self.on_events is None:
            return
        protocol = "UDP" if udp else "TCP"
        server = self._server
        if self.original_dst is not None:
            try:
                server = self.original_dst(addr[0], addr[1], protocol) or server
            except Exception:
                log.exception("DNS proxy: original destination of %s failed", addr)
        events = self._events
        now_ns = time.monotonic_ns()
        events.append((now_ns + self._wall_offset_ns, client, addr[1], server, protocol, answer,
                       now_ns - started_ns, verdict))
        if len(events) == 1:
            asyncio.get_running_loop().call_later(EVENT_FLUSH_S, self._flush)
        elif len(events) >= EVENT_BATCH_MAX:
            self._flush()

    def _flush(self) -> None:
        """Hand the events gathered since the last flush to the agent (one call: one lock for the lot)."""
        events, self._events = self._events, []
        if events and self.on_events is not None:
            try:
                self.on_events(events)
            except Exception:
                log.exception("DNS proxy: recording %d flows failed", len(events))
