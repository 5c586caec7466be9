"""The FQDN cache: which addresses the DNS proxy gave each endpoint for which name, and until when.

Cilium's DNS cache per endpoint, as toFQDNs needs it: an address the proxy answered endpoint E for
name N is allowed to E by every toFQDNs selector of E's policies that matches N, until
``now + max(ttl, tofqdns_min_ttl)``; each answer that repeats the address pushes its expiry on.
Every answer is kept, selected or not, so a toFQDNs policy applied after a lookup allows its
addresses at once (as in Cilium).

Expiry and live connections. An address past its expiry is dropped by `gc`, unless the endpoint
still has a connection to it in conntrack: then it stays, marked *in use* (Cilium's "zombie"), and
is dropped at the first GC after the connection ends. Dropping it while the connection lives
would revoke the allow, and the policy revision bump that follows would make conntrack cut the
connection at its next packet (bpf/lib/conntrack.h); Cilium keeps such addresses for the same
reason. Meanwhile new connections to the address are allowed too, as in Cilium.

Thread-safe: the DNS proxy records from its threads, the agent reads snapshots under its own lock,
the periodic loop runs `gc` and `save`. The clock is wall time (``time.time``) so that expiries
survive an agent restart in the state file (`save`, `load`).
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from agent.dns.rules import fqdn
from agent.files import DIR_MODE, FILE_MODE, write_text_if_changed

log = logging.getLogger("meshagent.fqdn")

__all__ = ["DEFAULT_MIN_TTL", "FqdnCache", "FqdnIp", "FqdnSnapshot", "state_path"]

DEFAULT_MIN_TTL = 3600  # Cilium's --tofqdns-min-ttl
# Bounds on what one endpoint can make the agent hold (Cilium: --tofqdns-endpoint-max-ip-per-hostname
# 1000; names per endpoint are bounded by the DNS cache's own size there). Beyond them the entries
# that expire first give way.
MAX_IPS_PER_NAME = 1000
MAX_NAMES_PER_ENDPOINT = 10_000
STATE_VERSION = 1


def state_path(state_dir: str, node_name: str) -> str:
    """Where a node's agent keeps its FQDN cache across restarts."""
    return os.path.join(state_dir, f"fqdn-{node_name}.json")


@dataclass(frozen=True)
class FqdnIp:
    """One address of one name for one endpoint."""

    endpoint: str
    name: str  # fully qualified, lowercase
    ip: str
    expires: float  # wall-clock seconds
    in_use: bool = False  # past its expiry, kept while a connection of the endpoint to it lives


@dataclass(frozen=True)
class FqdnSnapshot:
    """The cache's contents at one moment, for the reconcile path (frozen: compute stays pure).
    ``generation`` counts changes to the set of (endpoint, name, address), not expiry updates."""

    generation: int
    names: Mapping[str, Mapping[str, tuple[str, ...]]]  # endpoint -> name -> addresses (sorted)

    @classmethod
    def empty(cls) -> FqdnSnapshot:
        return cls(0, {})


def _ipv4(text: str) -> str | None:
    try:
        return str(ipaddress.IPv4Address(str(text).strip()))
    except ValueError:
        return None


