"""`make bench`, DNS part: the node's DNS proxy (agent/dns/) vs dnsmasq on the same load (SPEC §9).

A real agent runs a node in namespace `mb-dns` (pod CIDR 10.251.0.0/24) with a client endpoint,
whose namespace runs the load generator, and a Service `web` in namespace `default`. Every server
under test listens on the node's router address (the agent's address in its pod CIDR, on the
node's loopback), so every query takes the same path: the client's veth, the agent's TC programs,
the node's loopback:

    echo      bench/dnsload's no-op UDP echo (port 5300): the floor, what the generator, the
              kernel and the path cost
    dnsmasq   Debian's dnsmasq 2.90 as the equivalent node-local cache (port 5353): the Service's
              name as a --host-record with the VIP the agent gave it, --server to the same upstream,
              cache on (10,000 entries)
    proxy     the agent's own DNS proxy (dns_proxy_port 15053, dns_upstreams the same upstream): the
              Service's name from the mesh zone, everything else forwarded and cached

The upstream (the "world") is a second dnsmasq on 198.18.0.53 on the node's loopback,
authoritative for api.example.test (TTL 3600) and for every name under uniq.example.test.

Query kinds, each sent by bench/dnsload (C, one UDP socket, A queries):

    mesh       web.default.svc.cluster.local: a mesh name, answered from the proxy's zone (dnsmasq:
               its host record)
    external   api.example.test: forwarded once, then answered from the cache
    forwarded  q<N>.uniq.example.test, a new name every query: every query goes to the upstream

Per server, kind and round (shuffled order in each of BENCH_ROUNDS rounds):

- **peak** (closed loop, BENCH_DNS_OUTSTANDING queries in flight): queries/s, and the CPU time of
  the server process (utime+stime of every thread, /proc/PID/stat) per query; the headline is
  queries per server CPU-second. For the proxy the process is the whole agent, so its other
  threads count too; the busiest thread alone (the proxy's) is reported beside it.
- **fixed rate** (open loop, BENCH_DNS_RATE, 1,000/s): p50/p99/p99.9 from the scheduled send time,
  lost queries and error answers (reported, not hidden: a run fails only when most queries fail).
  The echo's latency at that rate is the generator's own share (its timer, its wake-ups, the
  kernel's path), the same for every server. During these runs the generator, the server under
  test (every thread) and the upstream run SCHED_FIFO (BENCH_DNS_RT, priority 50; 0: off): they
  use a few percent of a CPU, and other sessions' work on these shared CPUs would otherwise set the
  p99 (milliseconds of run-queue wait). Never during the peak runs, which would starve everyone.

Targets (issue 12): proxy/dnsmasq queries per CPU-second >= 0.5 for cached answers (mesh and
external), and proxy p99 - dnsmasq p99 at 1,000 queries/s <= 1 ms; paired per round.

CPUs: the load generator, the upstream and this harness on one CPU; the server under test (all
of the agent's threads, or dnsmasq, or the echo) on another (the last CPU of a 2-CPU machine).
BENCH_DNS_CPUS="LOAD:SERVER" or "none". Other work on the machine is measured as in bench/l7.py
(`interference`) and a run with more than 0.1 CPU of it is run once more (at most 2 x rounds).

Environment: BENCH_ROUNDS (5), BENCH_DNS_SECONDS (peak, 3), BENCH_DNS_LAT_SECONDS (5),
BENCH_DNS_RATE (1000), BENCH_DNS_OUTSTANDING (16), BENCH_DNS_CONFIGS (echo,dnsmasq,proxy),
BENCH_DNS_KINDS (mesh,external,forwarded), BENCH_DNS_CPUS, BENCH_DNS_RT (50), BENCH_SEED.

`python -m bench.dns` runs this part alone and prints its Markdown; `BENCH_ONLY=dns make bench`
writes it into bench/results/latest.{json,md} beside the other parts' sections.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from bench import harness
from bench.l7 import cpu_seconds, cpus_time, own_cpu, proc_tree
from bench.topology import NS_PREFIX, add_netns, delete_netns

REPO = harness.REPO
DNSLOAD_SOURCE = harness.BENCH_DIR / "dnsload.c"
DNSLOAD_BIN = harness.BENCH_DIR / "bin" / "dnsload"
MESHAGENT = [sys.executable, "-m", "cli.main"]
NETNS = NS_PREFIX + "dns"
CONFIGS = ("echo", "dnsmasq", "proxy")
KINDS = ("mesh", "external", "forwarded")
SERVICE, NAMESPACE, CLUSTER_DOMAIN = "web", "default", "cluster.local"
MESH_NAME = f"{SERVICE}.{NAMESPACE}.svc.{CLUSTER_DOMAIN}"
EXTERNAL_NAME = "api.example.test"
EXTERNAL_IP = "198.18.0.10"
UNIQUE_ZONE = "uniq.example.test"  # dnsload -u asks q<N>.uniq.example.test
UPSTREAM_IP = "198.18.0.53"  # on the node namespace's loopback
POD_CIDR, CLIENT_IP = "10.251.0.0/24", "10.251.0.10"  # the load generator runs in the client endpoint
UPSTREAM_TTL = 3600
DNSMASQ_PORT, ECHO_PORT = 5353, 5300
PROXY_PORT = 15053  # dns_proxy_port (the default)
MAX_INTERFERENCE = 0.1
CLK_TCK = os.sysconf("SC_CLK_TCK")

log = harness.log


# ---- settings ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    rounds: int
    peak_seconds: float
    lat_seconds: float
    warmup_seconds: float
    rate: float
    outstanding: int
    configs: tuple[str, ...]
    kinds: tuple[str, ...]
    load_cpu: int | None  # dnsload, the upstream, the harness; None: no pinning
    server_cpu: int | None  # the server under test
    seed: int
    rt_priority: int = 50  # SCHED_FIFO priority during the fixed-rate runs; 0: normal scheduling

    @classmethod
    def from_env(cls, rounds: int) -> Settings:
        def listed(var: str, known: tuple[str, ...]) -> tuple[str, ...]:
            got = tuple(c.strip() for c in (os.environ.get(var) or ",".join(known)).split(",") if c.strip())
            unknown = [c for c in got if c not in known]
            if unknown:
                raise SystemExit(f"{var}: unknown {', '.join(unknown)}; known: {', '.join(known)}")
            return got

        cpus = sorted(os.sched_getaffinity(0))
        spec = os.environ.get("BENCH_DNS_CPUS", "")
        if spec == "none" or (not spec and len(cpus) < 2):
            load_cpu = server_cpu = None
        elif spec:
            load, _, server = spec.partition(":")
            load_cpu, server_cpu = int(load), int(server)
        else:
            load_cpu, server_cpu = cpus[0], cpus[-1]
        return cls(
            rounds=max(1, rounds),
            peak_seconds=harness.env_float("BENCH_DNS_SECONDS", 3),
            lat_seconds=harness.env_float("BENCH_DNS_LAT_SECONDS", 5),
            warmup_seconds=1.0,
            rate=harness.env_float("BENCH_DNS_RATE", 1000),
            outstanding=int(harness.env_float("BENCH_DNS_OUTSTANDING", 16)),
            configs=listed("BENCH_DNS_CONFIGS", CONFIGS),
            kinds=listed("BENCH_DNS_KINDS", KINDS),
            load_cpu=load_cpu,
            server_cpu=server_cpu,
            seed=harness.seed(),
            rt_priority=int(harness.env_float("BENCH_DNS_RT", 50)),
        )

    def on_load(self, cmd: list[str]) -> list[str]:
        return cmd if self.load_cpu is None else ["taskset", "-c", str(self.load_cpu), *cmd]

    def on_server(self, cmd: list[str]) -> list[str]:
        return cmd if self.server_cpu is None else ["taskset", "-c", str(self.server_cpu), *cmd]


# ---- helpers -------------------------------------------------------------------------------------


def build_dnsload() -> Path:
    """bench/dnsload.c as bench/bin/dnsload."""
    return harness.build_c(DNSLOAD_SOURCE, DNSLOAD_BIN, headers=(harness.LATENCY_HIST_H,))
    DNSLOAD_BIN.parent.mkdir(parents=True, exist_ok=True)
    harness.run(["gcc", "-O2", "-Wall", "-o", str(DNSLOAD_BIN), str(DNSLOAD_SOURCE)])
    log(f"compiled {DNSLOAD_BIN.relative_to(REPO)}")
    return DNSLOAD_BIN


_CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int) -> None:
    if _libc.setns(fd, _CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


def ask(netns: str, addr: str, port: int, name: str, timeout: float = 2.0) -> list[str]:
    """The A records the server at addr:port answers for ``name``, asked from namespace ``netns``; a
    socket keeps the namespace it was made in, so only this thread switches, and back at once."""
    from dnslib import QTYPE, DNSRecord

    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(f"/run/netns/{netns}", os.O_RDONLY)
    try:
        _setns(target)
        try:
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        finally:
            _setns(home)
    finally:
        os.close(target)
        os.close(home)
    with s:
        s.settimeout(timeout)
        s.sendto(DNSRecord.question(name).pack(), (addr, port))
        reply = DNSRecord.parse(s.recv(4096))
    return [str(rr.rdata) for rr in reply.rr if rr.rtype == QTYPE.A]


def _tasks(pid: int) -> list[str]:
    try:
        return os.listdir(f"/proc/{pid}/task")
    except OSError:
        return []


def thread_cpu(pids: list[int]) -> dict[tuple[int, int], float]:
    """utime + stime of every thread of these processes, in seconds."""
    out = {}
    for pid in pids:
        with contextlib.suppress(OSError):
            for tid in os.listdir(f"/proc/{pid}/task"):
                with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{tid}/stat") as f:
                    fields = f.read().rpartition(")")[2].split()
                    out[(pid, int(tid))] = (int(fields[11]) + int(fields[12])) / CLK_TCK
    return out


def _tail(path: Path, lines: int = 5) -> str:
    try:
        return " | ".join(path.read_text(errors="replace").strip().splitlines()[-lines:]) or "(empty log)"
    except OSError:
        return "(no log)"


@dataclass
class Server:
    config: str
    addr: str
    port: int
    proc: subprocess.Popen  # for the proxy: the agent
    own_pid: bool = False  # count this process only, not its children (the agent's L7 processor)


class AgentNode:
    """The real agent in namespace mb-dns (its DNS proxy on, forwarding to the upstream), a client
    endpoint whose namespace runs the load generator, and a Service whose name the proxy answers."""

    def __init__(self, janitor: harness.Janitor, tmp: Path) -> None:
        self.janitor, self.dir = janitor, tmp / "agent"
        self.dir.mkdir()
        self.config = {
            "node_name": NETNS,
            "pod_cidr": POD_CIDR,
            "store": f"dir://{self.dir}/store",
            "state_dir": str(self.dir / "state"),
            "bpffs_dir": str(harness.BPFFS_DIR / "dns"),
            "cgroup": str(harness.CGROUP_DIR / "dns"),
            "api_socket": str(self.dir / "api.sock"),
            "metrics_addr": "127.0.0.1:9962",  # in the node's own namespace
        }
        from agent import node_config

        if "dns_upstreams" in node_config._KEYS:  # before the proxy the agent refuses the key
            self.config.update(dns_proxy=True, dns_proxy_port=PROXY_PORT, dns_upstreams=[UPSTREAM_IP])
        self.config_path = self.dir / "agent.yaml"
        self.config_path.write_text(yaml.safe_dump(self.config))
        self.log_path = self.dir / "agent.log"
        self.proc: subprocess.Popen | None = None

    def cli(self, *args: str) -> str:
        return harness.run([*MESHAGENT, "--socket", self.config["api_socket"], *args], cwd=REPO, timeout=90).stdout

    def start(self) -> None:
        self.janitor.push("tear down the DNS bench's agent", self.teardown)
        log_file = open(self.log_path, "ab")  # noqa: SIM115 - closed by the janitor
        self.janitor.push("close the agent's log", log_file.close)
        self.proc = subprocess.Popen(harness.in_netns(NETNS, [*MESHAGENT, "agent", "--config", str(self.config_path)]),
                                     cwd=REPO, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)

    def build(self, timeout: float = 180) -> tuple[str, str, str | None]:
        """Wait until ready, then the client endpoint and the Service: (the client's namespace, the
        node's router address, the DNS proxy's host:port or None without one)."""
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise harness.BenchError(f"agent exited ({self.proc.returncode}): {_tail(self.log_path)}")
            status = harness.run([*MESHAGENT, "--socket", self.config["api_socket"], "status", "-o", "json"],
                                 cwd=REPO, check=False, timeout=30)
            if status.returncode == 0:
                break
            if time.monotonic() > deadline:
                raise harness.BenchError(f"agent not ready after {timeout:.0f}s: {_tail(self.log_path)}")
            time.sleep(0.3)
        ep = json.loads(self.cli("endpoint", "add", f"{NETNS}-c", "--labels", "app=bench-dns-client",
                                 "--ip", CLIENT_IP, "-o", "json"))
        service = self.dir / "service.yaml"
        service.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Service", "metadata": {"name": SERVICE, "namespace": NAMESPACE},
            "spec": {"selector": {"app": SERVICE}, "ports": [{"port": 80, "protocol": "TCP"}]}}))
        self.cli("apply", "-f", str(service))
        info = json.loads(self.cli("status", "-o", "json"))
        router = info["l7_processor"]["listen"].rpartition(":")[0]
        dns = info.get("dns_proxy")
        return Path(ep["netns"]).name, router, dns["listen"] if dns else None

    def vip(self, name: str) -> str:
        for svc in json.loads(self.cli("service", "list", "-o", "json")):
            if svc.get("name") == name and svc.get("namespace", NAMESPACE) == NAMESPACE:
                return svc.get("vip") or svc.get("cluster_ip") or svc["clusterIP"]
        raise harness.BenchError(f"the agent has no Service {NAMESPACE}/{name}")

    def teardown(self) -> None:
        if self.proc is not None:
            harness.stop_process(self.proc, grace=20)
        harness.run(harness.in_netns(NETNS, [*MESHAGENT, "teardown", "--config", str(self.config_path),
                                             "--endpoints"]), cwd=REPO, check=False)
        delete_netns(f"{NETNS}-c")  # if the agent's teardown could not
        shutil.rmtree(self.config["bpffs_dir"], ignore_errors=True)
        harness.remove_cgroup_tree(Path(self.config["cgroup"]))


# ---- the bench -----------------------------------------------------------------------------------


class Bench:
    def __init__(self, s: Settings, janitor: harness.Janitor, tmp: Path) -> None:
        self.s, self.janitor, self.tmp = s, janitor, tmp
        self.servers: dict[str, Server] = {}
        self.upstream: subprocess.Popen | None = None
        self.notes: dict[str, Any] = {}
        self.retries_left = 2 * s.rounds
        self.vip = ""
        self.agent: AgentNode | None = None
        self.client_netns = ""  # the client endpoint's namespace: dnsload runs there
        self.router_ip = ""  # the node's address in its pod CIDR: every server under test listens on it
        self.skipped: dict[str, str] = {}  # servers that could not be set up, and why

    def _start(self, name: str, cmd: list[str]) -> tuple[subprocess.Popen, Path]:
        log_path = self.tmp / f"{name}.log"
        log_file = open(log_path, "ab")  # noqa: SIM115 - closed by the janitor
        self.janitor.push(f"close {log_path.name}", log_file.close)
        proc = harness.spawn(self.janitor, name, harness.in_netns(NETNS, cmd), stdout=log_file,
                             stderr=subprocess.STDOUT, cwd=REPO)
        return proc, log_path

    def _wait_answer(self, what: str, proc: subprocess.Popen, log_path: Path, addr: str, port: int,
                     name: str, want: str | None, timeout: float = 20, netns: str = "") -> None:
        """Ask from the client endpoint (or ``netns``) until the answer is ``want``."""
        deadline, last = time.monotonic() + timeout, ""
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise harness.BenchError(f"{what} exited ({proc.returncode}): {_tail(log_path)}")
            try:
                got = ask(netns or self.client_netns, addr, port, name, timeout=1.0)
                if want is None or got == [want]:
                    return
                last = f"answered {got}"
            except OSError as e:
                last = str(e)
            time.sleep(0.2)
        raise harness.BenchError(f"{what} does not answer {name} on {addr}:{port} ({last}): {_tail(log_path)}")

    def dnsmasq(self, name: str, addr: str, port: int, args: list[str], cpu: Callable[[list[str]], list[str]]
                ) -> tuple[subprocess.Popen, Path]:
        cmd = ["dnsmasq", "--keep-in-foreground", "--no-resolv", "--no-hosts", "--no-poll", "--bind-interfaces",
               f"--listen-address={addr}", f"--port={port}", "--user=root", "--pid-file=",
               f"--log-facility={self.tmp / (name + '.syslog')}", *args]
        (self.tmp / f"{name}.cmd").write_text(" ".join(cmd) + "\n")
        return self._start(name, cpu(cmd))

    def start(self) -> None:
        add_netns(self.janitor, NETNS)
        harness.run(["ip", "-n", NETNS, "link", "set", "lo", "up"])
        harness.run(["ip", "-n", NETNS, "addr", "add", f"{UPSTREAM_IP}/32", "dev", "lo"])
        self.notes["dnsmasq"] = harness.run(["dnsmasq", "--version"]).stdout.splitlines()[0]
        # The world: authoritative for the external names, on the load CPU (it works only on misses).
        self.upstream, log_path = self.dnsmasq(
            "upstream", UPSTREAM_IP, 53,
            [f"--host-record={EXTERNAL_NAME},{EXTERNAL_IP}", f"--address=/{UNIQUE_ZONE}/198.18.0.20",
             f"--local-ttl={UPSTREAM_TTL}", "--cache-size=0"], self.s.on_load)
        self._wait_answer("the upstream dnsmasq", self.upstream, log_path, UPSTREAM_IP, 53, EXTERNAL_NAME,
                          EXTERNAL_IP, netns=NETNS)
        self.agent = AgentNode(self.janitor, self.tmp)
        self.agent.start()
        self.client_netns, self.router_ip, proxy_listen = self.agent.build()
        self.vip = self.agent.vip(SERVICE)
        self.notes["service"] = f"{MESH_NAME} -> {self.vip}"
        if "proxy" in self.s.configs:
            if proxy_listen is None:
                self.skipped["proxy"] = "the agent has no DNS proxy in this checkout (agent/dns/proxy.py)"
            else:
                host, _, port = proxy_listen.rpartition(":")
                self.servers["proxy"] = Server("proxy", host, int(port), self.agent.proc, own_pid=True)
                self._wait_answer("the agent's DNS proxy", self.agent.proc, self.agent.log_path, host, int(port),
                                  MESH_NAME, self.vip)
        if "echo" in self.s.configs:
            proc, log_path = self._start("echo", self.s.on_server(
                [str(DNSLOAD_BIN), "echo", self.router_ip, str(ECHO_PORT)]))
            self.servers["echo"] = Server("echo", self.router_ip, ECHO_PORT, proc)
        if "dnsmasq" in self.s.configs:
            proc, log_path = self.dnsmasq(
                "dnsmasq", self.router_ip, DNSMASQ_PORT,
                [f"--host-record={MESH_NAME},{self.vip}", f"--server={UPSTREAM_IP}", "--cache-size=10000",
                 "--local-ttl=30"], self.s.on_server)
            self._wait_answer("dnsmasq", proc, log_path, self.router_ip, DNSMASQ_PORT, MESH_NAME, self.vip)
            self.servers["dnsmasq"] = Server("dnsmasq", self.router_ip, DNSMASQ_PORT, proc)
        # Every thread of the agent goes to the server CPU (its BCC compile ran on the load CPU).
        # Its L7 processor, a process of its own started meanwhile, stays on the load CPU, idle.
        if self.s.server_cpu is not None:
            harness.run(["taskset", "-a", "-p", "-c", str(self.s.server_cpu), str(self.agent.proc.pid)])

    # -- measuring --

    def server_pids(self, srv: Server) -> list[int]:
        return [srv.proc.pid] if srv.own_pid else proc_tree(srv.proc.pid)

    def our_pids(self) -> list[int]:
        """Every process of this bench: the servers, the upstream, the agent and its L7 processor."""
        pids = {self.upstream.pid} if self.upstream else set()
        for srv in self.servers.values():
            pids.update(self.server_pids(srv))
        if self.agent is not None and self.agent.proc is not None:
            pids.update(proc_tree(self.agent.proc.pid))
        return sorted(pids)

    def _timed(self, srv: Server, cmd: list[str], timeout: float) -> tuple[dict, float, float, float, float]:
        """Run dnsload; returns its result, wall seconds, the server's CPU seconds, its busiest
        thread's CPU seconds, and the interference (other processes' CPUs on the CPUs used)."""
        if srv.proc.poll() is not None:
            raise harness.BenchError(f"{srv.config} exited ({srv.proc.returncode})")
        pids = self.server_pids(srv)
        cpus = None if self.s.load_cpu is None else {self.s.load_cpu, self.s.server_cpu}
        m0, o0 = cpus_time(cpus), own_cpu() + cpu_seconds(self.our_pids())
        t0, p0, w0 = thread_cpu(pids), cpu_seconds(pids), time.monotonic()
        out = harness.run(self.s.on_load(harness.in_netns(self.client_netns, cmd)), timeout=timeout).stdout
        wall = time.monotonic() - w0
        p1, t1 = cpu_seconds(pids), thread_cpu(pids)
        m1, o1 = cpus_time(cpus), own_cpu() + cpu_seconds(self.our_pids())
        busiest = max((t1[k] - t0.get(k, 0.0) for k in t1), default=0.0)
        return json.loads(out), wall, p1 - p0, busiest, max(0.0, (m1 - m0 - (o1 - o0)) / wall)

    def names(self, kind: str) -> tuple[list[str], list[str]]:
        """dnsload's flags and names for a kind of query."""
        return {"noop": ([], [MESH_NAME]), "mesh": ([], [MESH_NAME]), "external": ([], [EXTERNAL_NAME]),
                "forwarded": (["-u"], [UNIQUE_ZONE])}[kind]

    def peak(self, srv: Server, kind: str) -> dict[str, float]:
        flags, names = self.names(kind)
        flags = [*flags, "-e"] if srv.config == "echo" else flags
        cmd = [str(DNSLOAD_BIN), "peak", "-w", f"{self.s.warmup_seconds:g}", "-n", str(self.s.outstanding),
               *flags, srv.addr, str(srv.port), f"{self.s.peak_seconds:g}", *names]
        r, wall, cpu, thread, others = self._timed(srv, cmd, self.s.peak_seconds + 30)
        self._check(srv, kind, r)
        total = r["total_completed"]
        return {"qps": r["achieved_rate"], "peak_lost": r["lost"], "peak_errors": r["errors"],
                "cpu_us_per_q": cpu / total * 1e6 if total else None,
                "q_per_cpu_s": total / cpu if cpu else None, "busy": cpu / wall,
                "q_per_thread_cpu_s": total / thread if thread else None, "thread_busy": thread / wall,
                "peak_p99_ms": r["p99_us"] / 1e3, "interference": others}

    def fixed(self, srv: Server, kind: str) -> dict[str, float]:
        flags, names = self.names(kind)
        flags = [*flags, "-e"] if srv.config == "echo" else flags
        cmd = [str(DNSLOAD_BIN), "rate", "-w", f"{self.s.warmup_seconds:g}", "-d", "1", *flags, srv.addr,
               str(srv.port), f"{self.s.rate:g}", f"{self.s.lat_seconds:g}", *names]
        if self.s.rt_priority:
            cmd = ["chrt", "-f", str(self.s.rt_priority), *cmd]
        with self.realtime([*self.server_pids(srv), *([self.upstream.pid] if self.upstream else [])]):
            r, wall, cpu, _, others = self._timed(srv, cmd, self.s.warmup_seconds + self.s.lat_seconds + 30)
        self._check(srv, kind, r)
        total = r["total_completed"]
        return {"p50_ms": r["p50_us"] / 1e3, "p90_ms": r["p90_us"] / 1e3, "p99_ms": r["p99_us"] / 1e3,
                "p999_ms": r["p999_us"] / 1e3, "lost": r["lost"], "errors": r["errors"],
                "send_lag_p99_ms": r["send_lag_p99_us"] / 1e3,
                "fixed_cpu_us_per_q": cpu / total * 1e6 if total else None, "interference": others}

    @contextlib.contextmanager
    def realtime(self, pids: list[int]) -> Iterator[None]:
        """SCHED_FIFO for every thread of these processes while the fixed-rate run lasts (a few percent
        of a CPU at 1,000 queries/s), so that other sessions' work on these shared CPUs does not set the
        p99; never for the peak runs, which would take both CPUs from everyone else."""
        tids = [int(t) for pid in pids for t in _tasks(pid)] if self.s.rt_priority else []
        done = []
        try:
            for tid in tids:
                with contextlib.suppress(ProcessLookupError):
                    os.sched_setscheduler(tid, os.SCHED_FIFO, os.sched_param(self.s.rt_priority))
                    done.append(tid)
            yield
        finally:
            for tid in done:
                with contextlib.suppress(ProcessLookupError):
                    os.sched_setscheduler(tid, os.SCHED_OTHER, os.sched_param(0))

    @staticmethod
    def _check(srv: Server, kind: str, r: dict) -> None:
        """Error answers and lost queries are reported; a server that fails most of them is broken."""
        if r["sent"] and (r["errors"] + r["lost"]) * 2 > r["sent"]:
            raise harness.BenchError(f"{srv.config} {kind}: {r['errors']} error answers and {r['lost']} lost "
                                     f"of {r['sent']} queries")

    def measure(self, srv: Server, kind: str) -> dict[str, float]:
        """One round of a server and a kind. A run during which other processes used more than
        MAX_INTERFERENCE CPUs is run once more (other sessions' tests share these VMs)."""

        def again(what: str, fn: Callable[[], dict[str, float]]) -> dict[str, float]:
            sample = fn()
            if sample["interference"] > MAX_INTERFERENCE and self.retries_left > 0:
                self.retries_left -= 1
                log(f"dns {srv.config} {kind} {what}: {sample['interference']:.2f} CPUs of other work meanwhile, "
                    "again")
                sample = fn()
                sample["retried"] = 1
            return sample

        peak = again("peak", lambda: self.peak(srv, kind))
        fixed = again("fixed rate", lambda: self.fixed(srv, kind))
        return {**peak, **{k: v for k, v in fixed.items() if k not in ("interference", "retried")},
                "lat_interference": fixed["interference"],
                "retried": peak.get("retried", 0) + fixed.get("retried", 0)}

    def targets(self) -> list[tuple[str, Server, str]]:
        """(sample key, server, kind): the echo once, the others per kind."""
        out = []
        for config, srv in self.servers.items():
            for kind in (("noop",) if config == "echo" else self.s.kinds):
                out.append((config if config == "echo" else f"{config} {kind}", srv, kind))
        return out


