"""The server's request paths in process: fake transports, pooled upstream connections put in by hand."""

import asyncio

from userspace_l7.pool import UpstreamConnection
from userspace_l7.server import ClientConnection, Proxy
from userspace_l7.snapshot import PoolLimits

from .helpers import SUBSETS, config, dr, vs

OK = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"
UNAVAILABLE = b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\n\r\n"


class FakeTransport:
    def __init__(self, peer=("10.0.0.5", 40000), local=("10.96.0.10", 9080)):
        self.out = b""
        self.closed = False
        self.extra = {"peername": peer, "sockname": local, "socket": None}

    def get_extra_info(self, key, default=None):
        return self.extra.get(key, default)

    def write(self, data):
        self.out += data

    def is_closing(self):
        return self.closed

    def close(self):
        self.closed = True

    def pause_reading(self):
        pass

    def resume_reading(self):
        pass


def setup(retries=None, n_idle=1):
    route = {"route": [{"destination": {"host": "reviews", "subset": "v1"}}]}
    if retries is not None:
        route["retries"] = retries
    proxy = Proxy(config([vs("r", ["reviews"], [route])], [dr("d", "reviews", SUBSETS)]))
    client = ClientConnection(proxy)
    client.connection_made(FakeTransport())
    pool = proxy.pools.get(("10.200.0.1", 9080), PoolLimits())
    ups = []
    for _ in range(n_idle):
        up = UpstreamConnection(proxy.loop)
        up.connection_made(FakeTransport())
        up.idle_since = proxy.loop.time()
        pool.open += 1
        pool.idle.append(up)
        ups.append(up)
    return proxy, client, pool, ups


def test_fast_path_forwards_and_returns_the_connection():
    async def run():
        proxy, client, pool, (up,) = setup()
        client.data_received(b"GET /a HTTP/1.1\r\nHost: reviews\r\nConnection: keep-alive\r\n\r\n")
        assert up.transport.out == b"GET /a HTTP/1.1\r\nhost: reviews\r\n\r\n"
        assert client.busy and not pool.idle
        up.data_received(OK)
        assert client.transport.out == b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"
        assert not client.busy and pool.idle == [up] and up.reader.sink is None
        assert len(proxy.flows.pending) == 1 and proxy.flows.pending[0][4] == 200

    asyncio.run(run())


def test_a_status_to_retry_goes_to_the_coroutine_path():
    async def run():
        proxy, client, pool, (first, second) = setup({"attempts": 1, "retryOn": "5xx"}, n_idle=2)
        client.data_received(b"GET /r HTTP/1.1\r\nHost: reviews\r\n\r\n")
        used = first if first.transport.out else second
        other = second if used is first else first
        used.data_received(UNAVAILABLE)
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert other.transport.out.startswith(b"GET /r ")  # the retry, on the other pooled connection
        other.data_received(OK)
        await asyncio.sleep(0)
        assert client.transport.out.endswith(b"\r\n\r\nok") and b" 200 OK" in client.transport.out
        assert not client.busy

    asyncio.run(run())


def test_a_stale_connection_is_retried_on_another():
    async def run():
        proxy, client, pool, (first, second) = setup(n_idle=2)
        client.data_received(b"GET /s HTTP/1.1\r\nHost: reviews\r\n\r\n")
        used = first if first.transport.out else second
        other = second if used is first else first
        used.connection_lost(None)  # closed by the peer before any response byte
        for _ in range(3):
            await asyncio.sleep(0)
        assert other.transport.out.startswith(b"GET /s ")
        other.data_received(OK)
        await asyncio.sleep(0)
        assert b" 200 OK" in client.transport.out and pool.idle == [other]

    asyncio.run(run())


def test_a_response_cut_after_its_head_closes_the_client():
    async def run():
        proxy, client, pool, (up,) = setup()
        client.data_received(b"GET / HTTP/1.1\r\nHost: reviews\r\n\r\n")
        up.data_received(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nabc")
        up.connection_lost(None)
        assert client.transport.out.endswith(b"abc") and client.transport.closed
        assert pool.open == 0

    asyncio.run(run())


def test_pipelined_requests_are_answered_in_order():
    async def run():
        proxy, client, pool, (up,) = setup()
        client.data_received(b"GET /1 HTTP/1.1\r\nHost: reviews\r\n\r\nGET /2 HTTP/1.1\r\nHost: nowhere\r\n\r\n"
                             b"GET /3 HTTP/1.1\r\nHost: reviews\r\n\r\n")
        assert up.transport.out.startswith(b"GET /1 ") and client.transport.out == b""
        up.transport.out = b""
        up.data_received(OK)
        # /2 has no route: answered at once; /3 goes out on the same connection
        assert client.transport.out.count(b"HTTP/1.1 ") == 2 and b"404" in client.transport.out
        assert up.transport.out.startswith(b"GET /3 ")
        up.data_received(OK)
        assert client.transport.out.count(b"HTTP/1.1 200") == 2 and not client.busy

    asyncio.run(run())


def test_the_fast_path_benchmark_runs():
    from .bench_fastpath import run

    # Its timing is printed by `python -m tests.unit.userspace_l7.bench_fastpath`, not tested.
    _, upstream, client = run(50)
    assert upstream == b"GET /productpage HTTP/1.1\r\nhost: bench\r\nuser-agent: wrk\r\naccept: */*\r\n\r\n"
    assert client == b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 6\r\n\r\nhello\n"


def test_a_head_in_one_chunk_arms_no_header_timer():
    async def run():
        proxy, client, pool, (up,) = setup()
        timer = client._timer
        client.data_received(b"GET /a HTTP/1.1\r\nHost: reviews\r\n\r\n")
        up.data_received(OK)
        assert client._timer is timer and client._timer_kind == "idle"  # the idle deadline moved, no new handle
        client.data_received(b"GET /a HTTP/1.1\r\nHost: rev")
        assert client._timer_kind == "header" and client._deadline < proxy.loop.time() + 11

    asyncio.run(run())
