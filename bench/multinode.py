"""`make bench`, multi-node part: what the cluster side of the agent costs (SPEC §9: "policy update
and identity propagation latency; agent memory at scale"), on the node lab (lab/).

One run, these measurements side by side:

    rr         bench/rr.c TCP_RR and TCP_CRR from an endpoint on n1 to one on n2, with the agents
               enforcing an allowing policy (ingress on the server, egress on the client) against
               the same topology without agents (a second lab, no etcd: endpoints plumbed by
               agent/endpoint.py, routes added by the bench). Both exist at once; each round
               runs RR on both back to back in a shuffled order, then CRR the same way, and the
               ratios are paired per round
    endpoints  endpoint propagation: `endpoint add` on one node -> the endpoint's /32 in the other
               nodes' pinned ipcache. First while building up to BENCH_MN_ENDPOINTS endpoints
               across the three nodes (batches: the three nodes add at once), then one at a time
               at that size (`steady`: add, propagate, delete, propagate the removal)
    policy     policy propagation: `apply` of a CiliumNetworkPolicy on one node (the nodes take
               turns) -> its entry in every node's pinned policy_map, BENCH_MN_APPLIES times, at
               the size the endpoints phase reached
    rss        agent memory: each agent's VmRSS before and after BENCH_MN_REMOTE endpoint records
               of a fake fourth node are written straight into etcd (the store's key layout,
               bound to a lease of the bench, revoked at the end), once every agent's ipcache
               holds them all; then a few steady probes at that size, and how long the agents take
               to drop them when the lease is revoked

Timing. Every timestamp is CLOCK_MONOTONIC (system-wide). "returned" is when the API reply reached
the bench; "sent" when the request left it. A watcher thread looks the expected keys up in the other
nodes' pinned maps (bpf_map_lookup_elem, by key, every BENCH_MN_POLL_MS): a key's arrival lies
between its last miss (taken before that lookup) and its first hit (taken after it); the figures
use the first hit, so they are late by at most that gap (`resolution` in the results: its mean and
max). The maps are LPM tries, so a lookup is a longest-prefix match: the bench checks that nothing
shorter covers the keys it waits for (no CIDR rules cover the pod CIDRs; an unused port misses).

Environment: BENCH_RR_SECONDS (3), BENCH_CRR_SECONDS (2), BENCH_CPU and BENCH_SEED (shared with the
other parts); BENCH_MN_RR_ROUNDS (2 x BENCH_ROUNDS: 10), BENCH_MN_ENDPOINTS (1000), BENCH_MN_BATCH
(30: adds per batch, split over the nodes), BENCH_MN_STEADY (50: one-at-a-time probes at full size),
BENCH_MN_APPLIES (50), BENCH_MN_REMOTE (10000), BENCH_MN_REMOTE_PROBES (10), BENCH_MN_POLL_MS (5),
BENCH_MN_BUDGET_S (2400: the build-up stops there and reports the largest size reached),
BENCH_MN_MIN_FREE_MB (3000: the build-up stops when MemAvailable falls below it), BENCH_MN_PARTS
(rr,endpoints,policy,rss).

`python -m bench.multinode` runs this part alone and prints its Markdown; it writes no results file.
latest.json keeps the summaries of the propagation phases, not their thousands of per-key samples;
BENCH_MN_JSON=PATH writes the whole result, samples included, to PATH. Everything it makes (two labs with their
namespaces, agents, etcd, pins and cgroups; the rr servers; the fake records' lease) is removed at
the end, also on failure, Ctrl-C or SIGTERM: the labs' down(), processes by PID.
"""

from __future__ import annotations

import contextlib
import ctypes as ct
import ipaddress
import json
import os
import platform
import random
import signal
import statistics
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agent.client import AgentClient  # noqa: E402
from agent.datapath import maps  # noqa: E402
from agent.datapath.libbpf import libbpf  # noqa: E402
from agent.endpoint import EndpointRecord, host_ifname  # noqa: E402
from agent.identity import MAX_CLUSTER, _labels_key  # noqa: E402
from agent.labels import security_labels  # noqa: E402
from agent.policy.types import INGRESS, PolicyKey  # noqa: E402
from agent.store.etcd import PREFIX as ETCD_PREFIX  # noqa: E402
from bench import harness  # noqa: E402
from bench.topology import plumb_endpoint  # noqa: E402
from lab import Lab, LabSpec, down_by_name  # noqa: E402
from lab import node_config as lab_node_config  # noqa: E402

LAB, PLAIN_LAB = "mbench", "mbenchp"  # the agents' lab and the lab without agents
POD_BASE = 170  # node i's pods: 10.(170 + i).0.0/22 (the lab's /24 holds 253; 1,000 across 3 needs more)
POD_PREFIXLEN = 22
FAKE_NODE_INDEX = 4  # the fake fourth node of the rss phase: a record only, no namespace
FAKE_POD_CIDR = "10.200.0.0/18"  # 16,382 addresses: BENCH_MN_REMOTE at most that
FAKE_IDENTITIES = 100  # label sets of the fake node's endpoints (100 deployments)
FAKE_LEASE_TTL_S = 3600
RR_PORT, CLOSED_PORT = 7000, 7001
PROP_PORT_BASE = 20000  # the policy phase's ports: one new port per apply
UNUSED_PORT = 19999  # never allowed: its lookup must miss (no wildcard covers the keys)
PHASES = ("rr", "endpoints", "policy", "rss")
TCP = 6


# ---- settings ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    rounds: int
    rr_seconds: float
    crr_seconds: float
    endpoints: int
    batch: int
    steady: int
    applies: int
    remote: int
    remote_probes: int
    poll_s: float
    budget_s: float
    min_free_mb: float
    phases: tuple[str, ...]
    traffic_cpu: int | None
    seed: int

    @classmethod
    def from_env(cls, rounds: int) -> Settings:
        wanted = os.environ.get("BENCH_MN_PARTS") or ",".join(PHASES)
        phases = tuple(p.strip() for p in wanted.split(",") if p.strip())
        unknown = [p for p in phases if p not in PHASES]
        if unknown:
            raise SystemExit(f"BENCH_MN_PARTS: unknown {', '.join(unknown)}; known: {', '.join(PHASES)}")
        remote = int(harness.env_float("BENCH_MN_REMOTE", 10000))
        if remote > ipaddress.IPv4Network(FAKE_POD_CIDR).num_addresses - 2:
            raise SystemExit(f"BENCH_MN_REMOTE: at most {ipaddress.IPv4Network(FAKE_POD_CIDR).num_addresses - 2}")
        return cls(
            rounds=max(1, int(harness.env_float("BENCH_MN_RR_ROUNDS", 2 * rounds))),
            rr_seconds=harness.env_float("BENCH_RR_SECONDS", 3),
            crr_seconds=harness.env_float("BENCH_CRR_SECONDS", 2),
            endpoints=int(harness.env_float("BENCH_MN_ENDPOINTS", 1000)),
            batch=max(1, int(harness.env_float("BENCH_MN_BATCH", 30))),
            steady=int(harness.env_float("BENCH_MN_STEADY", 50)),
            applies=int(harness.env_float("BENCH_MN_APPLIES", 50)),
            remote=remote,
            remote_probes=int(harness.env_float("BENCH_MN_REMOTE_PROBES", 10)),
            poll_s=harness.env_float("BENCH_MN_POLL_MS", 5) / 1000,
            budget_s=harness.env_float("BENCH_MN_BUDGET_S", 2400),
            min_free_mb=harness.env_float("BENCH_MN_MIN_FREE_MB", 3000),
            phases=phases,
            traffic_cpu=harness.traffic_cpu(),
            seed=harness.seed(),
        )


# ---- small helpers -------------------------------------------------------------------------------


def load1() -> float:
    return round(os.getloadavg()[0], 2)


def mem_available_mb() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 1024
    return float("inf")


