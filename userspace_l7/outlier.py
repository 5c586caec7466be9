"""Outlier detection (DestinationRule ``outlierDetection``) as a pure state machine. No I/O; the clock
is injected, so tests drive time by hand.

One `OutlierDetector` per cluster (service, port, subset), tracking each backend address:

    HEALTHY --consecutive 5xx / gateway errors reach the threshold--> EJECTED   (at once, as Envoy)
    EJECTED --an interval sweep finds baseEjectionTime x ejections elapsed--> HEALTHY

Envoy's rules kept here: gateway errors (502, 503, 504) and local failures (connect failure, reset,
timeout) count as 5xx too; a host is not ejected when that would put the ejected share of the
cluster at or over maxEjectionPercent (so one host can always be ejected); an ejected host's
ejection count (the multiplier of baseEjectionTime) drops by one at each sweep it spends healthy;
when fewer than minHealthPercent of hosts are healthy, detection is ignored and all hosts are used.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from typing import TypeVar

from .snapshot import OutlierPolicy

__all__ = ["EJECTED", "HEALTHY", "TRANSITIONS", "OutlierDetector"]

HEALTHY, EJECTED = "HEALTHY", "EJECTED"
TRANSITIONS: dict[tuple[str, str], str] = {
    (HEALTHY, "eject"): EJECTED,
    (EJECTED, "expire"): HEALTHY,
}

Address = tuple[str, int]
H = TypeVar("H")


class _Host:
    __slots__ = ("state", "consecutive_5xx", "consecutive_gateway", "ejected_at", "ejections")

    def __init__(self) -> None:
        self.state = HEALTHY
        self.consecutive_5xx = 0
        self.consecutive_gateway = 0
        self.ejected_at = 0.0
        self.ejections = 0


class OutlierDetector:
    def __init__(self, policy: OutlierPolicy, hosts: Iterable[Address] = (),
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.policy = policy
        self.clock = clock
        self._hosts: dict[Address, _Host] = {}
        self._ejected = 0
        self._next_sweep = clock() + policy.interval
        self.set_hosts(hosts)

    # -- inputs --

    def set_hosts(self, hosts: Iterable[Address]) -> None:
        """The cluster's current backends; state of hosts that stay is kept (config reloads)."""
        old = self._hosts
        self._hosts = {h: old.get(h) or _Host() for h in hosts}
        self._ejected = sum(1 for s in self._hosts.values() if s.state == EJECTED)

    def record(self, host: Address, status: int) -> None:
        """An upstream response with ``status`` from ``host``."""
        s = self._hosts.get(host)
        if s is None:
            return
        if status >= 500:
            s.consecutive_5xx += 1
            if status in (502, 503, 504):
                s.consecutive_gateway += 1
            else:
                s.consecutive_gateway = 0
            self._check(host, s)
        else:
            s.consecutive_5xx = s.consecutive_gateway = 0

    def record_failure(self, host: Address) -> None:
        """A local-origin failure talking to ``host``: connect failure, reset or timeout."""
        self.record(host, 503)

    # -- outputs --

    def is_ejected(self, host: Address) -> bool:
        self._sweep()
        s = self._hosts.get(host)
        return s is not None and s.state == EJECTED

    def available(self, hosts: Sequence[H], address: Callable[[H], Address]) -> Sequence[H]:
        """``hosts`` without the ejected ones (all of them under minHealthPercent)."""
        self._sweep()
        if not self._ejected:
            return hosts
        hs = self._hosts
        healthy = [h for h in hosts if (s := hs.get(address(h))) is None or s.state != EJECTED]
        if hosts and len(healthy) * 100 < self.policy.min_health_percent * len(hosts):
            return hosts
        return healthy

    # -- the machine --

    def _to(self, s: _Host, event: str) -> None:
        s.state = TRANSITIONS[(s.state, event)]

    def _check(self, host: Address, s: _Host) -> None:
        p = self.policy
        trip = (p.consecutive_5xx and s.consecutive_5xx >= p.consecutive_5xx) or \
               (p.consecutive_gateway and s.consecutive_gateway >= p.consecutive_gateway)
        if not trip or s.state == EJECTED:
            return
        s.consecutive_5xx = s.consecutive_gateway = 0
        if self._ejected * 100 >= p.max_ejection_percent * len(self._hosts):
            return
        self._to(s, "eject")
        s.ejected_at = self.clock()
        s.ejections += 1
        self._ejected += 1

    def _sweep(self) -> None:
        now = self.clock()
        if now < self._next_sweep:
            return
        self._next_sweep = now + self.policy.interval
        base = self.policy.base_ejection_time
        for s in self._hosts.values():
            if s.state == EJECTED:
                if now >= s.ejected_at + base * s.ejections:
                    self._to(s, "expire")
                    self._ejected -= 1
            elif s.ejections:
                s.ejections -= 1
