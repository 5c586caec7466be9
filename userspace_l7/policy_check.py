"""Fast denial: the kernel's policy verdict on an upstream connection, asked before it is dialled.

The processor connects to a backend with the client's mark (origdst.upstream_mark), and the
backend's TC program decides the SYN as if the client had connected itself (bpf/policy.c,
`policy_can_access_proxied`): the client's egress policy towards the backend's identity and port,
then the backend's ingress policy from the client's identity. A denied SYN is dropped without an
answer, so without this module the client would wait out the connect timeout (10 s per attempt)
for a 503. Here the same decision is made first, from the same pinned maps and with the same code
(agent/policy/lookup.py `decide_proxied`, whose longest match is the kernel's own LPM trie lookup
with a full-length key), and a denied request is answered 403 at once (flags.UAEX).

What is looked at, and where it comes from:

- the client: its endpoint id (the datapath names it for each redirected connection, origdst.py),
  its identity and egress enforcement from the pinned ``endpoints_by_id`` (what to_container reads
  for the mark);
- the backend: its endpoint id by address from the snapshot (``clients``: this node's endpoints,
  agent/l7_snapshot.py), checked against the kernel's ``endpoints_by_id`` entry (same address);
  its identity and ingress enforcement from there. A backend that is not an endpoint of this node
  is not decided by this node's datapath at all (the mark does not cross nodes; a ServiceEntry's
  upstream leaves from the node's address): nothing is denied here either, as the kernel denies
  nothing. An identity-only client (MARK_MAGIC_IDENTITY) meets the backend's ingress policy alone;
- the entries: the pinned LPM trie ``policy``, one lookup per (endpoint, direction, identity);
- NetworkPolicy ipBlocks: each side's address in the pinned LPM trie ``ipblock_cidrs`` (a flow
  no entry of the peer's identity allows may be allowed by an ipBlock holding the peer's address).

Caching: a decision holds for one *generation*, which moves when the kernel's policy revision moves
(``config``: the agent bumps it after every change to the policy map, the ipcache or the endpoint
tables) or the snapshot is replaced. The revision is read on the proxy's timer (every 0.25 s), not
per request; an allow is remembered by the upstream pool it was made for (BackendPool.admitted),
so a request pays one attribute compare. A denial re-reads the revision before it is answered, so a
policy change that allows a flow is never answered with a stale 403; a change that denies one can
let requests through for up to a timer period, and the kernel still drops those (the silent drop:
503 UF after the connect timeout, unless a re-check after that failure finds the deny).
"""

from __future__ import annotations

import ctypes as ct
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass

from agent.datapath.libbpf import libbpf
from agent.datapath.maps import (
    EP_F_AUDIT,
    EP_F_ENFORCE,
    POLICY_F_AUDIT,
    DatapathConfigC,
    EndpointInfoC,
    IpcacheEntryC,
    IpcacheKeyC,
    PolicyEntryC,
    PolicyKeyC,
    be32_to_ip,
    ip_to_be32,
)
from agent.datapath.reasons import MATCH_TYPES, reason_name
from agent.policy.lookup import DENIED, LongestMatch, Party, Verdict, decide, decide_proxied
from agent.policy.types import EGRESS, INGRESS, Action, Enforcement, PolicyEntry

__all__ = ["OPEN", "Denial", "KernelPolicy", "OpenGate", "PolicyGate", "enforcement_of"]

TCP = socket.IPPROTO_TCP
POLICY_FULL_PREFIX = 96  # bpf/lib/policy.h: a full-length key; the trie answers with the longest match
# bpf/lib/drop_reasons.h: DROP_POLICY, DROP_POLICY_DENY, DROP_POLICY_CLIENT_EGRESS
POLICY_DENIED, POLICY_DENY, POLICY_DENIED_CLIENT_EGRESS = reason_name(133), reason_name(181), reason_name(183)
MAX_CACHED = 4096


@dataclass(frozen=True)
class Denial:
    """A flow the kernel would drop: who decided, by which rule, as its drop flow would say."""

    rule_id: int
    direction: int  # EGRESS: the client's egress policy; INGRESS: the backend's ingress policy
    reason: str  # drop_reason_desc, as the kernel names this drop
    match: str

    @property
    def direction_name(self) -> str:
        return "EGRESS" if self.direction == EGRESS else "INGRESS"


