"""Routing decisions reused across requests of the same shape, for one frozen config snapshot.

`routing.route` is a pure function of (snapshot, request head, original destination, client, rng).
A call that draws nothing from the rng (one destination, no fault or mirror percentage) decided from
the original destination, the client, the Host header, the method and the target alone, unless the
VirtualService matches on headers; its `RouteDecision` then serves every later request with those
values.
A call that drew (a weighted split, a fault or mirror percentage) is made again for every request,
so each request still gets its own draw. Nothing here does I/O.

    cache = RouteCache(rng)
    decision, dst_ip, dst_port = cache.lookup(config, head, original_dst, local_port, client_id)

Decisions handed out are shared: callers must not modify them.
"""

from __future__ import annotations

import random

from .http1 import Request
from .routing import RouteDecision, parse_authority, route
from .snapshot import L7Config

__all__ = ["RouteCache"]

DEFAULT_MAX_ENTRIES = 4096


class _Probe:
    """Stands in for the rng during one `route` call: forwards every draw and notes that one happened."""

    __slots__ = ("rng", "drew")

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.drew = False

    def random(self) -> float:
        self.drew = True
        return self.rng.random()

    def randrange(self, *args: int) -> int:
        self.drew = True
        return self.rng.randrange(*args)


class RouteCache:
    def __init__(self, rng: random.Random, max_entries: int = DEFAULT_MAX_ENTRIES) -> None:
        self.rng = rng
        self.max_entries = max_entries
        self._config: L7Config | None = None
        # key -> (decision or None when it must be made per request, dst ip, dst port)
        self._entries: dict[tuple, tuple[RouteDecision | None, str, int]] = {}

    def lookup(self, config: L7Config, head: Request, original_dst: tuple[str, int] | None,
               local_port: int, client_id: int | None = None) -> tuple[RouteDecision, str, int]:
        """The decision for ``head`` and the destination it was for: ``original_dst`` when the datapath
        named it, else the Host header (default port ``local_port``). ``client_id``: the client's
        endpoint id, when the datapath named it (sourceLabels matches)."""
        if config is not self._config:  # a reload: every cached decision belongs to the old snapshot
            self._config = config
            self._entries.clear()
        key = (head.host, head.method, head.target, original_dst, local_port, client_id)
        hit = self._entries.get(key)
        if hit is not None:
            d, ip, port = hit
            if d is not None:
                return hit
            return route(config, head, (ip, port), self.rng, config.clients.get(client_id)), ip, port
        ip, port = original_dst if original_dst is not None else parse_authority(head.host or "", local_port)
        probe = _Probe(self.rng)
        d = route(config, head, (ip, port), probe, config.clients.get(client_id))
        if len(self._entries) >= self.max_entries:  # many distinct targets: start over rather than grow
            self._entries.clear()
        self._entries[key] = (None if probe.drew or _needs_headers(config, ip) else d, ip, port)
        return d, ip, port


def _needs_headers(config: L7Config, host: str) -> bool:
    """Whether the VirtualService routing requests for ``host`` matches on headers (then the decision
    depends on more than the cache key)."""
    service = config.service_at(host)
    vs = config.vs_for.get(service.key) if service is not None else None
    return vs is not None and vs.needs_headers