def percentiles(values: Iterable[float]) -> dict[str, float] | None:
    """p50, p90, p99 (nearest rank), min, max and n of ``values``; None if there are none."""
    vs = sorted(v for v in values if v is not None)
    if not vs:
        return None

    def rank(p: float) -> float:
        return vs[min(len(vs) - 1, max(0, int(round(p * len(vs) + 0.5)) - 1))]

    return {"p50": rank(0.50), "p90": rank(0.90), "p99": rank(0.99), "min": vs[0], "max": vs[-1],
            "mean": statistics.fmean(vs), "n": len(vs)}


def proc_status(pid: int) -> dict[str, float]:
    """VmRSS, VmHWM, RssAnon, RssFile of ``pid`` in MB (10^6 bytes, as the goal is given)."""
    out = {}
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                out[key] = int(value.split()[0]) * 1024 / 1e6  # /proc says kB and means KiB
    return out


def cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` (all its threads), in seconds."""
    with contextlib.suppress(OSError):
        stat = Path(f"/proc/{pid}/stat").read_text()
        fields = stat[stat.rindex(")") + 2:].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return 0.0


def children(pid: int) -> list[int]:
    """Every descendant of ``pid`` (the agent's L7 processor and its workers)."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError, ValueError, IndexError):
                stat = Path(f"/proc/{entry}/stat").read_text()
                ppid = int(stat[stat.rindex(")") + 2:].split()[1])
                parents.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def set_affinity(pids: Iterable[int], cpus: set[int]) -> None:
    """Every thread of every process in ``pids`` (the lab's agents, processors, etcd) to ``cpus``."""
    for pid in pids:
        with contextlib.suppress(OSError):
            for tid in os.listdir(f"/proc/{pid}/task"):
                with contextlib.suppress(OSError):
                    os.sched_setaffinity(int(tid), cpus)


# ---- the pinned maps, read by the bench itself -----------------------------------------------------


class PinnedMap:
    """A node's pinned BPF map, opened by path; ``has(key)`` is one bpf_map_lookup_elem (an LPM
    trie's lookup: longest-prefix match)."""

    def __init__(self, path: str, value_type: type[ct.Structure]):
        fd = libbpf().bpf_obj_get(path.encode())
        if fd < 0:
            raise harness.BenchError(f"cannot open the pinned map {path}: {os.strerror(-fd)}")
        self.fd, self.path = fd, path
        self._value = value_type()

    def has(self, key: ct.Structure) -> bool:
        return libbpf().bpf_map_lookup_elem(self.fd, ct.byref(key), ct.byref(self._value)) == 0

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


@dataclass(eq=False)
class Watch:
    """One key awaited in one node's map: present (an addition) or absent (a removal)."""

    node: str
    table: PinnedMap
    key: ct.Structure
    present: bool
    started: float
    last_miss: float | None = None  # when the last lookup that did not find it began
    seen: float | None = None  # when the first lookup that found it ended

    @property
    def done(self) -> bool:
        return self.seen is not None


class Watcher:
    """A thread that looks every pending watch up every ``interval`` seconds."""

    def __init__(self, interval: float):
        self.interval = interval
        self._pending: list[Watch] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self.sweeps = 0
        self.sweep_seconds = 0.0
        self.max_sweep = 0.0
        self._thread = threading.Thread(target=self._loop, name="bench-watcher", daemon=True)
        self._thread.start()

    def watch(self, watches: Iterable[Watch]) -> list[Watch]:
        watches = list(watches)
        with self._lock:
            self._pending.extend(watches)
        self._wake.set()
        return watches

    def wait(self, watches: list[Watch], timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(w.done for w in watches):
                return True
            time.sleep(0.01)
        gone = {id(w) for w in watches}
        with self._lock:  # give up on them
            self._pending = [w for w in self._pending if id(w) not in gone]
        return all(w.done for w in watches)

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(5)

    def _loop(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                pending = list(self._pending)
            if not pending:
                self._wake.wait(0.1)
                self._wake.clear()
                continue
            begin = time.monotonic()
            for w in pending:
                before = time.monotonic()
                found = w.table.has(w.key)
                if found == w.present:
                    w.seen = time.monotonic()
                else:
                    w.last_miss = before
            with self._lock:
                self._pending = [w for w in self._pending if not w.done]
            took = time.monotonic() - begin
            self.sweeps += 1
            self.sweep_seconds += took
            self.max_sweep = max(self.max_sweep, took)
            self._stop.wait(max(0.0, self.interval - took))

    def stats(self) -> dict[str, float]:
        return {"interval_ms": self.interval * 1000, "sweeps": self.sweeps,
                "mean_sweep_ms": 1000 * self.sweep_seconds / self.sweeps if self.sweeps else 0.0,
                "max_sweep_ms": 1000 * self.max_sweep}


def ipcache_key(ip: str) -> maps.IpcacheKeyC:
    return maps.ipcache_key_to_c(f"{ip}/32")


def policy_key(ep_id: int, identity: int, port: int) -> maps.PolicyKeyC:
    return maps.policy_key_to_c(PolicyKey(ep_id=ep_id, direction=INGRESS, identity=identity, proto=TCP, port=port,
                                          port_prefix=16))


# ---- the labs --------------------------------------------------------------------------------------


class Cluster:
    """The agents' lab (3 nodes, etcd) and, for the rr phase, the lab without agents (2 nodes)."""

    def __init__(self, janitor: harness.Janitor):
        self.janitor = janitor
        self.lab: Lab | None = None
        self.plain: Lab | None = None
        self.clients: dict[str, AgentClient] = {}
        self.ipcache: dict[str, PinnedMap] = {}
        self.policy: dict[str, PinnedMap] = {}
        self._pools: dict[str, Iterable[str]] = {}

    # -- up and down --

    def up(self) -> None:
        """The agents' lab: written with the lab's own configs, then each node's pod CIDR widened to a
        /22 (the lab gives a /24), then the agents started."""
        spec = LabSpec(name=LAB, nodes=3, store="etcd", node_prefix=f"{LAB}-", pod_base=POD_BASE, agents=False)
        self.lab = Lab(spec)
        self.janitor.push(f"take lab {LAB} down", self._down)
        self.lab.up()
        for node in self.lab.nodes:
            settings = node.settings()
            settings["pod_cidr"] = self.pod_cidr(node.index)
            lab_node_config.write(node.config_path, settings, origin=f"bench/multinode.py (lab {LAB}, pods /22)")
        for node in self.lab.nodes:
            node.start_agent(wait=False)
        for node in self.lab.nodes:
            node.wait_ready()
        for node in self.lab.nodes:
            self.clients[node.name] = AgentClient(node.api_socket, timeout=600)
            self.ipcache[node.name] = PinnedMap(os.path.join(node.bpffs_dir, "ipcache"), maps.IpcacheEntryC)
            self.policy[node.name] = PinnedMap(os.path.join(node.bpffs_dir, "policy"), maps.PolicyEntryC)

    def _down(self) -> None:
        for m in (*self.ipcache.values(), *self.policy.values()):
            m.close()
        if self.lab is not None:
            problems = self.lab.down()
            if problems:
                print(f"cleanup: lab {LAB}: {'; '.join(problems)}", file=sys.stderr, flush=True)

    def plain_up(self) -> None:
        """Two nodes on the same underlay and pod CIDRs, no etcd, no agents."""
        spec = LabSpec(name=PLAIN_LAB, nodes=2, store="dir", etcd=False, agents=False, node_prefix=f"{PLAIN_LAB}-",
                       pod_base=POD_BASE)
        self.plain = Lab(spec)
        self.janitor.push(f"take lab {PLAIN_LAB} down", self.plain_down)
        self.plain.up()

    def plain_down(self) -> None:
        if self.plain is not None and self.plain.phase != "down":
            problems = self.plain.down()
            if problems:
                print(f"cleanup: lab {PLAIN_LAB}: {'; '.join(problems)}", file=sys.stderr, flush=True)

    # -- names and addresses --

    @property
    def nodes(self) -> list:
        return self.lab.nodes if self.lab else []

    @staticmethod
    def pod_cidr(index: int) -> str:
        return f"10.{POD_BASE + index}.0.0/{POD_PREFIXLEN}"

    def next_ip(self, index: int) -> str:
        """The next free address of node ``index``'s pods (the first host is the node's own)."""
        if index not in self._pools:
            self._pools[index] = iter(list(ipaddress.IPv4Network(self.pod_cidr(index)).hosts())[1:])
        try:
            return str(next(self._pools[index]))
        except StopIteration:
            raise harness.BenchError(f"node {index}'s pod CIDR {self.pod_cidr(index)} is full") from None

    # -- the agents --

    def client(self, node) -> AgentClient:
        return self.clients[node.name]

    def add_endpoint(self, node, name: str, labels: dict[str, str], ip: str) -> dict:
        return self.client(node).call("endpoint_add", name=name, labels=labels, ip=ip)

    def apply(self, node, body: dict) -> dict:
        return self.client(node).call("apply", documents=[{"where": "bench/multinode.py", "body": body}])

    def agent_pids(self) -> dict[str, int]:
        return {n.name: n.agent.pid for n in self.nodes if n.agent is not None}

    def lab_pids(self) -> list[int]:
        """The agents, their processors and etcd: what the rr phase keeps off the traffic CPU."""
        pids = list(self.agent_pids().values())
        pids += [c for p in list(pids) for c in children(p)]
        if self.lab and self.lab.etcd:
            pids.append(self.lab.etcd.pid)
        return pids

    def cpu(self) -> dict[str, float]:
        """CPU seconds so far per agent (its L7 processor not included)."""
        return {name: cpu_seconds(pid) for name, pid in self.agent_pids().items()}

    def memory(self) -> dict[str, dict]:
        out = {}
        for name, pid in self.agent_pids().items():
            processor = [proc_status(c) for c in children(pid)]
            out[name] = {**proc_status(pid),
                         "processor_rss_mb": sum(p.get("VmRSS", 0.0) for p in processor)}
        return out

    def etcd_helper(self, request: dict) -> dict:
        """Run _ETCD_HELPER in the underlay namespace (etcd listens on its 127.0.0.1 there too)."""
        cmd = harness.in_netns(self.lab.underlay_ns, [sys.executable, "-c", _ETCD_HELPER])
        out = harness.run(cmd, input=json.dumps({"url": "http://127.0.0.1:2379", **request}), timeout=900)
        return json.loads(out.stdout)


# Writes to etcd through its gRPC gateway (as agent/store/etcd.py does), run in the underlay
# namespace: the fake node's records bound to a lease of the bench, transactions of at most 128
# writes (etcd's --max-txn-ops); prints the lease and when each transaction was answered.
_ETCD_HELPER = r"""
import base64, json, sys, time, requests
req = json.load(sys.stdin)
s = requests.Session(); s.trust_env = False
def post(path, body):
    r = s.post(req["url"] + "/v3" + path, json=body, timeout=60)
    r.raise_for_status()
    return r.json()
b64 = lambda t: base64.b64encode(t.encode()).decode()
out = {}
if req["op"] == "ids":
    p = req["prefix"]
    resp = post("/kv/range", {"key": b64(p), "range_end": b64(p[:-1] + chr(ord(p[-1]) + 1)), "keys_only": True})
    out["keys"] = [base64.b64decode(kv["key"]).decode() for kv in resp.get("kvs", [])]
elif req["op"] == "write":
    lease = int(post("/lease/grant", {"TTL": req["ttl"]})["ID"])
    out["lease"], out["answered"] = lease, []
    items = req["items"]
    for i in range(0, len(items), 128):
        ops = [{"request_put": {"key": b64(k), "value": b64(json.dumps(v, sort_keys=True, separators=(",", ":"))),
                                "lease": str(lease)}} for k, v in items[i:i + 128]]
        post("/kv/txn", {"success": ops})
        out["answered"].append(time.monotonic())
elif req["op"] == "revoke":
    try:
        post("/lease/revoke", {"ID": str(req["lease"])})
    except requests.HTTPError:
        post("/kv/lease/revoke", {"ID": str(req["lease"])})
    out["answered"] = time.monotonic()
print(json.dumps(out))
"""


# ---- rr: cross-node RR/CRR, agents vs none -------------------------------------------------------------


@dataclass
class Pair:
    """A client endpoint on n1 and a server endpoint on n2 of one configuration."""

    config: str
    client_ns: str
    server_ns: str
    server_ip: str
    expect_drop: bool  # a connection to CLOSED_PORT: dropped (agents) or refused (none)
    notes: dict[str, Any] = field(default_factory=dict)


def rr_policies() -> list[dict]:
    """The allowing policy of the agents' pair: ingress on the server from the client, egress on the
    client to the server, both on RR_PORT only."""
    port = [{"ports": [{"port": str(RR_PORT), "protocol": "TCP"}]}]
    return [
        {"apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
         "metadata": {"name": "mb-rr-server", "namespace": "default"},
         "spec": {"endpointSelector": {"matchLabels": {"app": "mb-rr-server"}},
                  "ingress": [{"fromEndpoints": [{"matchLabels": {"app": "mb-rr-client"}}], "toPorts": port}]}},
        {"apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
         "metadata": {"name": "mb-rr-client", "namespace": "default"},
         "spec": {"endpointSelector": {"matchLabels": {"app": "mb-rr-client"}},
                  "egress": [{"toEndpoints": [{"matchLabels": {"app": "mb-rr-server"}}], "toPorts": port}]}},
    ]


class RrPhase:
    def __init__(self, s: Settings, cluster: Cluster, janitor: harness.Janitor):
        self.s, self.cluster, self.janitor = s, cluster, janitor

    def pinned(self, cmd: list[str]) -> list[str]:
        return ["taskset", "-c", str(self.s.traffic_cpu), *cmd] if self.s.traffic_cpu is not None else cmd

    def setup(self) -> dict[str, Pair]:
        c = self.cluster
        n1, n2 = c.lab.node(1), c.lab.node(2)
        client_ip, server_ip = c.next_ip(1), c.next_ip(2)
        a = c.add_endpoint(n1, "rr-a", {"app": "mb-rr-client"}, client_ip)
        b = c.add_endpoint(n2, "rr-b", {"app": "mb-rr-server"}, server_ip)
        for body in rr_policies():
            c.apply(n1, body)
        agents = Pair("agents", Path(a["netns"]).name, Path(b["netns"]).name, server_ip, expect_drop=True,
                      notes={"veths": [(n1.netns, a["ifname"]), (n2.netns, b["ifname"])]})
        c.plain_up()
        p1, p2 = c.plain.node(1), c.plain.node(2)
        pa = plumb_endpoint(p1.netns, p1.name, f"{p1.name}-rr-a", client_ip, self.janitor)
        pb = plumb_endpoint(p2.netns, p2.name, f"{p2.name}-rr-b", server_ip, self.janitor)
        for here, there in ((p1, p2), (p2, p1)):  # what the agents' routes table does, by hand
            here.ns(["ip", "route", "replace", c.pod_cidr(there.index), "via", there.ip])
        none = Pair("none", pa.netns, pb.netns, server_ip, expect_drop=False)
        pairs = {"agents": agents, "none": none}
        rr = harness.build_rr()
        for pair in pairs.values():
            harness.spawn(self.janitor, f"rr server in {pair.server_ns}",
                          harness.in_netns(pair.server_ns, self.pinned([str(rr), "server", str(RR_PORT)])))
        for pair in pairs.values():
            self.check(pair)
        return pairs

    def probe(self, pair: Pair, port: int) -> str:
        probe = [sys.executable, "-c", harness.PROBE, pair.server_ip, str(port)]
        return harness.run(harness.in_netns(pair.client_ns, probe), check=False, timeout=10).stdout.strip()

    def check(self, pair: Pair) -> None:
        """The server answers on RR_PORT (the agents: once both nodes' ipcache know both sides), and
        CLOSED_PORT is dropped where policy is enforced, refused where it is not."""
        deadline = time.monotonic() + 30
        while (got := self.probe(pair, RR_PORT)) != "open":
            if time.monotonic() > deadline:
                raise harness.BenchError(f"{pair.config}: {pair.server_ip}:{RR_PORT} is {got} from the client")
            time.sleep(0.3)
        got, want = self.probe(pair, CLOSED_PORT), "timeout" if pair.expect_drop else "refused"
        if got != want:
            raise harness.BenchError(f"{pair.config}: a connection to port {CLOSED_PORT} was {got}, expected {want}")

    def rr(self, pair: Pair, mode: str, seconds: float) -> dict:
        cmd = [str(harness.RR_BIN), mode, pair.server_ip, str(RR_PORT), f"{seconds:g}"]
        return json.loads(harness.run(harness.in_netns(pair.client_ns, self.pinned(cmd)), timeout=seconds + 30).stdout)

    def run(self) -> dict[str, Any]:
        pairs = self.setup()
        cpus = set(os.sched_getaffinity(0))
        housekeeping = cpus - {self.s.traffic_cpu} if self.s.traffic_cpu is not None else cpus
        set_affinity(self.cluster.lab_pids(), housekeeping)  # the control plane off the traffic CPU
        os.sched_setaffinity(0, housekeeping)
        samples: dict[str, list[dict | None]] = {c: [] for c in pairs}
        rng = random.Random(self.s.seed)
        try:
            for pair in pairs.values():
                self.rr(pair, "client", 0.5)  # warm-up: neighbours, conntrack, caches
            for round_no in range(1, self.s.rounds + 1):
                # RR of both configurations back to back, then CRR of both: a pair is seconds apart
                got: dict[str, dict] = {c: {} for c in pairs}
                for mode, metric, seconds in (("client", "rr", self.s.rr_seconds), ("crr", "crr", self.s.crr_seconds)):
                    order = list(pairs)
                    rng.shuffle(order)
                    for config in order:
                        try:
                            out = self.rr(pairs[config], mode, seconds)
                        except Exception as e:
                            harness.log(f"multinode rr round {round_no} {config} {metric}: FAILED: {e}")
                            continue
                        got[config].update({f"{metric}_rate": out["rate"], f"{metric}_p50_us": out["p50_us"],
                                            f"{metric}_p99_us": out["p99_us"], f"{metric}_load1": load1()})
                for config in pairs:
                    samples[config].append(got[config] or None)
                a, n = got["agents"], got["none"]
                harness.log(f"multinode rr round {round_no}/{self.s.rounds}: RR agents {a.get('rr_rate', 0):8,.0f}/s "
                            f"none {n.get('rr_rate', 0):8,.0f}/s; CRR agents {a.get('crr_rate', 0):6,.0f}/s "
                            f"none {n.get('crr_rate', 0):6,.0f}/s (load {load1()})")
            try:
                cost = self.program_cost(pairs["agents"])
            except (harness.BenchError, subprocess.SubprocessError, OSError, ValueError) as e:
                cost = {"error": str(e)}
        finally:
            os.sched_setaffinity(0, cpus)
            set_affinity(self.cluster.lab_pids(), cpus)
            self.cluster.plain_down()  # the rest of the run needs only the agents' lab
        metrics = ("rr_rate", "rr_p50_us", "rr_p99_us", "crr_rate", "crr_p50_us", "crr_p99_us")
        summary = {c: {m: harness.spread([x.get(m) if x else None for x in v]) for m in metrics}
                   for c, v in samples.items()}
        ratios = {f"agents/none {m}": harness.paired(samples, "agents", "none", m)
                  for m in ("rr_rate", "crr_rate")}
        ratios |= {f"agents - none {m}": harness.paired(samples, "agents", "none", m, lambda x, y: x - y)
                   for m in ("rr_p50_us", "crr_p50_us")}
        rate = (summary["none"]["rr_rate"] or {}).get("median")
        if rate and cost.get("ns_per_rr"):  # the ratio the programs alone explain, at none's latency
            cost["explained_rr_ratio"] = 1 / (1 + cost["ns_per_rr"] * rate / 1e9)
        return {"samples": samples, "summary": summary, "ratios": ratios, "program_cost": cost,
                "client": "n1", "server": "n2", "port": RR_PORT}

    def program_cost(self, pair: Pair) -> dict[str, float]:
        """The agents' TC programs on the two endpoints' veths, over one extra RR run with
        kernel.bpf_stats_enabled=1 (on only for it): ns per run, runs and ns per transaction."""
        ids: set[int] = set()
        for netns, ifname in pair.notes["veths"]:
            shown = json.loads(harness.run(harness.in_netns(netns, ["bpftool", "-j", "net", "show"])).stdout or "[]")
            ids |= {int(h.get("id", h.get("prog_id"))) for sec in shown for h in sec.get("tc", [])
                    if h.get("devname") == ifname}
        if not ids:
            raise harness.BenchError("no TC programs on the rr endpoints' veths")

        def stats() -> tuple[int, int]:
            progs = json.loads(harness.run(["bpftool", "-j", "prog", "show"]).stdout)
            mine = [p for p in progs if p.get("id") in ids]
            return sum(int(p.get("run_time_ns", 0)) for p in mine), sum(int(p.get("run_cnt", 0)) for p in mine)

        with harness.sysctl("kernel.bpf_stats_enabled", "1"):
            ns0, runs0 = stats()
            transactions = self.rr(pair, "client", max(1.0, self.s.rr_seconds / 2))["transactions"]
            ns1, runs1 = stats()
        runs, ns = runs1 - runs0, ns1 - ns0
        if not runs or not transactions:
            raise harness.BenchError("the programs did not run during the cost run")
        return {"programs": len(ids), "ns_per_run": ns / runs, "runs_per_rr": runs / transactions,
                "ns_per_rr": ns / transactions}


# ---- endpoints: propagation ---------------------------------------------------------------------------


@dataclass
class Added:
    """One endpoint add (or delete) and the watches of its keys."""

    owner: str
    name: str
    ip: str
    n: int  # endpoints in the cluster when it was sent (this one not counted)
    watches: list[Watch]
    sent: float = 0.0
    returned: float | None = None
    error: str = ""
    reply: dict = field(default_factory=dict)

    def samples(self) -> list[dict]:
        out = []
        for w in self.watches:
            if w.seen is None or self.returned is None:
                out.append({"owner": self.owner, "name": self.name, "node": w.node, "n": self.n, "missing": True})
                continue
            out.append({"owner": self.owner, "name": self.name, "node": w.node, "n": self.n,
                        "from_return_ms": 1000 * (w.seen - self.returned),
                        "from_send_ms": 1000 * (w.seen - self.sent),
                        "resolution_ms": 1000 * (w.seen - (w.last_miss if w.last_miss is not None else w.started)),
                        "call_ms": 1000 * (self.returned - self.sent)})
        return out


def summarise_samples(samples: list[dict]) -> dict[str, Any]:
    ok = [s for s in samples if not s.get("missing")]
    return {"from_return_ms": percentiles(s["from_return_ms"] for s in ok),
            "from_send_ms": percentiles(s["from_send_ms"] for s in ok),
            "resolution_ms": percentiles(s["resolution_ms"] for s in ok),
            "call_ms": percentiles({(s["owner"], s["name"]): s["call_ms"] for s in ok}.values()),  # one per call
            "missing": len(samples) - len(ok), "n": len(samples)}


class EndpointPhase:
    def __init__(self, s: Settings, cluster: Cluster, watcher: Watcher):
        self.s, self.cluster, self.watcher = s, cluster, watcher
        self.count = 0  # endpoints this bench has in the cluster
        self.names = 0

    def _watches(self, owner, ip: str, present: bool, now: float) -> list[Watch]:
        return [Watch(n.name, self.cluster.ipcache[n.name], ipcache_key(ip), present, now)
                for n in self.cluster.nodes if n is not owner]

    def add_one(self, node, labels: dict[str, str], n: int) -> Added:
        self.names += 1
        name, ip = f"e{self.names:05d}", self.cluster.next_ip(node.index)
        now = time.monotonic()
        added = Added(node.name, name, ip, n, self.watcher.watch(self._watches(node, ip, True, now)))
        added.sent = time.monotonic()
        try:
            added.reply = self.cluster.add_endpoint(node, name, labels, ip)
            added.returned = time.monotonic()
            self.count += 1
        except Exception as e:  # the watches then time out, counted as missing
            added.error = str(e)
        return added

    def delete_one(self, node, added: Added, n: int) -> Added:
        now = time.monotonic()
        gone = Added(node.name, added.name, added.ip, n, self.watcher.watch(self._watches(node, added.ip, False, now)))
        gone.sent = time.monotonic()
        try:
            self.cluster.client(node).call("endpoint_delete", name=added.name)
            gone.returned = time.monotonic()
            self.count -= 1
        except Exception as e:
            gone.error = str(e)
        return gone

    def _send(self, node, numbers: list[int], n: int, results: list[Added]) -> None:
        """One node's share of a batch, one add after another (list.append is atomic)."""
        for i in numbers:
            results.append(self.add_one(node, self.labels(i), n))

    def labels(self, i: int) -> dict[str, str]:
        return {"app": f"mb-d{i % 50}"}  # 50 label sets, as 50 deployments

    def build(self, start_count: int) -> dict[str, Any]:
        """Batches of BENCH_MN_BATCH adds, split over the nodes, each node's share sent one after
        another while the other nodes send theirs; the next batch once every key has arrived."""
        nodes = self.cluster.nodes
        self.count = start_count
        target = self.s.endpoints
        started = time.monotonic()
        samples: list[dict] = []
        errors: list[str] = []
        stopped = ""
        cpu_before = self.cluster.cpu()
        batches = 0
        while self.count < target:
            if time.monotonic() - started > self.s.budget_s:
                stopped = f"time budget BENCH_MN_BUDGET_S={self.s.budget_s:g}s spent"
                break
            if mem_available_mb() < self.s.min_free_mb:
                stopped = f"MemAvailable below BENCH_MN_MIN_FREE_MB={self.s.min_free_mb:g}"
                break
            size = min(self.s.batch, target - self.count)
            base = self.count
            shares: dict[int, list[int]] = {n.index: [] for n in nodes}
            for k in range(size):
                shares[nodes[(base + k) % len(nodes)].index].append(base + k)
            results: list[Added] = []
            threads = [threading.Thread(target=self._send, args=(n, shares[n.index], base, results))
                       for n in nodes if shares[n.index]]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            self.watcher.wait([w for a in results for w in a.watches], timeout=120)
            for a in results:
                samples += a.samples()
                if a.error:
                    errors.append(f"{a.owner}/{a.name}: {a.error}")
            batches += 1
            if batches % 5 == 0 or self.count >= target:
                last = summarise_samples([s for a in results for s in a.samples()])["from_return_ms"] or {}
                harness.log(f"multinode endpoints: {self.count} in the cluster, batch p50 "
                            f"{last.get('p50', float('nan')):.0f} ms after return, "
                            f"{time.monotonic() - started:.0f} s, MemAvailable {mem_available_mb():,.0f} MiB, "
                            f"load {load1()}")
            if len(errors) > 20:
                stopped = f"more than 20 failed adds, the last: {errors[-1]}"
                break
        seconds = time.monotonic() - started
        cpu_after = self.cluster.cpu()
        added = self.count - start_count
        bands = []  # how the figures grow with the size: quarters of the build-up
        width = max(1, -(-target // 4))
        for lo in range(0, target, width):
            band = [x for x in samples if lo <= x["n"] < lo + width]
            if band:
                got = summarise_samples(band)
                bands.append({"from": lo, "to": min(target, lo + width), "from_return_ms": got["from_return_ms"],
                              "call_ms": got["call_ms"]})
        return {"by_size": bands, "reached": self.count, "target": target, "stopped": stopped, "seconds": seconds,
                "adds": added, "errors": errors[:5], "samples": samples,
                "agent_cpu_s": {k: cpu_after[k] - cpu_before[k] for k in cpu_after},
                "agent_cpu_ms_per_add": 1000 * sum(cpu_after[k] - cpu_before[k] for k in cpu_after) / max(1, added),
                **summarise_samples(samples)}

    def steady(self, probes: int, rng: random.Random) -> dict[str, Any]:
        """One add at a time at the current size: add, wait for the others, delete, wait again. Also
        each agent's CPU time over each add and each delete (owner and others apart)."""
        nodes = self.cluster.nodes
        adds: list[dict] = []
        removals: list[dict] = []
        cpu = {"owner_add_ms": [], "other_add_ms": [], "owner_delete_ms": [], "other_delete_ms": []}
        for p in range(probes):
            node = nodes[p % len(nodes)]
            time.sleep(rng.uniform(0.6, 1.2))  # an idle start, at a random point of the agents' 0.5 s tick
            before = self.cluster.cpu()
            a = self.add_one(node, self.labels(p), self.count)  # a label set in use: no new identity
            self.watcher.wait(a.watches, timeout=120)
            time.sleep(0.6)  # the owner's and the others' follow-up rounds (the store's generation moved)
            middle = self.cluster.cpu()
            adds += a.samples()
            if a.error:
                continue
            time.sleep(rng.uniform(0.0, 0.5))
            d = self.delete_one(node, a, self.count)
            self.watcher.wait(d.watches, timeout=120)
            time.sleep(0.6)
            after = self.cluster.cpu()
            removals += d.samples()
            for name in before:
                role = "owner" if name == node.name else "other"
                cpu[f"{role}_add_ms"].append(1000 * (middle[name] - before[name]))
                cpu[f"{role}_delete_ms"].append(1000 * (after[name] - middle[name]))
        return {"n": self.count, "probes": probes, "add": {**summarise_samples(adds), "samples": adds},
                "removal": {**summarise_samples(removals), "samples": removals},
                "agent_cpu_ms": {k: percentiles(v) for k, v in cpu.items()}}


# ---- policy: propagation ------------------------------------------------------------------------------


def prop_policy(port: int) -> dict:
    return {"apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
            "metadata": {"name": "mb-propagation", "namespace": "default"},
            "spec": {"endpointSelector": {"matchLabels": {"app": "mb-ptarget"}},
                     "ingress": [{"fromEndpoints": [{"matchLabels": {"app": "mb-psource"}}],
                                  "toPorts": [{"ports": [{"port": str(port), "protocol": "TCP"}]}]}]}}


class PolicyPhase:
    def __init__(self, s: Settings, cluster: Cluster, watcher: Watcher, endpoints: EndpointPhase):
        self.s, self.cluster, self.watcher, self.endpoints = s, cluster, watcher, endpoints

    def run(self, rng: random.Random) -> dict[str, Any]:
        c, nodes = self.cluster, self.cluster.nodes
        targets = {}
        for node in nodes:  # one selected endpoint on every node; the allowed peer on n1
            a = self.endpoints.add_one(node, {"app": "mb-ptarget"}, self.endpoints.count)
            if a.error:
                raise harness.BenchError(f"policy target on {node.name}: {a.error}")
            targets[node.name] = a.reply["ep_id"]
        source = self.endpoints.add_one(nodes[0], {"app": "mb-psource"}, self.endpoints.count)
        if source.error:
            raise harness.BenchError(f"policy source: {source.error}")
        identity = source.reply["identity"]
        self.watcher.wait(source.watches, timeout=120)

        def watches(port: int, now: float) -> list[Watch]:
            return [Watch(n.name, c.policy[n.name], policy_key(targets[n.name], identity, port), True, now)
                    for n in nodes]

        warm = self.watcher.watch(watches(PROP_PORT_BASE, time.monotonic()))  # the first apply: not measured
        c.apply(nodes[0], prop_policy(PROP_PORT_BASE))
        if not self.watcher.wait(warm, timeout=120):
            raise harness.BenchError("the first policy never reached every node's policy_map")
        covered = [n.name for n in nodes if c.policy[n.name].has(policy_key(targets[n.name], identity, UNUSED_PORT))]
        if covered:
            raise harness.BenchError(f"an unused port's key is found in {covered}'s policy_map: something shorter "
                                     "covers the keys, a lookup cannot tell the new entry")
        samples: list[dict] = []
        for i in range(1, self.s.applies + 1):
            node = nodes[i % len(nodes)]
            port = PROP_PORT_BASE + i
            time.sleep(rng.uniform(0.6, 1.2))
            ws = self.watcher.watch(watches(port, time.monotonic()))
            sent = time.monotonic()
            try:
                c.apply(node, prop_policy(port))
                returned = time.monotonic()
            except Exception as e:
                harness.log(f"multinode policy apply {i}: FAILED: {e}")
                continue
            self.watcher.wait(ws, timeout=120)
            for w in ws:
                if w.seen is None:
                    samples.append({"applier": node.name, "node": w.node, "missing": True})
                    continue
                samples.append({"applier": node.name, "node": w.node, "self": w.node == node.name,
                                "from_return_ms": 1000 * (w.seen - returned), "from_send_ms": 1000 * (w.seen - sent),
                                "resolution_ms": 1000 * (w.seen - (w.last_miss or w.started)),
                                "call_ms": 1000 * (returned - sent)})
        others = [s for s in samples if not s.get("missing") and not s["self"]]
        own = [s for s in samples if not s.get("missing") and s["self"]]
        return {"n": self.endpoints.count, "applies": self.s.applies,
                "other_nodes": {"from_return_ms": percentiles(s["from_return_ms"] for s in others),
                                "from_send_ms": percentiles(s["from_send_ms"] for s in others),
                                "resolution_ms": percentiles(s["resolution_ms"] for s in others)},
                "applying_node_from_send_ms": percentiles(s["from_send_ms"] for s in own),
                "apply_call_ms": percentiles(s["call_ms"] for s in own),
                "missing": sum(1 for s in samples if s.get("missing")), "samples": samples}


# ---- rss: 10,000 remote endpoints -------------------------------------------------------------------------


class RemotePhase:
    def __init__(self, s: Settings, cluster: Cluster, watcher: Watcher, endpoints: EndpointPhase,
                 janitor: harness.Janitor):
        self.s, self.cluster, self.watcher, self.endpoints, self.janitor = s, cluster, watcher, endpoints, janitor
        self.lease: int | None = None

    def records(self) -> tuple[list[tuple[str, dict]], list[str]]:
        """The fake node's record, its label sets' identities (ids no one holds), and its endpoints."""
        fake = f"{LAB}-n{FAKE_NODE_INDEX}"
        taken = {int(k.rsplit("/", 1)[1]) for k in self.cluster.etcd_helper(
            {"op": "ids", "prefix": f"{ETCD_PREFIX}identities/by-id/"})["keys"] if k.rsplit("/", 1)[1].isdigit()}
        free = [i for i in range(MAX_CLUSTER, 255, -1) if i not in taken][:FAKE_IDENTITIES]
        items: list[tuple[str, dict]] = []
        node_ip = lab_node_config.node_ip(FAKE_NODE_INDEX, self.cluster.lab.spec.underlay)
        items.append((f"nodes/{fake}", {
            "name": fake, "node_ip": node_ip, "pod_cidr": FAKE_POD_CIDR, "node_id": str(uuid.uuid4()),
            "l7_ports": {"outbound": 15001, "inbound": 15006, "mtls": 15008}, "started": time.time()}))
        idents = []
        for k, number in enumerate(free):
            labels = {"app": f"mb-remote-{k}"}
            sec = security_labels(labels, "default", "default")
            value = {"id": number, "labels": sec}
            items += [(f"identities/by-id/{number}", value), (f"identities/by-labels/{_labels_key(sec)}", value)]
            idents.append((number, labels))
        ips = []
        hosts = ipaddress.IPv4Network(FAKE_POD_CIDR).hosts()
        next(hosts)  # the node's own
        for i in range(self.s.remote):
            ip = str(next(hosts))
            number, labels = idents[i % len(idents)]
            name = f"r{i:05d}"
            rec = EndpointRecord(name=name, node=fake, namespace="default", serviceaccount="default", labels=labels,
                                 ip=ip, ep_id=i + 1, identity=number, netns=f"/run/netns/{fake}-{name}",
                                 netns_owned=True, ifname=host_ifname(fake, name), peer_ifname="eth0",
                                 cgroup=f"/sys/fs/cgroup/meshagent-bench-fake/ep-{name}")
            items.append((f"endpoints/{fake}/{name}", rec.to_dict()))
            ips.append(ip)
        return [(ETCD_PREFIX + k, v) for k, v in items], ips

    def wait_all(self, ips: list[str], present: bool, since: float, timeout: float = 900) -> dict[str, float | None]:
        """Seconds from ``since`` until each node's ipcache holds (or no longer holds) every address.

        The agents write (and remove) the entries in the store's key order, so the last address is
        looked up every 50 ms (one lookup: the bench stays off the CPUs the agents need); once it
        is there, every address is checked, and the time is the sentinel's unless some are still
        missing (then the time of the sweep that finds none missing, every 0.2 s)."""
        key = {ip: ipcache_key(ip) for ip in ips}
        sentinel = ips[-1]
        missing: dict[str, list[str] | None] = {n.name: None for n in self.cluster.nodes}  # None: sentinel first
        done: dict[str, float | None] = {n.name: None for n in self.cluster.nodes}
        deadline = time.monotonic() + timeout
        while any(v is None for v in done.values()) and time.monotonic() < deadline:
            for name in done:
                if done[name] is not None:
                    continue
                table = self.cluster.ipcache[name]
                if missing[name] is None:
                    if table.has(key[sentinel]) != present:
                        continue
                    seen = time.monotonic()
                    missing[name] = [ip for ip in ips if table.has(key[ip]) != present]
                    if not missing[name]:
                        done[name] = seen - since
                    continue
                missing[name] = [ip for ip in missing[name] if table.has(key[ip]) != present]
                if not missing[name]:
                    done[name] = time.monotonic() - since
            time.sleep(0.05 if any(m is None for m in missing.values()) else 0.2)
        return done

    def run(self, rng: random.Random) -> dict[str, Any]:
        c = self.cluster
        items, ips = self.records()
        covered = [n.name for n in c.nodes if c.ipcache[n.name].has(ipcache_key(ips[-1]))]
        if covered:
            raise harness.BenchError(f"{ips[-1]} is found in {covered}'s ipcache before it is written")
        idle_s = 10.0
        cpu0 = c.cpu()
        time.sleep(idle_s)
        cpu1 = c.cpu()
        before = c.memory()
        cpu2 = c.cpu()
        harness.log(f"multinode rss: writing {len(ips):,} endpoint records of a fake node into etcd "
                    f"({len(items):,} keys in {(len(items) + 127) // 128} transactions)")
        started = time.monotonic()
        out = c.etcd_helper({"op": "write", "ttl": FAKE_LEASE_TTL_S, "items": items})
        self.lease = out["lease"]
        self.janitor.push(f"revoke the bench's etcd lease {self.lease:x}", self.revoke)
        written = out["answered"][-1]
        took_in = self.wait_all(ips, True, written)
        cpu3 = c.cpu()
        harness.log(f"multinode rss: every agent's ipcache holds them: {took_in} s after the last write")
        time.sleep(5)  # the agents' follow-up rounds and cache files
        after = c.memory()
        cpu4 = c.cpu()
        time.sleep(idle_s)
        cpu5 = c.cpu()
        probes = self.endpoints.steady(self.s.remote_probes, rng) if self.s.remote_probes else None
        revoked = c.etcd_helper({"op": "revoke", "lease": self.lease})["answered"]
        self.lease = None
        dropped = self.wait_all(ips, False, revoked)
        harness.log(f"multinode rss: lease revoked, every agent's ipcache dropped them after {dropped} s")
        return {"remote": len(ips), "keys_written": len(items), "write_seconds": written - started,
                "took_in_s": took_in, "dropped_s": dropped, "before": before, "after": after,
                "agent_cpu_s_taking_in": {k: cpu3[k] - cpu2[k] for k in cpu3},
                "idle_cpu_per_s_before": {k: (cpu1[k] - cpu0[k]) / idle_s for k in cpu1},
                "idle_cpu_per_s_after": {k: (cpu5[k] - cpu4[k]) / idle_s for k in cpu5},
                "local_endpoints": self.endpoints.count, "probes": probes}

    def revoke(self) -> None:
        if self.lease is not None:
            self.cluster.etcd_helper({"op": "revoke", "lease": self.lease})
            self.lease = None


# ---- the part ----------------------------------------------------------------------------------------------


def remove_leftovers() -> None:
    """What a killed run left: only the bench's own two labs, by name."""
    for name in (LAB, PLAIN_LAB):
        problems = down_by_name(name)
        if problems is not None:
            harness.log(f"multinode: removed lab {name} left by an earlier run {problems or ''}")


def run(rounds: int) -> dict[str, Any]:
    if os.geteuid() != 0:
        raise SystemExit("the multi-node bench needs root (network namespaces, BPF, etcd)")
    s = Settings.from_env(rounds)
    started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    result: dict[str, Any] = {
        "started": started, "load1_at_start": load1(),
        "machine": {"kernel": platform.release(), "cpus": os.cpu_count(),
                    "mem_total_mb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**20)},
        "settings": {**s.__dict__, "phases": list(s.phases)}, "skipped": {}, "phase_load1": {}}
    janitor = harness.Janitor()
    cluster = Cluster(janitor)
    watcher: Watcher | None = None
    rng = random.Random(s.seed)

    def phase(name: str, fn: Callable[[], Any]) -> None:
        if name not in s.phases:
            return
        result["phase_load1"][name] = load1()
        harness.log(f"multinode: {name} (load {load1()})")
        t = time.monotonic()
        try:
            result[name] = fn()
        except (harness.BenchError, subprocess.SubprocessError, OSError, ValueError, KeyError) as e:
            result["skipped"][name] = f"{type(e).__name__}: {e}"
            harness.log(f"multinode: {name} FAILED: {e}")
        except Exception as e:  # an agent error (AgentError, AgentUnavailable): the other phases still run
            result["skipped"][name] = f"{type(e).__name__}: {e}"
            harness.log(f"multinode: {name} FAILED: {type(e).__name__}: {e}")
        if name in result:
            result[name]["phase_seconds"] = round(time.monotonic() - t, 1)

    try:
        remove_leftovers()
        harness.log(f"multinode: lab {LAB} (3 nodes, etcd) up, load {load1()}")
        cluster.up()
        watcher = Watcher(s.poll_s)
        janitor.push("stop the watcher", watcher.stop)
        result["idle_agent_memory"] = cluster.memory()
        phase("rr", lambda: RrPhase(s, cluster, janitor).run())
        endpoints = EndpointPhase(s, cluster, watcher)
        existing = sum(len(cluster.client(n).call("endpoint_list")["items"]) for n in cluster.nodes)

        def endpoint_phase() -> dict:
            out = {"build": endpoints.build(existing)}
            harness.log(f"multinode: steady probes at {endpoints.count} endpoints")
            out["steady"] = endpoints.steady(s.steady, rng)
            out["memory"] = cluster.memory()
            return out

        phase("endpoints", endpoint_phase)
        phase("policy", lambda: PolicyPhase(s, cluster, watcher, endpoints).run(rng))
        phase("rss", lambda: RemotePhase(s, cluster, watcher, endpoints, janitor).run(rng))
        if watcher is not None:
            result["watcher"] = watcher.stats()
        result["load1_at_end"] = load1()
    finally:
        harness.log("multinode: cleaning up")
        janitor.run_all()
    result["targets"] = targets(result)
    if os.environ.get("BENCH_MN_JSON"):  # every sample, e.g. to render or study them again
        Path(os.environ["BENCH_MN_JSON"]).write_text(json.dumps(result, indent=1) + "\n")
    return without_samples(result)


def without_samples(result: dict) -> dict:
    """The result as latest.json keeps it: the propagation phases' per-key samples (thousands) left
    out, their summaries kept; the rr rounds' samples stay, as in the other parts."""
    def strip(value: Any, key: str = "") -> Any:
        if isinstance(value, dict):
            return {k: strip(v, k) for k, v in value.items() if not (k == "samples" and key != "rr")}
        return value

    return strip(result)


# ---- summary and Markdown --------------------------------------------------------------------------------


def targets(result: dict) -> dict[str, dict]:
    """The issue's goals: cross-node RR rate (median of the paired ratios) and the largest agent RSS."""
    rr = result.get("rr", {}).get("ratios", {}).get("agents/none rr_rate")
    rss = result.get("rss")
    worst = max((m.get("VmRSS", 0) for m in rss["after"].values()), default=None) if rss else None
    return {
        "rr": {"target": "cross-node RR rate, agents/none", "goal": ">= 0.95x", "value": rr and rr["median"],
               "met": None if not rr else rr["median"] >= 0.95},
        "rss": {"target": "agent VmRSS with the remote endpoints (largest of the 3), MB", "goal": "<= 150 MB",
                "value": worst, "met": None if worst is None else worst <= 150},
    }


def _met(t: dict | None) -> str:
    return "-" if not t or t["met"] is None else ("yes" if t["met"] else "**no**")


def _ms(stat: dict | None, key: str = "p50") -> str:
    return "-" if not stat else f"{stat[key]:,.0f}"


def _pct(stat: dict | None) -> str:
    """p50 / p99 (n) in ms."""
    if not stat:
        return "-"
    return f"{stat['p50']:,.0f} / {stat['p99']:,.0f} (n {stat['n']})"


def markdown(result: dict) -> str:
    s = result["settings"]
    lines = [
        "# meshagent bench: multi-node (3 nodes on the lab, etcd)",
        "",
        f"{result['started']} · kernel {result['machine']['kernel']} · {result['machine']['cpus']} CPUs · "
        f"1-min load {result['load1_at_start']} at the start, {result.get('load1_at_end', '-')} at the end · "
        f"watcher every {s['poll_s'] * 1000:g} ms · seed {s['seed']}",
        "",
    ]
    tgt = result.get("targets", {})
    rr = result.get("rr")
    if rr:
        r, summ = rr["ratios"], rr["summary"]
        met = _met(tgt.get("rr"))
        lines += [
            f"## Cross-node RR/CRR, n1 → n2: agents enforcing an allowing policy vs no agent ({s['rounds']} rounds, "
            f"paired; RR {s['rr_seconds']:g} s, CRR {s['crr_seconds']:g} s per round; traffic on CPU "
            f"{s['traffic_cpu']}, agents and etcd on the others)",
            "",
            "| measure | agents | none | agents/none (paired) | goal | met |",
            "|---|---|---|---|---|---|",
            f"| RR trans/s | {harness.fmt(summ['agents']['rr_rate'])} | {harness.fmt(summ['none']['rr_rate'])} "
            f"| {harness.fmt(r.get('agents/none rr_rate'), 3)} | >= 0.95x | {met} |",
            f"| RR p50 µs | {harness.fmt(summ['agents']['rr_p50_us'], 1)} "
            f"| {harness.fmt(summ['none']['rr_p50_us'], 1)} | {harness.fmt(r.get('agents - none rr_p50_us'), 1)} µs "
            "| | |",
            f"| RR p99 µs | {harness.fmt(summ['agents']['rr_p99_us'], 1)} "
            f"| {harness.fmt(summ['none']['rr_p99_us'], 1)} | | | |",
            f"| CRR conn/s | {harness.fmt(summ['agents']['crr_rate'])} | {harness.fmt(summ['none']['crr_rate'])} "
            f"| {harness.fmt(r.get('agents/none crr_rate'), 3)} | | |",
            f"| CRR p50 µs | {harness.fmt(summ['agents']['crr_p50_us'], 1)} "
            f"| {harness.fmt(summ['none']['crr_p50_us'], 1)} | {harness.fmt(r.get('agents - none crr_p50_us'), 1)} µs "
            "| | |",
            "",
        ]
        cost = rr.get("program_cost", {})
        if cost.get("ns_per_rr"):
            lines += [f"The agents' TC programs on the two veths (one extra RR run with bpf_stats on): "
                      f"{cost['ns_per_run']:,.0f} ns per run, {cost['runs_per_rr']:.1f} runs and "
                      f"{cost['ns_per_rr']:,.0f} ns per RR transaction; at none's median rate that alone gives "
                      f"agents/none {cost.get('explained_rr_ratio', float('nan')):.3f}.", ""]
        elif cost.get("error"):
            lines += [f"Program cost not measured: {cost['error']}", ""]
    ep = result.get("endpoints")
    if ep:
        b, st = ep["build"], ep["steady"]
        lines += [
            "## Endpoint propagation: `endpoint add` on one node → the /32 in the other nodes' pinned ipcache (ms)",
            "",
            f"Build-up to {b['target']:,} endpoints across 3 nodes: reached **{b['reached']:,}** "
            f"in {b['seconds']:.0f} s"
            + (f" (stopped: {b['stopped']})" if b["stopped"] else "")
            + f", batches of {s['batch']} (the three nodes adding at once). Steady: {st['probes']} single adds at "
            f"{st['n']:,} endpoints, each deleted again.",
            "",
            "| measure | p50 / p99 (n) ms | goal |",
            "|---|---|---|",
            f"| steady at {st['n']:,}: after `add` returned on the owner | {_pct(st['add']['from_return_ms'])} | - |",
            f"| steady at {st['n']:,}: after `add` was sent | {_pct(st['add']['from_send_ms'])} | - |",
            f"| steady at {st['n']:,}: the `add` call itself (owner) | {_pct(st['add']['call_ms'])} | - |",
            f"| steady at {st['n']:,}: removal, after `delete` returned "
            f"| {_pct(st['removal']['from_return_ms'])} | - |",
            f"| build-up 0 → {b['reached']:,}: after `add` returned | {_pct(b['from_return_ms'])} | - |",
            f"| build-up: the `add` call (in a batch) | {_pct(b['call_ms'])} | - |",
            *(f"| build-up, sent at {band['from']:,}–{band['to']:,}: after `add` returned; the call "
              f"| {_pct(band['from_return_ms'])}; {_pct(band['call_ms'])} | - |" for band in b.get("by_size", [])),
            f"| watcher resolution (first hit − last miss) | {_pct(st['add']['resolution_ms'])} | - |",
            "",
            f"Agent CPU per single add at {st['n']:,}: owner {_ms(st['agent_cpu_ms']['owner_add_ms'], 'mean')} ms, "
            f"each other node {_ms(st['agent_cpu_ms']['other_add_ms'], 'mean')} ms; per delete: owner "
            f"{_ms(st['agent_cpu_ms']['owner_delete_ms'], 'mean')} ms, others "
            f"{_ms(st['agent_cpu_ms']['other_delete_ms'], 'mean')} ms (means over the probes, each over the call "
            "and 0.6 s after the last node saw it; /proc counts CPU time in 10 ms ticks); "
            f"build-up: {b['agent_cpu_ms_per_add']:,.0f} ms of agent CPU per add, all three agents together. "
            f"Missing (never seen within 120 s): steady {st['add']['missing']}, build-up {b['missing']}.",
            "",
        ]
    pol = result.get("policy")
    if pol:
        o = pol["other_nodes"]
        lines += [
            f"## Policy propagation: `apply` on one node → the entry in every node's pinned policy_map (ms), at "
            f"{pol['n']:,} endpoints",
            "",
            "| measure | p50 / p99 (n) ms | goal |",
            "|---|---|---|",
            f"| other nodes, after `apply` returned | {_pct(o['from_return_ms'])} | - |",
            f"| other nodes, after `apply` was sent | {_pct(o['from_send_ms'])} | - |",
            f"| the applying node, after `apply` was sent | {_pct(pol['applying_node_from_send_ms'])} | - |",
            f"| the `apply` call | {_pct(pol['apply_call_ms'])} | - |",
            "",
        ]
    rss = result.get("rss")
    if rss:
        met = _met(tgt.get("rss"))
        lines += [
            f"## Agent memory with {rss['remote']:,} remote endpoints (a fake fourth node's records written into etcd; "
            f"{rss['local_endpoints']:,} real endpoints besides)",
            "",
            "VmRSS in MB: `fresh` when the agents had just started; `before` with the endpoints above and after "
            "the rr traffic (its flows fill each agent's flow buffer); `after` once every ipcache holds the remote "
            "endpoints, 5 s later. `anon` is the anonymous part of `after` (the rest is mapped files: BCC/LLVM, "
            "Python's libraries).",
            "",
            "| node | fresh | before | after | after − before | anon | VmHWM | L7 processor before → after "
            "| all in the ipcache, s after the last write | goal | met |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        fresh = result.get("idle_agent_memory", {})
        for name, after in rss["after"].items():
            before = rss["before"].get(name, {})
            took = rss["took_in_s"].get(name)
            lines.append(
                f"| {name} | {fresh.get(name, {}).get('VmRSS', 0):,.1f} | {before.get('VmRSS', 0):,.1f} "
                f"| **{after.get('VmRSS', 0):,.1f}** | {after.get('VmRSS', 0) - before.get('VmRSS', 0):+,.1f} "
                f"| {after.get('RssAnon', 0):,.1f} | {after.get('VmHWM', 0):,.1f} "
                f"| {before.get('processor_rss_mb', 0):,.1f} → {after.get('processor_rss_mb', 0):,.1f} "
                f"| {'-' if took is None else f'{took:.1f}'} | <= 150 MB | {met} |")
        idle_b = sum(rss["idle_cpu_per_s_before"].values()) / max(1, len(rss["idle_cpu_per_s_before"]))
        idle_a = sum(rss["idle_cpu_per_s_after"].values()) / max(1, len(rss["idle_cpu_per_s_after"]))
        lines += ["", f"Agent CPU while idle: {idle_b * 100:.1f} % of a CPU per agent before, {idle_a * 100:.1f} % "
                  f"after; taking the records in: "
                  + ", ".join(f"{k} {v:.2f} s" for k, v in rss["agent_cpu_s_taking_in"].items())
                  + " of CPU. Dropped from every ipcache after the lease was revoked: "
                  + ", ".join(f"{k} {'-' if v is None else f'{v:.1f}'} s" for k, v in rss["dropped_s"].items())
                  + "."]
        pr = rss.get("probes")
        if pr:
            lines += ["", f"Steady single adds at {pr['n']:,} local + {rss['remote']:,} remote endpoints: "
                      f"p50 / p99 {_pct(pr['add']['from_return_ms'])} ms after `add` returned, the call "
                      f"{_pct(pr['add']['call_ms'])} ms; agent CPU per add: owner "
                      f"{_ms(pr['agent_cpu_ms']['owner_add_ms'], 'mean')} ms, each other node "
                      f"{_ms(pr['agent_cpu_ms']['other_add_ms'], 'mean')} ms (means)."]
        lines.append("")
    if result.get("skipped"):
        lines += ["Skipped: " + "; ".join(f"{k}: {v}" for k, v in result["skipped"].items()), ""]
    return "\n".join(lines)


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    print(markdown(run(int(harness.env_float("BENCH_ROUNDS", 5)))))