# ---- summarising ---------------------------------------------------------------------------------

METRICS = ("qps", "peak_lost", "peak_errors",
           "cpu_us_per_q", "q_per_cpu_s", "busy", "q_per_thread_cpu_s", "thread_busy", "peak_p99_ms",
           "interference", "p50_ms", "p90_ms", "p99_ms", "p999_ms", "lost", "errors", "send_lag_p99_ms",
           "fixed_cpu_us_per_q", "lat_interference", "retried")


def summarise(samples: dict[str, list[dict | None]], kinds: tuple[str, ...]) -> tuple[dict, dict, list[dict]]:
    summary = {
        key: {m: harness.spread([r.get(m) if r else None for r in rounds]) for m in METRICS}
        for key, rounds in samples.items()
    }
    summary = {k: {m: v for m, v in ms.items() if v} for k, ms in summary.items()}
    ratio: Callable[[float, float], float] = lambda x, y: x / y  # noqa: E731
    diff: Callable[[float, float], float] = lambda x, y: x - y  # noqa: E731
    ratios = {}
    for kind in kinds:
        for key, num, den, metric, op in (
            (f"proxy/dnsmasq {kind} q_per_cpu_s", f"proxy {kind}", f"dnsmasq {kind}", "q_per_cpu_s", ratio),
            (f"proxy/dnsmasq {kind} q_per_thread_cpu_s", f"proxy {kind}", f"dnsmasq {kind}", "q_per_thread_cpu_s",
             ratio),
            (f"proxy/dnsmasq {kind} qps", f"proxy {kind}", f"dnsmasq {kind}", "qps", ratio),
            (f"proxy - dnsmasq {kind} p50_ms", f"proxy {kind}", f"dnsmasq {kind}", "p50_ms", diff),
            (f"proxy - dnsmasq {kind} p99_ms", f"proxy {kind}", f"dnsmasq {kind}", "p99_ms", diff),
            (f"dnsmasq - echo {kind} p99_ms", f"dnsmasq {kind}", "echo", "p99_ms", diff),
        ):
            got = harness.paired(samples, num, den, metric, op)
            if got:
                ratios[key] = got

    def target(name: str, key: str, ok: Callable[[float], bool], goal: str) -> dict:
        return harness.target(ratios, name, key, ok, goal)

    targets = []
    for kind in ("mesh", "external"):
        if kind in kinds:
            targets.append(target(f"queries per CPU-second vs dnsmasq, cached {kind} name",
                                  f"proxy/dnsmasq {kind} q_per_cpu_s", lambda v: v >= 0.5, ">= 0.5x"))
    for kind in ("mesh", "external"):
        if kind in kinds:
            targets.append(target(f"added p99 at the fixed rate, cached {kind} name",
                                  f"proxy - dnsmasq {kind} p99_ms", lambda v: v <= 1.0, "<= 1 ms"))
    return summary, ratios, targets


