"""Namespaces laid out as agent/endpoint.py plumbs them, without an agent: for tests that drive one
datapath object directly (Datapath, SocketDatapath). Everything made here is listed and removed by
`Topology.cleanup()`, which also kills the processes started with `Topology.spawn()` by PID.

    node netns   IP forwarding, the router IP on lo, one veth per endpoint with a /32 route and a
                 permanent neighbour entry
    endpoints    eth0 with the endpoint's /32, default route via 169.254.1.1 (the host-side veth)

A subclass lays out its test's topology in `setup()`; `with topo.session():` runs it, and runs
`cleanup()` afterwards, also when setup or a test fails and when the run gets a SIGTERM.
"""

from __future__ import annotations

import contextlib
import ctypes as ct
import os
import select
import shutil
import signal
import subprocess
from collections.abc import Iterator

from agent.datapath import maps
from agent.datapath.sockets import SocketDatapath
from agent.datapath.tc import TcDatapath
from agent.reconcile import ServiceTable, Sync, lb_table

GATEWAY = "169.254.1.1"
PIN_ROOT = "/sys/fs/bpf/meshagent-test"


def run(*args: str) -> str:
    proc = subprocess.run(list(args), capture_output=True, text=True)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(args)}: {proc.stderr.strip()}")
    return proc.stdout


def sync_services(dp: SocketDatapath, services: dict, flags: dict | None = None) -> None:
    """Make ``dp``'s service table ``services`` ((vip, port, proto) -> [(ip, port), ...]) the way the
    agent's reconcile path writes it (agent.reconcile.ServiceTable), for tests without an agent."""
    Sync([ServiceTable(dp)]).apply({"lb_services": lb_table(services, flags)})


def remove_redirect_pins(pin_dir: str) -> None:
    """Detach the socket programs found through the maps pinned in ``pin_dir`` (so also those of a
    restarted copy), then delete the pins, and the pin root once it is empty. Never raises."""
    with contextlib.suppress(Exception):
        SocketDatapath(pin_dir).detach()
    shutil.rmtree(pin_dir, ignore_errors=True)
    with contextlib.suppress(OSError):
        os.rmdir(PIN_ROOT)


@contextlib.contextmanager
def in_netns(path: str):
    """Run the block with this thread in another network namespace (netlink sockets made inside
    belong to it), then come back."""
    libc = ct.CDLL(None, use_errno=True)
    here = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    there = os.open(path, os.O_RDONLY)
    try:
        if libc.setns(there, 0x40000000) != 0:
            raise OSError(ct.get_errno(), f"setns {path}")
        try:
            yield
        finally:
            if libc.setns(here, 0x40000000) != 0:
                raise OSError(ct.get_errno(), "setns back")
    finally:
        os.close(here)
        os.close(there)


def _terminated(signum, frame):
    raise SystemExit(f"terminated by signal {signum}")


