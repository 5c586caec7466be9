"""Original destination and client identity of redirected connections, from the datapath.

A client in an endpoint connects to an L7 service's VIP; the connect hook of bpf/redirect.c sends
the connection to this processor instead and the sockops program files what it was going to, and
who asked, under the client's address in the pinned `l7_origdst` map (bpf/lib/lb.h):

    key   struct l7_client_key {u32 ip (network order), u16 port (network order), u16 pad}
    value struct l7_origdst    {u32 vip (network order), u16 port (network order), u16 ep_id,
                                u32 identity, u32 pad}

The processor accepts the connection, whose peer address is exactly that key, takes the entry out
(lookup and delete in one syscall, so an entry is used once) and routes by VIP:port.

Towards the backend the processor marks its upstream socket with the client's endpoint (SO_MARK,
`upstream_mark`: MARK_MAGIC_PROXY_EGRESS | ep_id). The backend's TC program (bpf/policy.c,
to_container) then decides on the client rather than on the host the proxied connection comes
from, with both policies a direct connection would meet: the client's egress policy towards the
backend and the backend's ingress policy from the client's identity. A peer known only by its
identity (no endpoint on this node) gets MARK_MAGIC_IDENTITY | identity, and only the backend's
ingress policy applies. A connection marked for one client is never reused for another (the
upstream pools are keyed by mark, userspace_l7/pool.py).

Use:

    resolver = KernelOriginalDstResolver("/sys/fs/bpf/meshagent/n1")
    await serve(config_path, "10.200.0.1", 15001, resolver=resolver)

Needs root (CAP_BPF) and the node's bpffs in the process's mount namespace: run the processor in
the node's network namespace only (nsenter --net), not under `ip netns exec` (KERNEL-NOTES).
"""

from __future__ import annotations

import ctypes as ct
import errno
import os
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

from agent.datapath.libbpf import libbpf
from agent.datapath.maps import L7ClientKeyC, L7OrigDstC, be32_to_ip, ip_to_be32

__all__ = ["KernelOriginalDstResolver", "MARK_MAGIC_IDENTITY", "MARK_MAGIC_MASK", "MARK_IDENTITY_MASK",
           "MARK_MAGIC_PROXY_EGRESS", "MARK_EP_ID_MASK", "OriginalDst", "OriginalDstResolver", "SourceAddressResolver",
           "endpoint_of_mark", "identity_of_mark", "upstream_mark"]


@dataclass(frozen=True, slots=True)
class OriginalDst:
    """Where a redirected connection was going, and who sent it: what a resolver gives the server."""

    ip: str  # "": not known (route by the Host header)
    port: int
    source_workload: str = "unknown"
    source_principal: str = ""  # spiffe://... once mTLS lands
    source_identity: int | None = None  # the client's security identity, from the datapath
    source_ep_id: int | None = None  # the client's endpoint on this node: its egress policy applies upstream


class OriginalDstResolver(Protocol):
    """Where a redirected connection was going (and who sent it). Called once per accepted
    connection with its socket; None: fall back to the Host header of each request, unless the
    resolver has a true ``required`` attribute: then the connection is closed."""

    def resolve(self, sock: socket.socket) -> OriginalDst | None: ...


# bpf/lib/common.h, proxy marks: MARK_MAGIC_PROXY_EGRESS | ep_id (a client endpoint of this node),
# or MARK_MAGIC_IDENTITY | identity (a peer known by its identity only; identities are < 2^24).
MARK_MAGIC_MASK = 0xFF000000
MARK_MAGIC_IDENTITY = 0x0E000000
MARK_IDENTITY_MASK = 0x00FFFFFF
MARK_MAGIC_PROXY_EGRESS = 0x0B000000
MARK_EP_ID_MASK = 0x0000FFFF

SO_MARK = getattr(socket, "SO_MARK", 36)
MAP_NAME = "l7_origdst"
ENOTSUPP = 524  # the kernel's, not in Python's errno


def upstream_mark(identity: int | None, ep_id: int | None = None) -> int:
    """The SO_MARK the processor sets on an upstream socket that carries one client's traffic.

    With the client's endpoint ``ep_id`` (a client on this node, as the datapath's redirect always
    names it): a proxy-egress mark, so the client's egress policy applies as well as the backend's
    ingress policy. Without: an identity mark for ``identity``, and only the backend's ingress
    policy applies. Raises ValueError for values that do not fit: never send such a connection."""
    if ep_id is not None:
        if not isinstance(ep_id, int) or not 0 < ep_id <= MARK_EP_ID_MASK:
            raise ValueError(f"endpoint id {ep_id!r} does not fit a proxy mark (1 .. {MARK_EP_ID_MASK})")
        return MARK_MAGIC_PROXY_EGRESS | ep_id
    if not isinstance(identity, int) or not 0 < identity <= MARK_IDENTITY_MASK:
        raise ValueError(f"identity {identity!r} does not fit an identity mark (1 .. {MARK_IDENTITY_MASK})")
    return MARK_MAGIC_IDENTITY | identity


def identity_of_mark(mark: int) -> int | None:
    """The identity an identity mark carries, or None for any other mark (what to_container does)."""
    if mark & MARK_MAGIC_MASK != MARK_MAGIC_IDENTITY or not mark & MARK_IDENTITY_MASK:
        return None
    return mark & MARK_IDENTITY_MASK