class FqdnCache:
    """endpoint -> name -> address -> [expiry, in use]. See the module doc."""

    def __init__(self, min_ttl: int = DEFAULT_MIN_TTL, clock: Callable[[], float] = time.time,
                 max_ips_per_name: int = MAX_IPS_PER_NAME, max_names_per_endpoint: int = MAX_NAMES_PER_ENDPOINT):
        self.min_ttl = min_ttl
        self._clock = clock
        self._max_ips = max_ips_per_name
        self._max_names = max_names_per_endpoint
        self._lock = threading.Lock()
        self._data: dict[str, dict[str, dict[str, list]]] = {}
        self.generation = 0  # bumped when an (endpoint, name, address) comes or goes
        self._dirty = False  # something to save (expiries included)

    # ---- the proxy's side ----------------------------------------------------------------------

    def record(self, endpoint: str, name: str, ips: Iterable[str], ttl: int) -> frozenset[str]:
        """The proxy gave ``endpoint`` the addresses ``ips`` for ``name`` with ``ttl`` seconds.
        Returns the addresses that are new for (endpoint, name). Addresses that are not IPv4 are
        skipped (the datapath is IPv4-only)."""
        name = fqdn(name)
        expires = self._clock() + max(int(ttl), self.min_ttl, 0)
        good = [ip for ip in (_ipv4(i) for i in ips) if ip is not None]
        if not good or not endpoint:
            return frozenset()
        new: set[str] = set()
        with self._lock:
            names = self._data.setdefault(endpoint, {})
            held = names.get(name)
            if held is None:
                if len(names) >= self._max_names:
                    self._evict_name(names)
                held = names[name] = {}
            for ip in good:
                slot = held.get(ip)
                if slot is None:
                    if len(held) >= self._max_ips:
                        victim = min(held, key=lambda k: held[k][0])
                        del held[victim]
                    held[ip] = [expires, False]
                    new.add(ip)
                else:
                    slot[0], slot[1] = max(slot[0], expires), False
            if new:
                self.generation += 1
            self._dirty = True
        return frozenset(new)

    @staticmethod
    def _evict_name(names: dict[str, dict[str, list]]) -> None:
        victim = min(names, key=lambda n: max((s[0] for s in names[n].values()), default=0.0))
        del names[victim]

    # ---- the reconcile path's side ------------------------------------------------------------

    def snapshot(self) -> FqdnSnapshot:
        with self._lock:
            names = {ep: {n: tuple(sorted(ips)) for n, ips in by_name.items() if ips}
                     for ep, by_name in self._data.items()}
            return FqdnSnapshot(self.generation, {ep: by_name for ep, by_name in names.items() if by_name})

    def entries(self, endpoint: str | None = None) -> list[FqdnIp]:
        """Every address held, for `meshagent fqdn cache list`."""
        with self._lock:
            return [FqdnIp(ep, n, ip, slot[0], slot[1])
                    for ep, by_name in sorted(self._data.items()) if endpoint in (None, ep)
                    for n, ips in sorted(by_name.items()) for ip, slot in sorted(ips.items())]

    def next_expiry(self) -> float | None:
        """When the earliest address not in use expires (the periodic loop's next GC)."""
        with self._lock:
            return min((slot[0] for by_name in self._data.values() for ips in by_name.values()
                        for slot in ips.values() if not slot[1]), default=None)

    # ---- time ---------------------------------------------------------------------------------

    def gc(self, live: Callable[[], Iterable[tuple[str, str]]] = lambda: ()) -> bool:
        """Drop the addresses past their expiry; those the endpoint still has a connection to stay,
        marked in use. ``live()`` gives the (endpoint, address) pairs of live connections; it is only
        called when something has expired. Endpoints that are gone are forgotten with `retain`.
        Returns whether an (endpoint, name, address) went away."""
        now = self._clock()
        with self._lock:
            due = any(slot[0] <= now for by_name in self._data.values() for ips in by_name.values()
                      for slot in ips.values())
        if not due:
            return False
        alive = set(live())  # outside the lock: it reads the kernel's conntrack table
        removed = False
        with self._lock:
            for ep, by_name in list(self._data.items()):
                for name, ips in list(by_name.items()):
                    for ip, slot in list(ips.items()):
                        if slot[0] > now:
                            continue
                        if (ep, ip) in alive:
                            if not slot[1]:
                                slot[1] = True
                                self._dirty = True
                            continue
                        del ips[ip]
                        removed = True
                    if not ips:
                        del by_name[name]
                if not by_name:
                    del self._data[ep]
            if removed:
                self.generation += 1
                self._dirty = True
        return removed

    def retain(self, endpoints: Iterable[str]) -> bool:
        """Forget every endpoint not in ``endpoints`` (deleted ones). Returns whether any went."""
        keep = set(endpoints)
        with self._lock:
            gone = [ep for ep in self._data if ep not in keep]
            for ep in gone:
                del self._data[ep]
            if gone:
                self.generation += 1
                self._dirty = True
        return bool(gone)

    # ---- persistence ----------------------------------------------------------------------------

    def save(self, path: str) -> None:
        """Write the cache to ``path`` if it changed since the last save (root's alone, like the rest of
        the state directory)."""
        with self._lock:  # a copy: the proxy's threads record meanwhile
            if not self._dirty:
                return
            data = {ep: {n: {ip: list(slot) for ip, slot in ips.items()} for n, ips in by_name.items()}
                    for ep, by_name in self._data.items()}
            self._dirty = False
        text = json.dumps({"version": STATE_VERSION, "endpoints": data}, sort_keys=True)
        try:
            write_text_if_changed(path, text, FILE_MODE, DIR_MODE)
        except OSError:
            self._dirty = True  # tried again at the next save
            raise

    def load(self, path: str) -> int:
        """Read what a previous agent saved; a missing or unreadable file is an empty cache (the names
        are looked up again). Returns how many addresses were read."""
        try:
            with open(path) as f:
                doc = json.load(f)
        except FileNotFoundError:
            return 0
        except (OSError, ValueError) as e:
            log.warning("FQDN cache %s unreadable (%s): starting empty; names are learnt again", path, e)
            return 0
        count = 0
        data: dict[str, dict[str, dict[str, list]]] = {}
        endpoints = doc.get("endpoints") if isinstance(doc, dict) and doc.get("version") == STATE_VERSION else None
        for ep, by_name in (endpoints or {}).items():
            for name, ips in (by_name or {}).items() if isinstance(by_name, dict) else ():
                for ip, slot in (ips or {}).items() if isinstance(ips, dict) else ():
                    good = _ipv4(ip)
                    if good is None or not isinstance(slot, list) or len(slot) != 2 \
                            or not isinstance(slot[0], int | float):
                        continue
                    data.setdefault(str(ep), {}).setdefault(fqdn(str(name)), {})[good] = [float(slot[0]),
                                                                                       bool(slot[1])]
                    count += 1
        with self._lock:
            self._data = data
            self.generation += 1
        return count
