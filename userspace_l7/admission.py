"""Which accepted connections a worker keeps: each client endpoint gets a bounded share of its
file descriptors (sans-IO: counts and decisions, no sockets).

The processor is shared by every endpoint of the node, and a worker has one descriptor table
(RLIMIT_NOFILE). One endpoint that opens connections without end would otherwise take all of it:
accept() then fails with EMFILE for everyone, and every other endpoint's requests fail with it (a
cross-tenant denial of service). So each worker counts its downstream connections per client
endpoint (the datapath names the client of each redirected connection: origdst.py) and refuses an
endpoint's connection beyond its cap; connections whose client is unknown share one bucket,
`UNKNOWN`. Refused connections are answered at once (server.py: a 503 with flag OM, then closed),
counted (`Admission.refused`, `meshagent_l7_connections_refused_total`) and reported as DROPPED flows.

The budget (`Limits.from_nofile`), per worker process:

    descriptors  = RLIMIT_NOFILE (the processor raises its soft limit to the hard one at start)
    downstream   = (descriptors - RESERVED_FDS) // 2
    per_endpoint = max(MIN_PER_ENDPOINT, downstream // ENDPOINT_SHARE)

RESERVED_FDS covers what is not a client connection (the listener, the event loop, the flows
socket, the metrics server, the config file, the BPF maps); the halving leaves one upstream
connection for every client connection (a request in flight holds one, and pools keep them);
ENDPOINT_SHARE = 8 means eight endpoints can each hold their whole cap before the worker's
downstream budget is spent, so one endpoint, or a few, can never take everything. A limit of 20000
gives 9968 downstream connections and 1246 per endpoint; systemd's default hard limit for
services, 524288, gives 262112 and 32764. ``downstream`` also caps the worker's connections
altogether (reason "worker_limit"), so that many endpoints together stop short of EMFILE too.

Both hold per worker process (the descriptor table is per process): with N workers an endpoint may
hold up to N x per_endpoint connections on the node, as SO_REUSEPORT spreads connections over the
workers. The node setting ``l7_max_connections_per_endpoint`` (0: this formula) sets the cap
directly.
"""

from __future__ import annotations

import resource
from dataclasses import dataclass

__all__ = ["ENDPOINT_SHARE", "RESERVED_FDS", "UNKNOWN", "Admission", "Limits", "raise_nofile"]

RESERVED_FDS = 64
ENDPOINT_SHARE = 8
MIN_PER_ENDPOINT = 16
UNKNOWN = 0  # the bucket of connections whose client endpoint the datapath did not name (ep_ids are >= 1)
ENDPOINT, WORKER = "endpoint_limit", "worker_limit"  # why a connection was refused


@dataclass(frozen=True)
class Limits:
    per_endpoint: int  # downstream connections one client endpoint may hold in this worker
    per_worker: int  # downstream connections of every client together

    @classmethod
    def from_nofile(cls, nofile: int, per_endpoint: int = 0) -> Limits:
        """The budget of a worker whose descriptor limit is ``nofile`` (module doc); ``per_endpoint``
        > 0: that cap instead of the formula's (the worker's total stays the formula's)."""
        downstream = max(1, (nofile - RESERVED_FDS) // 2)
        share = per_endpoint if per_endpoint > 0 else max(MIN_PER_ENDPOINT, downstream // ENDPOINT_SHARE)
        return cls(per_endpoint=min(share, downstream), per_worker=downstream)


def raise_nofile() -> int:
    """Raise this process's RLIMIT_NOFILE soft limit to its hard limit (the kernel's nr_open when the
    hard limit is unlimited); returns the soft limit in force afterwards."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard
    if hard == resource.RLIM_INFINITY:
        try:
            with open("/proc/sys/fs/nr_open") as f:
                target = int(f.read())
        except (OSError, ValueError):
            target = soft
    if soft != resource.RLIM_INFINITY and target > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (OSError, ValueError):
            pass
    return soft


class Admission:
    """Connections held per client endpoint (``UNKNOWN``: not named), against `Limits`.

    `admit` is called once per accepted connection and, when it says yes, `release` exactly once when
    that connection is gone (server.py: ClientConnection.connection_lost, or the accept path if the
    connection never got a protocol)."""

    __slots__ = ("limits", "held", "total", "refused")

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.held: dict[int, int] = {}  # client ep_id (UNKNOWN: 0) -> connections it holds
        self.total = 0
        self.refused: dict[tuple[int, str], int] = {}  # (client, reason) -> connections refused

    def admit(self, client: int) -> str | None:
        """Take a slot for one more connection of ``client``: None, or why not (ENDPOINT, WORKER)."""
        held = self.held.get(client, 0)
        if held >= self.limits.per_endpoint:
            why = ENDPOINT
        elif self.total >= self.limits.per_worker:
            why = WORKER
        else:
            self.held[client] = held + 1
            self.total += 1
            return None
        self.refused[(client, why)] = self.refused.get((client, why), 0) + 1
        return why

    def release(self, client: int) -> None:
        held = self.held.get(client, 0) - 1
        if held > 0:
            self.held[client] = held
        else:
            self.held.pop(client, None)
        self.total -= 1