def endpoint_of_mark(mark: int) -> int | None:
    """The client ep_id a proxy-egress mark carries, or None for any other mark (what to_container
    does: bits 16..23 must be zero)."""
    if mark & ~MARK_EP_ID_MASK != MARK_MAGIC_PROXY_EGRESS or not mark & MARK_EP_ID_MASK:
        return None
    return mark & MARK_EP_ID_MASK


def client_key(ip: str, port: int) -> L7ClientKeyC:
    """The map key for a connection whose peer is ``ip``:``port``."""
    return L7ClientKeyC(ip=ip_to_be32(ip), port=socket.htons(port))


def decode(value: L7OrigDstC, names: Callable[[int], str] | None = None) -> OriginalDst:
    vip = be32_to_ip(value.vip)
    identity = value.identity or None
    workload = (names(identity) if names is not None and identity is not None else None) or "unknown"
    return OriginalDst(ip=vip, port=socket.ntohs(value.port), source_workload=workload,
                              source_identity=identity, source_ep_id=value.ep_id or None)


def _peer_v4(sock: socket.socket) -> tuple[str, int] | None:
    try:
        peer = sock.getpeername()
    except OSError:
        return None
    ip, port = peer[0], peer[1]
    if sock.family == socket.AF_INET6:  # a dual-stack listener: ::ffff:a.b.c.d
        if not ip.startswith("::ffff:") or "." not in ip:
            return None
        ip = ip[len("::ffff:"):]
    return ip, port


class KernelOriginalDstResolver:
    """OriginalDstResolver over the datapath's pinned `l7_origdst` map.

    ``required``: a connection the datapath did not redirect (nothing filed for its peer, e.g. an
    endpoint dialling the processor's address itself) is refused (the server closes it) instead of
    being routed by its Host header: the datapath admits every connection to the processor without
    egress policy, so the processor must only serve the ones a service VIP sent it.
    ``identity_names``: optional identity -> workload name, for flows and metrics.
    """

    def __init__(self, bpffs_dir: str, *, required: bool = True,
                 identity_names: Mapping[int, str] | Callable[[int], str] | None = None) -> None:
        self.path = os.path.join(bpffs_dir, MAP_NAME)
        self.required = required
        if isinstance(identity_names, Mapping):
            table = identity_names
            self._names: Callable[[int], str] | None = lambda i: table.get(i, "unknown")
        else:
            self._names = identity_names
        self._fd = -1
        self._atomic = True  # BPF_MAP_LOOKUP_AND_DELETE_ELEM on (LRU) hash maps: kernel >= 5.14

    def open(self) -> None:
        """Open the pinned map (done on first use; raises OSError if it is not there)."""
        if self._fd >= 0:
            return
        fd = libbpf().bpf_obj_get(self.path.encode())
        if fd < 0:
            raise OSError(-fd, f"cannot open the pinned map {self.path}: {os.strerror(-fd)}")
        self._fd = fd

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def take(self, ip: str, port: int) -> L7OrigDstC | None:
        """Look up and delete the entry of the client ``ip``:``port``; None if there is none."""
        self.open()
        key, value = client_key(ip, port), L7OrigDstC()
        lib = libbpf()
        if self._atomic:
            ret = lib.bpf_map_lookup_and_delete_elem(self._fd, ct.byref(key), ct.byref(value))
            if ret == 0:
                return value
            if -ret not in (errno.EINVAL, errno.EOPNOTSUPP, ENOTSUPP):
                return None  # ENOENT: not redirected (or the entry aged out)
            self._atomic = False
        if lib.bpf_map_lookup_elem(self._fd, ct.byref(key), ct.byref(value)) != 0:
            return None
        lib.bpf_map_delete_elem(self._fd, ct.byref(key))
        return value

    def resolve(self, sock: socket.socket) -> OriginalDst | None:
        peer = _peer_v4(sock)
        if peer is None:
            return None
        try:
            value = self.take(*peer)
        except OSError:
            return None
        return decode(value, self._names) if value is not None else None


class SourceAddressResolver:
    """Names the client endpoint of a connection by its source address alone, from a fixed table
    (``{"127.0.0.2": 7}``), with no kernel: for tests and the bench on loopback, where there is no
    redirect (the original destination stays unknown: requests are routed by their Host header, and
    no identity or mark is given). Never for a real node: the source address is the peer's word."""

    required = False

    def __init__(self, endpoints: Mapping[str, int]) -> None:
        self.endpoints = dict(endpoints)

    @classmethod
    def parse(cls, text: str) -> SourceAddressResolver:
        """``"127.0.0.2=7,127.0.0.3=8"``."""
        table = {}
        for item in filter(None, (p.strip() for p in text.split(","))):
            ip, sep, ep_id = item.partition("=")
            if not sep or not ep_id.isdigit() or not 0 < int(ep_id) <= MARK_EP_ID_MASK:
                raise ValueError(f"{item!r}: write IP=EP_ID (1 .. {MARK_EP_ID_MASK})")
            table[ip.strip()] = int(ep_id)
        return cls(table)

    def resolve(self, sock: socket.socket) -> OriginalDst | None:
        try:
            ip = sock.getpeername()[0]
        except OSError:
            return None
        ep_id = self.endpoints.get(ip)
        return OriginalDst("", 0, source_ep_id=ep_id) if ep_id is not None else None