def enforcement_of(info: EndpointInfoC, direction: int) -> Enforcement:
    """An endpoint_info's enforcement in ``direction`` (EP_F_* flags and its default-deny rule)."""
    return Enforcement(enforced=bool(info.flags & EP_F_ENFORCE[direction]),
                       audit=bool(info.flags & EP_F_AUDIT[direction]),
                       rule_id=info.deny_rule_ingress if direction == INGRESS else info.deny_rule_egress)


class KernelPolicy:
    """The node's pinned policy maps, read through libbpf (no BCC): what `PolicyGate` decides on."""

    def __init__(self, bpffs_dir: str) -> None:
        self.bpffs_dir = bpffs_dir
        self._fds: dict[str, int] = {}
        self._lib = libbpf()
        self._revision = -1

    def _fd(self, name: str) -> int:
        fd = self._fds.get(name)
        if fd is None:
            path = os.path.join(self.bpffs_dir, name)
            fd = self._lib.bpf_obj_get(path.encode())
            if fd < 0:
                raise OSError(-fd, f"cannot open the pinned map {path}: {os.strerror(-fd)}")
            self._fds[name] = fd
        return fd

    def revision(self) -> int:
        """The policy revision. The config pin is opened afresh each time (three syscalls, on the proxy's
        timer): an agent may replace it (agent/datapath/tc.py retires a config map of an older layout),
        and the processor outlives agents. When the revision moves, the other maps are opened again
        at their next use, in case they were replaced too."""
        path = os.path.join(self.bpffs_dir, "config").encode()
        fd = self._lib.bpf_obj_get(path)
        if fd < 0:
            raise OSError(-fd, f"cannot open the pinned map {path.decode()}: {os.strerror(-fd)}")
        try:
            value, zero = DatapathConfigC(), ct.c_uint32(0)
            if self._lib.bpf_map_lookup_elem(fd, ct.byref(zero), ct.byref(value)) != 0:
                return -1
        finally:
            os.close(fd)
        if value.policy_revision != self._revision:
            self._revision = value.policy_revision
            self.close()
        return value.policy_revision

    def endpoint(self, ep_id: int) -> EndpointInfoC | None:
        key, value = ct.c_uint16(ep_id), EndpointInfoC()
        if self._lib.bpf_map_lookup_elem(self._fd("endpoints_by_id"), ct.byref(key), ct.byref(value)) != 0:
            return None
        return value

    def longest(self, ep_id: int, direction: int, identity: int, proto: int, port: int) \
            -> tuple[str, PolicyEntry] | None:
        """The trie's longest match for one identity (agent.policy.lookup.LongestMatch)."""
        key = PolicyKeyC(prefixlen=POLICY_FULL_PREFIX, ep_id=socket.htons(ep_id), dir=direction,
                         identity=socket.htonl(identity), proto=proto, dport=socket.htons(port))
        value = PolicyEntryC()
        if self._lib.bpf_map_lookup_elem(self._fd("policy"), ct.byref(key), ct.byref(value)) != 0:
            return None
        try:
            action = Action(value.action)
        except ValueError:  # not an entry the agent writes: decide as the kernel would (neither deny nor allow)
            return None
        return MATCH_TYPES.get(value.match, "none"), PolicyEntry(action, bool(value.flags & POLICY_F_AUDIT),
                                                                  value.rule_id)

    def ipblock(self, ip: str) -> int | None:
        """The ipblock_cidrs trie's CIDR identity for ``ip`` (agent.policy.lookup.AddressMatch), or None.
        An agent older than that map pinned none: then no ipBlock matches by address there either."""
        try:
            fd = self._fd("ipblock_cidrs")
        except OSError:
            return None
        key, value = IpcacheKeyC(prefixlen=32, addr=ip_to_be32(ip)), IpcacheEntryC()
        if self._lib.bpf_map_lookup_elem(fd, ct.byref(key), ct.byref(value)) != 0:
            return None
        return value.identity

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


