"""Microbenchmark of the processor's fast path, in process: fake transports, one pooled upstream
connection, N keep-alive requests through ClientConnection -> Proxy.serve -> Exchange and back.

    .venv/bin/python -m tests.unit.userspace_l7.bench_fastpath [N] [--profile]

Prints µs of Python per request (no sockets, no event loop turns: the floor of the real path).
`tests/unit/userspace_l7/test_server_fastpath.py` runs it with a small N to keep it working; it asserts no times.
"""

from __future__ import annotations

import asyncio
import sys
import time

from userspace_l7.flow_export import FlowSink
from userspace_l7.pool import UpstreamConnection
from userspace_l7.server import ClientConnection, Proxy
from userspace_l7.snapshot import L7Config, PoolLimits

# What wrk sends and what the bench's haproxy backend answers (bench/l7.py).
REQUEST = b"GET /productpage HTTP/1.1\r\nHost: bench\r\nUser-Agent: wrk\r\nAccept: */*\r\n\r\n"
RESPONSE = b"HTTP/1.1 200 OK\r\ncontent-length: 6\r\ncontent-type: text/plain\r\n\r\nhello\n"
BACKEND = ("10.200.0.1", 8080)


def bench_config() -> L7Config:
    """bench/l7.py's processor config: a /v2/ prefix route that never matches, then the catch-all."""
    vs = {"apiVersion": "networking.istio.io/v1", "kind": "VirtualService",
          "metadata": {"name": "bench", "namespace": "default"},
          "spec": {"hosts": ["bench"], "http": [
              {"name": "v2", "match": [{"uri": {"prefix": "/v2/"}}], "route": [{"destination": {"host": "bench"}}]},
              {"name": "default", "route": [{"destination": {"host": "bench"}}]}]}}
    return L7Config.from_dict({
        "services": [{"name": "bench", "namespace": "default", "vip": "10.96.0.20",
                      "ports": [{"port": 80, "target_port": BACKEND[1]}],
                      "backends": [{"ip": BACKEND[0], "workload": "bench-backend", "labels": {"app": "bench"}}]}],
        "virtual_services": [vs], "destination_rules": []})


class _Sink:
    """A transport that keeps only the last write (the benchmark checks it, never accumulates)."""

    def __init__(self, peer: tuple[str, int] = ("10.0.0.5", 40000), local: tuple[str, int] = ("10.96.0.20", 80)):
        self.last = b""
        self.closed = False
        self.extra = {"peername": peer, "sockname": local, "socket": None}

    def get_extra_info(self, key: str, default=None):
        return self.extra.get(key, default)

    def write(self, data: bytes) -> None:
        self.last = data

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


def run(n: int = 100_000) -> tuple[float, bytes, bytes]:
    """Drive ``n`` requests; returns (µs per request, last bytes sent upstream, last bytes to the client)."""

    async def main() -> tuple[float, bytes, bytes]:
        proxy = Proxy(bench_config(), flows=FlowSink("/dev/null"))  # flow lines formatted, then dropped
        client = ClientConnection(proxy)
        client.connection_made(_Sink())
        pool = proxy.pools.get(BACKEND, PoolLimits())
        up = UpstreamConnection(proxy.loop)
        up.connection_made(_Sink(BACKEND, ("10.0.0.1", 50000)))
        up.idle_since = proxy.loop.time()
        pool.open += 1
        pool.idle.append(up)
        flows = proxy.flows
        client_in, up_in = client.data_received, up.data_received
        t0 = time.perf_counter()
        for i in range(n):
            client_in(REQUEST)
            up_in(RESPONSE)
            if i & 4095 == 0:
                flows.flush()  # as the flush timer does
        dt = time.perf_counter() - t0
        if client.busy or pool.idle != [up]:
            raise AssertionError("the fast path did not complete a request")
        proxy.close()
        return dt / n * 1e6, up.transport.last, client.transport.last

    try:
        import uvloop  # what `python -m userspace_l7` runs on
    except ImportError:
        return asyncio.run(main())
    return uvloop.run(main())


def opcodes(n: int = 200) -> float:
    """Python bytecodes executed per request (our code and what it calls in Python): a count that, unlike
    times, a busy machine does not blur. C functions (httptools, uvloop) count as the one call."""

    def counted(requests: int) -> int:
        count = 0

        def tracer(frame, event, arg):
            nonlocal count
            frame.f_trace_opcodes = True
            if event == "opcode":
                count += 1
            return tracer

        sys.settrace(tracer)
        try:
            run(requests)
        finally:
            sys.settrace(None)
        return count

    run(50)  # warm the caches: first requests build them
    return (counted(2 * n) - counted(n)) / n  # the difference leaves the harness's own setup out


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("-")]
    count = int(args[0]) if args else 100_000
    if "--opcodes" in sys.argv:
        print(f"fast path: {opcodes():.0f} Python bytecodes/request")
    elif "--profile" in sys.argv:
        import cProfile
        import pstats

        cProfile.run("run(count)", "/tmp/l7_fastpath.prof")
        pstats.Stats("/tmp/l7_fastpath.prof").sort_stats("tottime").print_stats(25)
    else:
        run(2000)  # warm the caches
        best = min(run(count)[0] for _ in range(5))
        print(f"fast path: {best:.2f} µs/request (best of 5 x {count})")
