"""Redirection of L7 services to the node's L7 processor, on the real kernel.

Topology (tests/datapath/topology.py), all in namespaces this module creates and deletes:

    node netns  l7n-<tag>: the router IP on lo (where the processor listens), one veth per endpoint
                (routes /32 + permanent neighbours, as agent/endpoint.py plumbs them), IP forwarding,
                the TC policy programs on every host-side veth (agent.datapath.tc.TcDatapath)
    c           client, identity 1003; egress default deny except the backend's port 8080
    d           another client, identity 1004
    b           backend, identity 2001, a TCP server on 8080 that answers its name; ingress default
                deny except from identity 1003 on 8080

and the socket programs (SocketDatapath) at the cgroup-v2 root. A tiny "processor" runs in the node
namespace on ROUTER_IP:15001: for each connection it asks KernelOriginalDstResolver where it was
going and who sent it, reports that, and connects to the backend with the client's identity mark.

Cleanup (fixture, also on failure): processes killed by PID, programs detached from the cgroup root
(and checked gone with bpftool), pins and namespaces deleted.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid

import pytest

from agent.datapath import maps
from agent.datapath.sockets import CGROUP_ROOT, LB_F_L7, SocketDatapath, netns_cookie
from agent.datapath.tc import TcDatapath
from agent.policy.types import EGRESS, INGRESS, Action, Enforcement, PolicyEntry, PolicyKey
from tests.datapath.topology import Topology, in_netns, remove_redirect_pins, run, sync_services

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TAG = uuid.uuid4().hex[:6]
NODE = f"l7n-{TAG}"
ROUTER_IP, PROXY_PORT = "10.244.9.1", 15001
EPS = {  # short name -> (netns, ip, ep_id, identity)
    "c": (f"l7c-{TAG}", "10.244.9.21", 3, 1003),
    "d": (f"l7d-{TAG}", "10.244.9.22", 4, 1004),
    "b": (f"l7b-{TAG}", "10.244.9.11", 5, 2001),
}
L7_VIP, L4_VIP, PORT, BACKEND_PORT = "10.96.9.10", "10.96.9.20", 80, 8080
PIN_DIR = f"/sys/fs/bpf/meshagent-test/l7-{TAG}"
MAP_SIZES = {"CT_MAP_SIZE": 4096, "POLICY_MAP_SIZE": 1024, "IPCACHE_MAP_SIZE": 1024}
LB_SIZES = {"LB_BACKEND_MAP_SIZE": 64, "LB_REVNAT_MAP_SIZE": 1024, "LB_SERVICE_MAP_SIZE": 64,
            "ENDPOINT_NETNS_MAP_SIZE": 64, "L7_PENDING_MAP_SIZE": 1024, "L7_ORIGDST_MAP_SIZE": 1024}

BACKEND = r"""
import socket, sys
srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("0.0.0.0", int(sys.argv[2]))); srv.listen(64)
print("ready", flush=True)
while True:
    conn, peer = srv.accept()
    conn.sendall(sys.argv[1].encode())
    conn.close()
"""

# argv: pin dir, listen ip, port, backend ip, backend port. One JSON line per accepted connection.
PROXY = r"""
import json, socket, sys, threading
sys.path.insert(0, sys.argv[6])
from userspace_l7.origdst import KernelOriginalDstResolver, upstream_mark
resolver = KernelOriginalDstResolver(sys.argv[1])
srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind((sys.argv[2], int(sys.argv[3]))); srv.listen(64)
backend = (sys.argv[4], int(sys.argv[5]))
lock = threading.Lock()
def report(**kw):
    with lock:
        print(json.dumps(kw), flush=True)
def serve(conn, peer):
    with conn:
        dst = resolver.resolve(conn)
        if dst is None:
            report(peer=list(peer), dst=None)
            return
        up = socket.socket()
        up.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, upstream_mark(dst.source_identity))
        up.settimeout(1.5)
        try:
            up.connect(backend)
            data = up.recv(64)
            conn.sendall(data)
            upstream = "ok:" + data.decode()
        except OSError as e:
            upstream = type(e).__name__
        finally:
            up.close()
        report(peer=list(peer), dst=[dst.ip, dst.port], identity=dst.source_identity, upstream=upstream)
print("ready", flush=True)
while True:
    conn, peer = srv.accept()
    threading.Thread(target=serve, args=(conn, peer), daemon=True).start()
"""

# argv: family (4 | 6), host, port, timeout. Prints {"peer": ..., "data": ..., "error": ...}.
CLIENT = r"""
import json, socket, sys
family, host, port, timeout = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
out = {"peer": None, "local": None, "data": None, "error": None}
s = socket.socket(socket.AF_INET6 if family == "6" else socket.AF_INET)
if family == "6":
    host = "::ffff:" + host
