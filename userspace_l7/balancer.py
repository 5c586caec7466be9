"""Load balancing inside one cluster (service, port, subset): a small picker per cluster, and the
cluster's outlier detector in front of it. No I/O.

    state = clusters.get(decision.cluster)          # ClusterStates: one ClusterState per cluster key
    backend = state.pick(tried=())                  # None: no healthy upstream
    backend = state.pick(key="user-42")             # CONSISTENT_HASH: the request's hash key
    state.started(backend); ...; state.finished(backend, status)

Pickers: ROUND_ROBIN (in order), RANDOM (injected rng), LEAST_REQUEST (Envoy's default: the less
busy of two random choices), CONSISTENT_HASH (Envoy's ring hash: `HashRing`). PASSTHROUGH is served
as RANDOM: the processor always knows the backends.
"""

from __future__ import annotations

import hashlib
import random
import time
from bisect import bisect_left
from collections.abc import Callable, Sequence

from .outlier import OutlierDetector
from .snapshot import Cluster, ClusterKey, UpstreamHost

__all__ = ["ClusterState", "ClusterStates", "LeastRequest", "Picker", "RandomPick", "RoundRobin", "make_picker"]


def _address(b: UpstreamHost) -> tuple[str, int]:
    return (b.ip, b.port)


class Picker:
    def pick(self, hosts: Sequence[UpstreamHost]) -> UpstreamHost:
        raise NotImplementedError

    def started(self, host: UpstreamHost) -> None:
        pass

    def finished(self, host: UpstreamHost) -> None:
        pass


class RoundRobin(Picker):
    __slots__ = ("_next",)

    def __init__(self, rng: random.Random) -> None:
        self._next = rng.randrange(1 << 16)  # workers start at different hosts

    def pick(self, hosts: Sequence[UpstreamHost]) -> UpstreamHost:
        self._next += 1
        return hosts[self._next % len(hosts)]


class RandomPick(Picker):
    __slots__ = ("_rng",)

    def __init__(self, rng: random.Random) -> None:
        self._rng = rng

    def pick(self, hosts: Sequence[UpstreamHost]) -> UpstreamHost:
        return hosts[self._rng.randrange(len(hosts))]


class LeastRequest(Picker):
    __slots__ = ("_rng", "_active")

    def __init__(self, rng: random.Random) -> None:
        self._rng = rng
        self._active: dict[tuple[str, int], int] = {}

    def pick(self, hosts: Sequence[UpstreamHost]) -> UpstreamHost:
        n = len(hosts)
        if n == 1:
            return hosts[0]
        a, b = hosts[self._rng.randrange(n)], hosts[self._rng.randrange(n)]
        act = self._active
        return a if act.get(_address(a), 0) <= act.get(_address(b), 0) else b

    def started(self, host: UpstreamHost) -> None:
        k = _address(host)
        self._active[k] = self._active.get(k, 0) + 1

    def finished(self, host: UpstreamHost) -> None:
        k = _address(host)
        self._active[k] = self._active.get(k, 1) - 1

    def active(self, host: UpstreamHost) -> int:
        return self._active.get(_address(host), 0)


