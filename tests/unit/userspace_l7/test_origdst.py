"""The processor's side of the kernel redirect without a kernel: map layouts, proxy marks, the
resolver's decoding and refusal, and upstream pools kept apart per mark."""

from __future__ import annotations

import asyncio
import re
import socket

import pytest

from tests.paths import BPF
from userspace_l7 import origdst
from userspace_l7.pool import Pools
from userspace_l7.snapshot import PoolLimits


def test_mark_constants_match_common_h():
    text = (BPF / "lib" / "common.h").read_text()
    for name in ("MARK_MAGIC_MASK", "MARK_MAGIC_IDENTITY", "MARK_IDENTITY_MASK", "MARK_MAGIC_PROXY_EGRESS",
                 "MARK_EP_ID_MASK"):
        value = int(re.search(rf"#define {name}\s+(0x[0-9A-Fa-f]+)", text).group(1), 16)
        assert getattr(origdst, name) == value, name


def test_upstream_mark_round_trip():
    assert origdst.upstream_mark(1003) == 0x0E0003EB
    assert origdst.identity_of_mark(origdst.upstream_mark(0xFFFFFF)) == 0xFFFFFF
    assert origdst.identity_of_mark(0x0F0003EB) is None, "another magic"
    assert origdst.identity_of_mark(0x0E000000) is None, "identity 0 is no identity"
    assert origdst.identity_of_mark(0) is None


@pytest.mark.parametrize("identity", [0, -1, 1 << 24, "5", None])
def test_identities_that_do_not_fit_a_mark(identity):
    with pytest.raises(ValueError):
        origdst.upstream_mark(identity)


def test_a_local_client_is_marked_by_its_endpoint():
    """With the client's ep_id the mark names the endpoint (its egress policy applies upstream),
    whatever the identity; the two kinds of mark never read as each other."""
    mark = origdst.upstream_mark(1003, 7)
    assert mark == 0x0B000007
    assert origdst.endpoint_of_mark(mark) == 7 and origdst.identity_of_mark(mark) is None
    assert origdst.endpoint_of_mark(origdst.upstream_mark(1003)) is None
    assert origdst.endpoint_of_mark(0x0B010007) is None, "bits 16..23 must be zero"
    assert origdst.endpoint_of_mark(0x0B000000) is None, "ep_id 0 is no endpoint"
    assert origdst.upstream_mark(1003, 7) != origdst.upstream_mark(1003, 8), "clients never share a pool"


@pytest.mark.parametrize("ep_id", [0, -1, 1 << 16, "7"])
def test_endpoint_ids_that_do_not_fit_a_mark(ep_id):
    with pytest.raises(ValueError):
        origdst.upstream_mark(1003, ep_id)


def test_key_and_decode():
    key = origdst.client_key("10.244.7.21", 40000)
    assert bytes(key) == socket.inet_aton("10.244.7.21") + (40000).to_bytes(2, "big") + b"\0\0"
    value = origdst.L7OrigDstC(vip=int.from_bytes(socket.inet_aton("10.96.0.10"), "little"),
                               port=socket.htons(80), ep_id=3, identity=1003)
    dst = origdst.decode(value, {1003: "client"}.get)
    assert (dst.ip, dst.port, dst.source_identity, dst.source_workload) == ("10.96.0.10", 80, 1003, "client")
    assert dst.source_ep_id == 3
    assert origdst.decode(value).source_workload == "unknown"


class FakeSock:
    def __init__(self, peer, family=socket.AF_INET):
        self.peer, self.family = peer, family

    def getpeername(self):
        return self.peer


def test_resolver_looks_up_the_peer(monkeypatch):
    seen = []
    resolver = origdst.KernelOriginalDstResolver("/nonexistent", identity_names={1003: "client"})
    value = origdst.L7OrigDstC(vip=int.from_bytes(socket.inet_aton("10.96.0.10"), "little"),
                               port=socket.htons(80), identity=1003)
    monkeypatch.setattr(resolver, "take", lambda ip, port: seen.append((ip, port)) or value)
    assert resolver.resolve(FakeSock(("10.244.7.21", 40000))).source_workload == "client"
    assert resolver.resolve(FakeSock(("::ffff:10.244.7.21", 40001, 0, 0), socket.AF_INET6)).port == 80
    assert resolver.resolve(FakeSock(("fd00::1", 40002, 0, 0), socket.AF_INET6)) is None
    assert seen == [("10.244.7.21", 40000), ("10.244.7.21", 40001)]


def test_resolver_without_its_map_resolves_nothing():
    resolver = origdst.KernelOriginalDstResolver("/nonexistent")
    assert resolver.required
    assert resolver.resolve(FakeSock(("10.244.7.21", 40000))) is None


def test_pools_are_kept_apart_per_mark():
    async def main():
        pools = Pools(asyncio.get_running_loop())
        limits = PoolLimits()
        plain = pools.get(("10.0.0.1", 80), limits)
        a = pools.get(("10.0.0.1", 80), limits, origdst.upstream_mark(1003))
        b = pools.get(("10.0.0.1", 80), limits, origdst.upstream_mark(1004))
        assert len({id(plain), id(a), id(b)}) == 3
        assert pools.get(("10.0.0.1", 80), limits, origdst.upstream_mark(1003)) is a
        assert (plain.mark, a.mark) == (0, 0x0E0003EB)
        pools.retain([("10.0.0.2", 80)])
        assert pools.get(("10.0.0.1", 80), limits, a.mark) is not a, "a backend that left loses all its pools"

    asyncio.run(main())


def test_marked_connections_carry_the_mark():
    """A marked pool's connections have SO_MARK set (as root; needs CAP_NET_ADMIN)."""
    import os
    if os.geteuid() != 0:
        pytest.skip("SO_MARK needs CAP_NET_ADMIN")

    async def main():
        loop = asyncio.get_running_loop()
        server = await loop.create_server(asyncio.Protocol, "127.0.0.1", 0)
        try:
            pools = Pools(loop)
            pool = pools.get(server.sockets[0].getsockname()[:2], PoolLimits(), origdst.upstream_mark(1003))
            conn, reused = await pool.acquire()
            sock = conn.transport.get_extra_info("socket")
            assert not reused and sock.getsockopt(socket.SOL_SOCKET, origdst.SO_MARK) == 0x0E0003EB
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
            pool.release(conn)
            assert (await pool.acquire())[0] is conn
            pool.discard(conn)
        finally:
            server.close()

    asyncio.run(main())