class PolicyGate:
    """Decides proxied flows per (client, backend address) and remembers the decisions for a generation.

    ``kernel``: a `KernelPolicy` (or a stand-in with ``revision``, ``endpoint``, ``longest`` and ``ipblock``).
    ``local_endpoint``: backend IP -> its endpoint id on this node, or None (from the snapshot).
    """

    def __init__(self, kernel: KernelPolicy, local_endpoint: Callable[[str], int | None]) -> None:
        self.kernel = kernel
        self.local_endpoint = local_endpoint
        self.generation = 1
        self._revision = self._read_revision()
        self._cache: dict[tuple[int, int, str, int], Denial | None] = {}

    def _read_revision(self) -> int:
        try:
            return self.kernel.revision()
        except OSError:
            return -1

    def refresh(self) -> bool:
        """Re-read the kernel's policy revision (the proxy's timer); True if decisions were dropped."""
        revision = self._read_revision()
        if revision == self._revision:
            return False
        self._revision = revision
        self.invalidate()
        return True

    def invalidate(self, local_endpoint: Callable[[str], int | None] | None = None) -> None:
        """Forget every decision (a new snapshot, or the revision moved)."""
        if local_endpoint is not None:
            self.local_endpoint = local_endpoint
        self.generation += 1
        self._cache.clear()

    def check(self, client_ep: int | None, client_identity: int | None, ip: str, port: int) -> Denial | None:
        """The kernel's verdict on a TCP flow to ``ip``:``port`` for this client: a `Denial`, or None
        when the kernel would let the SYN through (or would not decide it here). A cached denial is
        re-checked against the current revision before it is returned."""
        key = (client_ep or 0, client_identity or 0, ip, port)
        cache = self._cache
        if key in cache:
            denial = cache[key]
            if denial is None or not self.refresh():
                return denial
        denial = self._decide(client_ep, client_identity, ip, port)
        if len(cache) >= MAX_CACHED:
            cache.clear()
        cache[key] = denial
        return denial

    def _decide(self, client_ep: int | None, client_identity: int | None, ip: str, port: int) -> Denial | None:
        kernel = self.kernel
        backend_ep = self.local_endpoint(ip)
        if backend_ep is None:
            return None  # not an endpoint of this node: no TC program here decides the flow
        try:
            backend = kernel.endpoint(backend_ep)
            if backend is None or be32_to_ip(backend.ip) != ip:
                return None  # the snapshot and the kernel disagree for now: let the kernel decide the SYN
            longest: LongestMatch = kernel.longest
            into = Party(backend_ep, backend.identity, enforcement_of(backend, INGRESS), ip)
            if client_ep:
                client = kernel.endpoint(client_ep)
                if client is None:
                    return None  # the client left: the kernel drops its marked SYN (DROP_NO_ENDPOINT)
                verdict, direction = decide_proxied(
                    longest, Party(client_ep, client.identity, enforcement_of(client, EGRESS), be32_to_ip(client.ip)),
                    into, TCP, port, kernel.ipblock)
            elif client_identity:
                verdict, direction = decide(longest, into.enforcement, backend_ep, INGRESS, client_identity, TCP,
                                            port), INGRESS
            else:
                return None
        except OSError:
            return None  # the maps are not there (yet): the kernel decides at connect time
        return _denial(verdict, direction)


def _denial(v: Verdict, direction: int) -> Denial | None:
    if v.verdict != DENIED:
        return None
    if direction == EGRESS:
        reason = POLICY_DENIED_CLIENT_EGRESS  # as to_container reports a proxied flow the client's policy drops
    else:
        reason = POLICY_DENIED if v.default_deny else POLICY_DENY
    return Denial(v.rule_id, direction, reason, v.match)


class OpenGate:
    """The gate of a processor without the kernel's maps (tests, the bench): it denies nothing, and its
    generation never moves, so pools (admitted 0) are never checked."""

    generation = 0

    def check(self, client_ep: int | None, client_identity: int | None, ip: str, port: int) -> Denial | None:
        return None

    def refresh(self) -> bool:
        return False

    def invalidate(self, local_endpoint: Callable[[str], int | None] | None = None) -> None:
        pass


OPEN = OpenGate()