def ring_hash(text: str) -> int:
    """64 bits of BLAKE2b: the same in every worker process (Python's hash() is salted per process)."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")


class HashRing(Picker):
    """Envoy's ring hash (DestinationRule consistentHash): every host at ceil(ring_size / hosts)
    points of a 64-bit ring; a request goes to the first point at or after its key's hash whose host
    is available, so taking a host out moves only the keys it had. No key: a random host, as Envoy."""

    __slots__ = ("_hashes", "_hosts", "_random")

    def __init__(self, rng: random.Random, hosts: Sequence[UpstreamHost], ring_size: int = 1024) -> None:
        per_host = -(-ring_size // len(hosts)) if hosts else 0
        points = sorted((ring_hash(f"{h.ip}:{h.port}_{i}"), n, h) for n, h in enumerate(hosts)
                        for i in range(per_host))  # n: ties (never in practice) keep an order
        self._hashes = [p[0] for p in points]
        self._hosts = [p[2] for p in points]
        self._random = RandomPick(rng)

    def pick(self, hosts: Sequence[UpstreamHost]) -> UpstreamHost:
        return self._random.pick(hosts)

    def pick_for(self, key: str, hosts: Sequence[UpstreamHost]) -> UpstreamHost:
        ring = self._hosts
        i = bisect_left(self._hashes, ring_hash(key))
        allowed = set(hosts)
        for j in range(len(ring)):
            host = ring[(i + j) % len(ring)]
            if host in allowed:
                return host
        return self._random.pick(hosts)  # hosts the ring does not know (cannot happen: one cluster)


_PICKERS: dict[str, Callable[[random.Random], Picker]] = {
    "ROUND_ROBIN": RoundRobin, "RANDOM": RandomPick, "LEAST_REQUEST": LeastRequest, "PASSTHROUGH": RandomPick,
}


def make_picker(lb: str, rng: random.Random) -> Picker:
    return _PICKERS[lb](rng)


class ClusterState:
    """A cluster's picker and outlier detector, fed by the proxy."""

    __slots__ = ("cluster", "picker", "outlier", "hash_by")

    def __init__(self, cluster: Cluster, rng: random.Random, clock: Callable[[], float] = time.monotonic,
                 outlier: OutlierDetector | None = None) -> None:
        self.cluster = cluster
        self.hash_by = cluster.policy.hash_by  # what requests are hashed on, or None
        if cluster.policy.lb == "CONSISTENT_HASH":
            self.picker = HashRing(rng, cluster.backends, cluster.policy.ring_size)
        else:
            self.picker = make_picker(cluster.policy.lb, rng)
        policy = cluster.policy.outlier
        self.outlier = None
        if policy is not None:
            hosts = [_address(b) for b in cluster.backends]
            if outlier is not None and outlier.policy == policy:
                outlier.set_hosts(hosts)  # a reload keeps ejections of hosts that stay
                self.outlier = outlier
            else:
                self.outlier = OutlierDetector(policy, hosts, clock)

    def pick(self, tried: Sequence[UpstreamHost] = (), key: str | None = None) -> UpstreamHost | None:
        """A backend, avoiding ``tried`` ones when others are available (Istio's previous_hosts).
        ``key``: the request's hash key under CONSISTENT_HASH (None: it has none)."""
        hosts = self.cluster.backends
        if self.outlier is not None:
            hosts = self.outlier.available(hosts, _address)
        if not hosts:
            return None
        if tried and len(hosts) > 1:
            fresh = [h for h in hosts if h not in tried]
            if fresh:
                hosts = fresh
        if key is not None and self.hash_by is not None:
            return self.picker.pick_for(key, hosts)
        return self.picker.pick(hosts)

    def started(self, host: UpstreamHost) -> None:
        self.picker.started(host)

    def finished(self, host: UpstreamHost, status: int | None = 0, failed: bool = False) -> None:
        """``status``: the upstream response's (None: no verdict on the host); ``failed``: a local-origin
        failure (connect failure, reset, timeout)."""
        self.picker.finished(host)
        if self.outlier is not None and (failed or status is not None):
            if failed:
                self.outlier.record_failure(_address(host))
            else:
                self.outlier.record(_address(host), status)


class ClusterStates:
    """ClusterState per cluster key, refreshed when a new config snapshot brings a new Cluster."""

    def __init__(self, rng: random.Random, clock: Callable[[], float] = time.monotonic) -> None:
        self.rng, self.clock = rng, clock
        self._states: dict[ClusterKey, ClusterState] = {}

    def get(self, cluster: Cluster) -> ClusterState:
        s = self._states.get(cluster.key)
        if s is None or s.cluster is not cluster:
            s = self._states[cluster.key] = ClusterState(cluster, self.rng, self.clock, s and s.outlier)
        return s