class Topology:
    def __init__(self, tag: str, node: str, router_ip: str | None = None, ipv6: bool = True) -> None:
        """``ipv6=False`` turns IPv6 off in every namespace (as agent/endpoint.py does in endpoints), so
        router solicitations do not show up in the datapath."""
        self.tag, self.node, self.router_ip, self.ipv6 = tag, node, router_ip, ipv6
        self.endpoints: dict[str, tuple[str, str]] = {}  # name -> (netns, ip)
        self.host_ifs: dict[str, str] = {}  # name -> its host-side veth in the node netns
        self.procs: list[subprocess.Popen] = []

    def _no_ipv6(self) -> list[str]:
        return [] if self.ipv6 else ["net.ipv6.conf.all.disable_ipv6=1", "net.ipv6.conf.default.disable_ipv6=1"]

    def setup_node(self) -> None:
        run("ip", "netns", "add", self.node)
        run("ip", "-n", self.node, "link", "set", "lo", "up")
        run("ip", "netns", "exec", self.node, "sysctl", "-qw", "net.ipv4.ip_forward=1", *self._no_ipv6())
        if self.router_ip:
            run("ip", "-n", self.node, "addr", "add", f"{self.router_ip}/32", "dev", "lo")

    def add_endpoint(self, name: str, netns: str, ip: str) -> str:
        """Plumb endpoint ``name``; returns its host-side veth's name."""
        i = len(self.endpoints) + 1
        host, host_mac, ep_mac = f"{self.tag}{i}", f"0a:00:00:00:{i:02x}:01", f"0a:00:00:00:{i:02x}:02"
        self.endpoints[name] = (netns, ip)
        self.host_ifs[name] = host
        run("ip", "netns", "add", netns)
        if not self.ipv6:
            run("ip", "netns", "exec", netns, "sysctl", "-qw", *self._no_ipv6())
        run("ip", "-n", self.node, "link", "add", host, "address", host_mac, "type", "veth",
            "peer", "name", "eth0", "address", ep_mac, "netns", netns)
        run("ip", "-n", self.node, "link", "set", host, "up")
        run("ip", "-n", self.node, "route", "replace", f"{ip}/32", "dev", host, "scope", "link")
        run("ip", "-n", self.node, "neigh", "replace", ip, "lladdr", ep_mac, "dev", host, "nud", "permanent")
        run("ip", "-n", netns, "link", "set", "lo", "up")
        run("ip", "-n", netns, "addr", "add", f"{ip}/32", "dev", "eth0")
        run("ip", "-n", netns, "link", "set", "eth0", "up")
        run("ip", "-n", netns, "route", "replace", f"{GATEWAY}/32", "dev", "eth0", "scope", "link")
        run("ip", "-n", netns, "route", "replace", "default", "via", GATEWAY, "dev", "eth0")
        run("ip", "-n", netns, "neigh", "replace", GATEWAY, "lladdr", host_mac, "dev", "eth0", "nud", "permanent")
        return host

    def netns_of(self, name: str) -> str:
        return self.node if name == "node" else self.endpoints[name][0]

    def spawn(self, where: str, argv: list[str], *, nsenter: bool = False,
              stderr: int | None = None) -> subprocess.Popen:
        """Start ``argv`` inside endpoint ``where`` (or "node"), its stdout piped; killed in cleanup.

        ``nsenter=True`` enters the network namespace only: ``ip netns exec`` mounts a /sys of the
        namespace's own, which hides the host's bpffs (KERNEL-NOTES)."""
        enter = (["nsenter", f"--net=/run/netns/{self.netns_of(where)}"] if nsenter
                 else ["ip", "netns", "exec", self.netns_of(where)])
        proc = subprocess.Popen([*enter, *argv], stdout=subprocess.PIPE, stderr=stderr, text=True,
                                start_new_session=True)
        self.procs.append(proc)
        return proc

    def spawn_ready(self, where: str, argv: list[str], *, nsenter: bool = False,
                    timeout: float = 20.0) -> subprocess.Popen:
        """`spawn()`, then wait for the process's first line, which must be "ready"."""
        proc = self.spawn(where, argv, nsenter=nsenter, stderr=subprocess.PIPE)
        line = self.readline(proc, timeout)
        assert line == "ready", f"{argv[-1]}: {line!r} {proc.stderr.read() if proc.poll() is not None else ''}"
        return proc

    @staticmethod
    def readline(proc: subprocess.Popen, timeout: float) -> str | None:
        """The next line ``proc`` prints, stripped, or None if it prints none within ``timeout``."""
        ready, _, _ = select.select([proc.stdout], [], [], timeout)
        return proc.stdout.readline().strip() if ready else None

    def setup(self) -> None:
        """Lay out the test's topology: `setup_node()`, `add_endpoint()`, `spawn()`..."""
        raise NotImplementedError

    @contextlib.contextmanager
    def session(self) -> Iterator[Topology]:
        """`setup()`, hand the topology over, `cleanup()`: also when setup or the block fails, and on a
        SIGTERM (a CI timeout), so that nothing of ours stays attached."""
        previous = signal.signal(signal.SIGTERM, _terminated)
        try:
            self.setup()
            yield self
        finally:
            self.cleanup()
            signal.signal(signal.SIGTERM, previous)

    def collect_flow_events(self, dp: TcDatapath) -> None:
        """Keep every flow event ``dp``'s ring buffer reports, for flow_events()."""
        self._events_dp, self.events = dp, []
        dp.open_events(lambda ev: self.events.append(maps.FlowEventC.from_buffer_copy(bytes(ev))))

    def flow_events(self) -> list[maps.FlowEventC]:
        """The flow events reported since the last call."""
        self._events_dp.drain_events()
        out, self.events[:] = list(self.events), []
        return out

    def cleanup(self) -> None:
        for proc in self.procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(Exception):
                proc.wait(5)
        for netns, _ in self.endpoints.values():
            subprocess.run(["ip", "netns", "del", netns], capture_output=True)
        subprocess.run(["ip", "netns", "del", self.node], capture_output=True)