# ---- report --------------------------------------------------------------------------------------

_fmt = harness.fmt


def markdown(result: dict) -> str:
    s = result["settings"]
    pin = (f"dnsload, the upstream and the harness on CPU {s['load_cpu']}, the server under test on CPU "
           f"{s['server_cpu']}" if s["load_cpu"] is not None else "no CPU pinning")
    lines = [
        "# meshagent bench: DNS proxy vs dnsmasq",
        "",
        f"{result['started']} · {result['machine']['cpus']} CPUs · {result['notes'].get('dnsmasq', '')} · "
        f"{s['rounds']} rounds, interleaved in shuffled order (seed {s['seed']}) · peak: bench/dnsload, "
        f"{s['outstanding']} queries in flight, {s['peak_seconds']:g} s · fixed rate: {s['rate']:,.0f} queries/s "
        f"open loop, {s['lat_seconds']:g} s after {s['warmup_seconds']:g} s warm-up"
        + (f", generator, server and upstream SCHED_FIFO {s['rt_priority']}" if s.get("rt_priority") else "")
        + f" · {pin}",
        "",
        f"Names: mesh `{MESH_NAME}` (proxy: its zone; dnsmasq: a host record), external `{EXTERNAL_NAME}` "
        f"(forwarded once, TTL {UPSTREAM_TTL} s, then cached), forwarded `q<N>.{UNIQUE_ZONE}` (a new name each "
        "query: every one goes to the upstream dnsmasq). Each cell: median (min–max) over rounds. Server CPU: "
        "utime+stime of the server process from /proc/PID/stat (the proxy's is the whole agent's; its busiest "
        "thread, the proxy's loop, beside it); busy: CPU-seconds per second. `echo` is bench/dnsload's no-op "
        "UDP echo: the generator's and the kernel's share. Interference: CPUs' worth of other processes' "
        f"time on the CPUs used; a run with more than {MAX_INTERFERENCE} is run once more.",
        "",
        "| server, name | peak q/s | server CPU µs/q | q per server CPU-s | busy | q per busiest-thread CPU-s "
        f"| interference | p50 ms @{s['rate']:,.0f}/s | p99 ms | p99.9 ms | lost / error answers "
        f"| CPU µs/q @{s['rate']:,.0f}/s | interference |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for key in result["order"]:
        if key in result["skipped"]:
            lines.append(f"| {key} | skipped: {result['skipped'][key]} |||||||||||| ")
            continue
        m = result["summary"].get(key, {})
        lines.append(
            f"| {key} | {_fmt(m.get('qps'))} | {_fmt(m.get('cpu_us_per_q'), 1)} | {_fmt(m.get('q_per_cpu_s'))} "
            f"| {_fmt(m.get('busy'), 2)} | {_fmt(m.get('q_per_thread_cpu_s'))} | {_fmt(m.get('interference'), 2)} "
            f"| {_fmt(m.get('p50_ms'), 3)} | {_fmt(m.get('p99_ms'), 3)} | {_fmt(m.get('p999_ms'), 3)} "
            f"| {_fmt(m.get('lost'))} / {_fmt(m.get('errors'))} | {_fmt(m.get('fixed_cpu_us_per_q'), 1)} "
            f"| {_fmt(m.get('lat_interference'), 2)} |")
    lines += ["", "Paired per round (x/y: ratio; x - y: difference):", "", "| comparison | median (min–max) |",
              "|---|---|"]
    for key, stat in result["ratios"].items():
        lines.append(f"| {key} | {_fmt(stat, 3)} |")
    lines += ["", "Targets:", "", "| target | measure | goal | median | met |", "|---|---|---|---|---|"]
    for t in result["targets"]:
        med = "-" if t["median"] is None else (f"{t['median']:,.3f}x" if t["goal"].endswith("x")
                                               else f"{t['median']:,.3f} ms")
        met = "not measured" if t["median"] is None else {True: "yes", False: "**no**"}[t["met"]]
        lines.append(f"| {t['target']} | {t['measure']} | {t['goal']} | {med} | {met} |")
    extra = {k: v for k, v in result["notes"].items() if k != "dnsmasq"}
    if extra:
        lines += ["", "Notes: " + "; ".join(f"{k}: {v}" for k, v in extra.items())]
    if result["skipped"]:
        lines += ["", "Skipped: " + "; ".join(f"{c}: {why}" for c, why in result["skipped"].items())]
    return "\n".join(lines) + "\n"


# ---- the run -------------------------------------------------------------------------------------


def preflight() -> None:
    if os.geteuid() != 0:
        raise SystemExit("the DNS bench needs root (a network namespace, the agent)")
    missing = [t for t in ("gcc", "dnsmasq", "taskset", "nsenter", "ip") if shutil.which(t) is None]
    if missing:
        raise SystemExit(f"missing tools: {', '.join(missing)} (`make install` installs them)")


def remove_leftovers() -> None:
    """What a run killed outright left: our exact names only."""
    for name in (f"{NETNS}-c", NETNS):
        if os.path.exists(f"/run/netns/{name}"):
            log(f"dns: removing netns {name} left by an earlier run")
            delete_netns(name)
    shutil.rmtree(harness.BPFFS_DIR / "dns", ignore_errors=True)
    harness.remove_cgroup_tree(harness.CGROUP_DIR / "dns")


def run(rounds: int) -> dict:
    """Measure the DNS part; returns its section of the results."""
    preflight()
    s = Settings.from_env(rounds)
    started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    janitor = harness.Janitor()
    tmp = Path(tempfile.mkdtemp(prefix="meshagent-bench-dns-"))
    janitor.push(f"remove {tmp}", lambda: shutil.rmtree(tmp, ignore_errors=True))
    old_affinity = os.sched_getaffinity(0)
    skipped: dict[str, str] = {}
    samples: dict[str, list[dict | None]] = {}
    bench = Bench(s, janitor, tmp)
    order: list[str] = []
    try:
        if s.load_cpu is not None:  # this harness stays off the server's CPU
            os.sched_setaffinity(0, {s.load_cpu})
        remove_leftovers()
        build_dnsload()
        bench.start()
        skipped.update(bench.skipped)
        targets = bench.targets()
        order = [key for key, _, _ in targets]
        log(f"dns: {', '.join(order)} ready; warming up")
        for key, srv, kind in list(targets):
            try:
                bench.fixed(srv, kind)  # also fills the caches: the external name's first query
            except Exception as e:
                skipped[key] = str(e)
                log(f"dns {key}: SKIPPED: {e}")
                targets.remove((key, srv, kind))
        rng = random.Random(s.seed)
        samples = {key: [] for key, _, _ in targets}
        for round_no in range(1, s.rounds + 1):
            rng.shuffle(targets)
            for key, srv, kind in targets:
                try:
                    sample = bench.measure(srv, kind)
                except Exception as e:  # one bad sample does not end the run
                    log(f"dns round {round_no}/{s.rounds} {key}: FAILED: {e}")
                    samples[key].append(None)
                    continue
                samples[key].append(sample)
                log(f"dns round {round_no}/{s.rounds} {key:18} {sample['qps']:8,.0f} q/s "
                    f"{sample['cpu_us_per_q'] or 0:6.1f} CPU-µs/q (busy {sample['busy']:.2f})  "
                    f"@{s.rate:,.0f}/s: p50 {sample['p50_ms']:.3f} ms p99 {sample['p99_ms']:.3f} ms")
    except harness.BenchError as e:
        log(f"dns: FAILED: {e}")
        skipped.update({c: str(e) for c in s.configs if not any(k.startswith(c) for k in samples)})
    finally:
        log("dns: cleaning up")
        janitor.run_all()
        os.sched_setaffinity(0, old_affinity)
    summary, ratios, targets_ = summarise(samples, s.kinds)
    return {
        "started": started,
        "machine": {"cpus": os.cpu_count()},
        "settings": {**s.__dict__, "configs": list(s.configs), "kinds": list(s.kinds)},
        "order": order or list(s.configs),
        "skipped": skipped,
        "notes": bench.notes,
        "summary": summary,
        "ratios": ratios,
        "targets": targets_,
        "samples": samples,
    }


def main() -> int:
    import signal

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwind through the cleanup
    result = run(int(harness.env_float("BENCH_ROUNDS", 5)))
    print()
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())