s.settimeout(timeout)
try:
    s.connect((host, port))
    out["peer"] = "%s:%d" % s.getpeername()[:2]
    out["local"] = "%s:%d" % s.getsockname()[:2]
    out["data"] = s.recv(64).decode()
except OSError as e:
    out["error"] = type(e).__name__
print(json.dumps(out))
"""


def _policy(dp: TcDatapath, ep_id: int, direction: int, identity: int, port: int, rule_id: int) -> None:
    key = PolicyKey(ep_id, direction, identity, 6, port, 16)
    dp.table("policy_map")[maps.policy_key_to_c(key)] = maps.policy_entry_to_c(
        key, PolicyEntry(Action.ALLOW, False, rule_id))


class L7Topology(Topology):
    def __init__(self) -> None:
        super().__init__(f"l7{TAG}", NODE, ROUTER_IP, ipv6=False)
        self.dp: TcDatapath | None = None
        self.redirect: SocketDatapath | None = None
        self.proxy: subprocess.Popen | None = None
        self.prog_ids: set[int] = set()

    def setup(self) -> None:
        self.setup_node()
        hosts = {name: self.add_endpoint(name, netns, ip) for name, (netns, ip, _, _) in EPS.items()}

        # The TC policy programs on the host-side veths, endpoint table, ipcache, policy.
        self.dp = TcDatapath(PIN_DIR, MAP_SIZES)
        self.dp.load()
        self.collect_flow_events(self.dp)
        ipcache = self.dp.table("ipcache")
        ipcache[maps.ipcache_key_to_c(f"{ROUTER_IP}/32")] = maps.IpcacheEntryC(identity=1)  # HOST
        open_, deny = Enforcement(False), (lambda rule: Enforcement(True, False, rule_id=rule))
        enforcement = {"c": (open_, deny(31)), "d": (open_, open_), "b": (deny(51), open_)}
        with in_netns(f"/run/netns/{NODE}"):
            for name, (_, ip, ep_id, identity) in EPS.items():
                ifindex = json.loads(run("ip", "-j", "link", "show", "dev", hosts[name]))[0]["ifindex"]
                self.dp.write_endpoint(ifindex, maps.endpoint_info_to_c(ip, identity, ep_id, *enforcement[name]))
                ipcache[maps.ipcache_key_to_c(f"{ip}/32")] = maps.IpcacheEntryC(identity=identity)
                self.dp.attach(ifindex)
        _policy(self.dp, EPS["b"][2], INGRESS, EPS["c"][3], BACKEND_PORT, 52)  # b admits c only
        _policy(self.dp, EPS["c"][2], EGRESS, EPS["b"][3], BACKEND_PORT, 32)   # c may reach b directly
        self.dp.set_proxy(ROUTER_IP, PROXY_PORT)

        # The socket programs, services and the processor's address.
        self.redirect = SocketDatapath(PIN_DIR, LB_SIZES)
        self.redirect.load()
        self.redirect.attach()
        self.prog_ids = {i for ids in self.redirect.attached().values() for i in ids}
        for name in ("c", "d"):
            netns, _, ep_id, identity = EPS[name]
            self.redirect.set_endpoint_netns(netns_cookie(f"/run/netns/{netns}"), ep_id, identity)
        backend = [(EPS["b"][1], BACKEND_PORT)]
        sync_services(self.redirect, {(L7_VIP, PORT, "tcp"): backend, (L4_VIP, PORT, "tcp"): backend},
                      flags={(L7_VIP, PORT, "tcp"): LB_F_L7})
        self.redirect.set_proxy(ROUTER_IP, PROXY_PORT)

        self.spawn_ready("b", [sys.executable, "-c", BACKEND, "b", str(BACKEND_PORT)])
        # nsenter --net only: the processor must see the host's bpffs (KERNEL-NOTES).
        self.proxy = self.spawn_ready("node", [sys.executable, "-c", PROXY, PIN_DIR, ROUTER_IP, str(PROXY_PORT),
                                               EPS["b"][1], str(BACKEND_PORT), REPO], nsenter=True)

    def proxy_report(self, timeout: float = 5.0) -> dict:
        line = self.readline(self.proxy, timeout)
        assert line, "the processor reported nothing"
        return json.loads(line)

    def client(self, ep: str, host: str, port: int, family: str = "4", timeout: float = 3.0) -> dict:
        proc = subprocess.run(["ip", "netns", "exec", self.netns_of(ep), sys.executable, "-c", CLIENT, family, host,
                               str(port), str(timeout)], capture_output=True, text=True, timeout=30)
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout)

    def cleanup(self) -> None:
        try:
            super().cleanup()
        finally:
            remove_redirect_pins(PIN_DIR)


@pytest.fixture(scope="module")
def topo():
    t = L7Topology()
    with t.session():
        yield t
    shown = subprocess.run(["bpftool", "-j", "cgroup", "show", CGROUP_ROOT], capture_output=True, text=True,
                           check=True).stdout
    still = {p["id"] for p in json.loads(shown.strip() or "[]")} & t.prog_ids
    assert not still, f"still attached at the cgroup root: {still}"


def test_l7_service_lands_on_the_processor_with_origin_and_identity(topo):
    topo.flow_events()
    result = topo.client("c", L7_VIP, PORT)
    assert result["error"] is None, result
    assert result["peer"] == f"{L7_VIP}:{PORT}", "getpeername() must report the VIP"
    report = topo.proxy_report()
    assert report["peer"] == [EPS["c"][1], int(result["local"].rsplit(":", 1)[1])]
    assert report["dst"] == [L7_VIP, PORT] and report["identity"] == EPS["c"][3]
    # The backend's ingress policy admitted the proxied connection on the client's identity.
    assert report["upstream"] == "ok:b" and result["data"] == "b"
    events = topo.flow_events()
    redirected = [e for e in events if e.type == 1 and e.ep_id == EPS["c"][2]]
    assert [(maps.be32_to_ip(e.daddr), e.dport, e.verdict) for e in redirected] == [(ROUTER_IP, PROXY_PORT, 4)], \
        "c's egress default deny does not stop the redirect; it is reported as REDIRECTED"
    admitted = [e for e in events if e.type == 1 and e.ep_id == EPS["b"][2]]
    assert [(e.src_identity, e.verdict, e.rule_id) for e in admitted] == [(EPS["c"][3], 1, 52)]
    assert topo.redirect.l7_origdst_entries() == {}, "the processor took the entry"


def test_another_identity_is_denied_at_the_backend(topo):
    topo.flow_events()
    result = topo.client("d", L7_VIP, PORT)
    report = topo.proxy_report()
    assert report["dst"] == [L7_VIP, PORT] and report["identity"] == EPS["d"][3]
    assert report["upstream"] in ("TimeoutError", "timeout"), report
    assert result["data"] in ("", None), result
    drops = [e for e in topo.flow_events() if e.type == 2 and e.ep_id == EPS["b"][2] and e.proto == 6]
    assert drops and all((e.src_identity, e.drop_reason, e.dport) == (EPS["d"][3], 133, BACKEND_PORT)
                         for e in drops), [(e.src_identity, e.drop_reason, e.proto, e.dport) for e in drops]


def test_ipv4_mapped_socket_is_redirected_too(topo):
    result = topo.client("c", L7_VIP, PORT, family="6")
    assert result["error"] is None and result["peer"] == f"::ffff:{L7_VIP}:{PORT}", result
    report = topo.proxy_report()
    assert report["dst"] == [L7_VIP, PORT] and report["identity"] == EPS["c"][3] and report["upstream"] == "ok:b"


def test_l4_service_goes_straight_to_the_backend(topo):
    topo.flow_events()
    result = topo.client("c", L4_VIP, PORT)
    assert result == {**result, "error": None, "data": "b", "peer": f"{L4_VIP}:{PORT}"}
    assert topo.readline(topo.proxy, 0.5) is None, "the processor saw nothing"
    admitted = [e for e in topo.flow_events() if e.type == 1 and e.ep_id == EPS["b"][2]]
    assert [(maps.be32_to_ip(e.saddr), e.src_identity) for e in admitted] == [(EPS["c"][1], EPS["c"][3])]


def test_dialling_the_processor_directly_finds_no_origin(topo):
    """The datapath admits any flow to the processor; the processor serves only redirected ones."""
    result = topo.client("c", ROUTER_IP, PROXY_PORT)
    report = topo.proxy_report()
    assert report["dst"] is None and report["peer"][0] == EPS["c"][1]
    assert result["data"] in ("", None)


def test_without_a_processor_l7_services_are_balanced_as_l4(topo):
    topo.redirect.set_proxy(None)
    try:
        result = topo.client("c", L7_VIP, PORT)
        assert result["error"] is None and result["data"] == "b" and result["peer"] == f"{L7_VIP}:{PORT}"
        assert topo.readline(topo.proxy, 0.5) is None
    finally:
        topo.redirect.set_proxy(ROUTER_IP, PROXY_PORT)
    assert topo.client("c", L7_VIP, PORT)["data"] == "b"
    assert topo.proxy_report()["dst"] == [L7_VIP, PORT]


def test_restarted_agent_replaces_the_sockops_program_too(topo):
    before = topo.redirect.attached()
    again = SocketDatapath(PIN_DIR, LB_SIZES)
    again.load()
    again.attach()
    after = again.attached()
    assert all(len(ids) == 1 for ids in after.values()) and after["sock_ops"] != before["sock_ops"], after
    assert again.proxy() == (ROUTER_IP, PROXY_PORT), "the processor's address survives in the pinned map"
    topo.redirect = again
    topo.prog_ids |= {i for ids in after.values() for i in ids}
    result = topo.client("c", L7_VIP, PORT)
    assert result["data"] == "b" and topo.proxy_report()["identity"] == EPS["c"][3]
