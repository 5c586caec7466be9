"""Connect-time load balancing on the real kernel (bpf/redirect.c through SocketDatapath).

Topology (tests/datapath/topology.py), all in namespaces this module creates and deletes:

    node netns  lbn-<tag>: one veth per endpoint (routes /32 + permanent neighbours, as
                agent/endpoint.py plumbs them), IP forwarding, no route to the service VIPs
    b1, b2      backends: a TCP server on 8080 and a UDP server on 5353 that answer their own name
    c           client whose namespace cookie is registered in endpoint_netns
    u           client that is NOT registered: its sockets must be left alone

The programs are attached at the cgroup-v2 root, as the agent does; the fixture detaches them,
kills the servers by PID and deletes the namespaces, pins and cgroup, also when a test fails.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import uuid

import pytest

from agent.datapath.sockets import CGROUP_ROOT, SocketDatapath, netns_cookie
from tests.datapath.topology import Topology, remove_redirect_pins, sync_services

TAG = uuid.uuid4().hex[:6]
NODE = f"lbn-{TAG}"
EPS = {  # short name -> (netns, ip)
    "b1": (f"lbb1-{TAG}", "10.244.7.11"),
    "b2": (f"lbb2-{TAG}", "10.244.7.12"),
    "c": (f"lbc-{TAG}", "10.244.7.21"),
    "u": (f"lbu-{TAG}", "10.244.7.22"),
}
VIP, PORT, UDP_PORT = "10.96.0.10", 80, 53
TCP_SVC = (VIP, PORT, "tcp")
UDP_SVC = (VIP, UDP_PORT, "udp")
BACKENDS_TCP = [(EPS["b1"][1], 8080), (EPS["b2"][1], 8080)]
BACKENDS_UDP = [(EPS["b1"][1], 5353), (EPS["b2"][1], 5353)]
PIN_DIR = f"/sys/fs/bpf/meshagent-test/lb-{TAG}"
TEST_CGROUP = f"{CGROUP_ROOT}/meshagent-test-lb-{TAG}"

SERVER = r"""
import socket, sys, threading
name = sys.argv[1].encode()
tcp = socket.socket(); tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
tcp.bind(("0.0.0.0", 8080)); tcp.listen(256)
udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); udp.bind(("0.0.0.0", 5353))
def serve_udp():
    while True:
        _, peer = udp.recvfrom(64)
        udp.sendto(name, peer)
threading.Thread(target=serve_udp, daemon=True).start()
print("ready", flush=True)
while True:
    conn, _ = tcp.accept()
    conn.sendall(name)
    conn.close()
"""

# argv: mode (tcp | udp-connected | udp-unconnected, each optionally with -v6mapped), host, port,
# count, timeout, max_errors
# (stop early after that many failures, so a broken datapath fails fast instead of timing out
# count times). Prints {"counts": {reply: n}, "peers": [addr:port seen by getpeername/recvfrom], "errors": [...]}.
CLIENT = r"""
import collections, json, socket, sys
mode, host, port, count, timeout = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])
max_errors = int(sys.argv[6])
family = socket.AF_INET
if mode.endswith("-v6mapped"):  # an AF_INET6 socket talking to ::ffff:<IPv4>
    family, host, mode = socket.AF_INET6, "::ffff:" + host, mode[: -len("-v6mapped")]
counts, peers, errors = collections.Counter(), set(), []
for _ in range(count):
    if len(errors) >= max_errors:
        break
    try:
        if mode == "tcp":
            with socket.socket(family, socket.SOCK_STREAM) as s:
                s.settimeout(timeout); s.connect((host, port))
                peers.add("%s:%d" % s.getpeername()[:2])
                counts[s.recv(64).decode()] += 1
        elif mode == "udp-connected":
            with socket.socket(family, socket.SOCK_DGRAM) as s:
                s.settimeout(timeout); s.connect((host, port)); s.send(b"hi")
                peers.add("%s:%d" % s.getpeername()[:2])
                counts[s.recv(64).decode()] += 1
        else:
            with socket.socket(family, socket.SOCK_DGRAM) as s:
                s.settimeout(timeout); s.sendto(b"hi", (host, port))
                data, peer = s.recvfrom(64)
                peers.add("%s:%d" % peer[:2])
                counts[data.decode()] += 1
    except OSError as e:
        errors.append(type(e).__name__ + ": " + str(e))
print(json.dumps({"counts": counts, "peers": sorted(peers), "errors": errors}))
"""


class LbTopology(Topology):
    def __init__(self) -> None:
        super().__init__(f"lb{TAG}", NODE)
        self.dp: SocketDatapath | None = None
        self.cookies: dict[str, int] = {}

    def setup(self) -> None:
        self.setup_node()
        for name, (netns, ip) in EPS.items():
            self.add_endpoint(name, netns, ip)
        for name in ("b1", "b2"):
            self.spawn_ready(name, [sys.executable, "-c", SERVER, name])
        self.dp = SocketDatapath(PIN_DIR, {"LB_BACKEND_MAP_SIZE": 1024, "LB_REVNAT_MAP_SIZE": 4096,
                                             "LB_SERVICE_MAP_SIZE": 64, "ENDPOINT_NETNS_MAP_SIZE": 64})
        self.dp.load()
        self.dp.attach()
        self.cookies = {name: netns_cookie(f"/run/netns/{netns}") for name, (netns, _) in EPS.items()}
        self.dp.set_endpoint_netns(self.cookies["c"], ep_id=3, identity=1003)

    def cleanup(self) -> None:
        try:
            super().cleanup()
        finally:
            remove_redirect_pins(f"{PIN_DIR}-other")
            remove_redirect_pins(PIN_DIR)  # found by the pinned map: also a restarted copy
            with contextlib.suppress(OSError):
                os.rmdir(TEST_CGROUP)


@pytest.fixture(scope="module")
def topo():
    with LbTopology().session() as t:
        yield t


@pytest.fixture
def dp(topo):
    sync_services(topo.dp, {TCP_SVC: BACKENDS_TCP, UDP_SVC: BACKENDS_UDP})
    topo.dp.set_endpoint_netns(topo.cookies["c"], ep_id=3, identity=1003)
    return topo.dp


def client(ep: str, mode: str, host: str, port: int, count: int, timeout: float = 2.0,
           launcher: str = "ip-netns-exec", cgroup: str | None = None, max_errors: int = 3) -> dict:
    netns = EPS[ep][0]
    prefix = (["ip", "netns", "exec", netns] if launcher == "ip-netns-exec"
              else ["nsenter", f"--net=/run/netns/{netns}"])

    def enter_cgroup():
        if cgroup:
            with open(os.path.join(cgroup, "cgroup.procs"), "w") as f:
                f.write(str(os.getpid()))

    argv = [sys.executable, "-c", CLIENT, mode, host, str(port), str(count), str(timeout), str(max_errors)]
    proc = subprocess.run([*prefix, *argv], capture_output=True, text=True, timeout=max_errors * timeout + 60,
                          preexec_fn=enter_cgroup if cgroup else None)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def assert_balanced(result: dict, total: int) -> None:
    assert result["errors"] == []
    assert set(result["counts"]) == {"b1", "b2"}, result
    # Uniform pick, 200 tries: each side's count is within 5 sigma (about 35) of 100.
    assert all(n >= total // 2 - 36 for n in result["counts"].values()), result


def test_tcp_spreads_across_backends_and_peer_is_vip(dp, topo):
    result = client("c", "tcp", VIP, PORT, 200)
    assert_balanced(result, 200)
    assert result["peers"] == [f"{VIP}:{PORT}"], "the application must see the VIP as its peer"
    revnat = {backend: vip for (_, backend), vip in dp.revnat_entries().items() if backend in BACKENDS_TCP}
    assert set(revnat) == set(BACKENDS_TCP) and set(revnat.values()) == {(VIP, PORT)}


def test_any_launcher_and_any_cgroup_is_balanced(dp):
    """`ip netns exec` (above) and nsenter from a cgroup of its own: what matters is the netns."""
    os.makedirs(TEST_CGROUP, exist_ok=True)
    result = client("c", "tcp", VIP, PORT, 200, launcher="nsenter", cgroup=TEST_CGROUP)
    assert_balanced(result, 200)
    assert result["peers"] == [f"{VIP}:{PORT}"]


def test_unregistered_netns_is_not_touched(dp):
    direct = client("u", "tcp", EPS["b1"][1], 8080, 3)
    assert direct["counts"] == {"b1": 3}, "u reaches backends directly: the topology works"
    result = client("u", "tcp", VIP, PORT, 5, timeout=1.0, max_errors=5)
    assert result["counts"] == {} and len(result["errors"]) == 5, result


def test_udp_connected_and_unconnected(dp):
    connected = client("c", "udp-connected", VIP, UDP_PORT, 200)
    assert_balanced(connected, 200)
    assert connected["peers"] == [f"{VIP}:{UDP_PORT}"]
    unconnected = client("c", "udp-unconnected", VIP, UDP_PORT, 200)
    assert_balanced(unconnected, 200)
    assert unconnected["peers"] == [f"{VIP}:{UDP_PORT}"], "recvfrom must report the VIP"


def test_ipv4_mapped_addresses_on_inet6_sockets(dp):
    """Dual-stack clients (AF_INET6 socket, ::ffff:VIP) go through the INET6 hooks only."""
    for mode, port in (("tcp-v6mapped", PORT), ("udp-connected-v6mapped", UDP_PORT),
                       ("udp-unconnected-v6mapped", UDP_PORT)):
        result = client("c", mode, VIP, port, 200)
        assert_balanced(result, 200)
        assert result["peers"] == [f"::ffff:{VIP}:{port}"], (mode, result)


def test_removing_a_backend_stops_traffic_to_it(dp):
    sync_services(dp, {TCP_SVC: BACKENDS_TCP[:1], UDP_SVC: BACKENDS_UDP})
    assert dp.list_services()[(VIP, PORT, 6)] == BACKENDS_TCP[:1]
    result = client("c", "tcp", VIP, PORT, 50)
    assert result["counts"] == {"b1": 50} and result["errors"] == []
    sync_services(dp, {TCP_SVC: BACKENDS_TCP[1:], UDP_SVC: BACKENDS_UDP})
    assert client("c", "tcp", VIP, PORT, 50)["counts"] == {"b2": 50}


def test_service_without_backends_refuses_at_once(dp):
    sync_services(dp, {TCP_SVC: [], UDP_SVC: []})
    result = client("c", "tcp", VIP, PORT, 3, timeout=5.0)
    assert result["counts"] == {}
    assert all(e.startswith("ConnectionRefusedError") for e in result["errors"]), result
    udp = client("c", "udp-connected", VIP, UDP_PORT, 1, timeout=5.0)
    assert udp["errors"] and udp["errors"][0].startswith("ConnectionRefusedError"), udp


def test_deleting_the_service_stops_translation(dp):
    sync_services(dp, {UDP_SVC: BACKENDS_UDP})
    assert (VIP, PORT, 6) not in dp.list_services()
    result = client("c", "tcp", VIP, PORT, 3, timeout=1.0)
    assert result["counts"] == {} and len(result["errors"]) == 3
    assert not any(e.startswith("ConnectionRefusedError") for e in result["errors"]), "untranslated, not refused"


def test_unregistering_the_netns_stops_translation(dp, topo):
    dp.remove_endpoint_netns(topo.cookies["c"])
    assert client("c", "tcp", VIP, PORT, 3, timeout=1.0)["counts"] == {}
    dp.set_endpoint_netns(topo.cookies["c"], ep_id=3, identity=1003)
    assert client("c", "tcp", VIP, PORT, 3)["errors"] == []


def test_cookie_is_the_kernels(topo):
    with socket.socket() as s:
        here = int.from_bytes(s.getsockopt(socket.SOL_SOCKET, 71, 8), "little")
    assert netns_cookie("/proc/self/ns/net") == here
    assert len(set(topo.cookies.values())) == len(EPS) and here not in topo.cookies.values()


def test_restarted_agent_replaces_and_adopts(dp, topo):
    before = dp.attached()
    assert all(len(ids) == 1 for ids in before.values()), before
    again = SocketDatapath(PIN_DIR, dp.map_sizes)
    again.load()
    assert again.services() == dp.services(), "the new agent adopts the kernel's services"
    again.attach()
    after = again.attached()
    assert all(len(ids) == 1 for ids in after.values()), f"stacked: {after}"
    assert all(after[n] != before[n] for n in after), "the new programs replaced the old ones"
    again.attach()
    assert again.attached() == after, "attach() is idempotent"
    assert_balanced(client("c", "tcp", VIP, PORT, 200), 200)
    topo.dp = again


def test_two_nodes_on_one_machine_each_balance_their_own(dp, topo):
    """A second agent (its own pin dir) attaches alongside (BPF_F_ALLOW_MULTI) and translates only
    the namespaces it registered; the first keeps its own."""
    other_dir = f"{PIN_DIR}-other"
    other = SocketDatapath(other_dir, dp.map_sizes)
    try:
        other.load()
        other.attach()
        other.set_endpoint_netns(topo.cookies["u"], ep_id=9, identity=2009)
        sync_services(other, {TCP_SVC: BACKENDS_TCP[1:]})  # the same VIP, another backend set
        assert client("u", "tcp", VIP, PORT, 50)["counts"] == {"b2": 50}
        assert_balanced(client("c", "tcp", VIP, PORT, 200), 200)
        assert all(len(ids) == 1 for ids in dp.attached().values())
    finally:
        SocketDatapath(other_dir).detach()
        shutil.rmtree(other_dir, ignore_errors=True)
    assert client("u", "tcp", VIP, PORT, 3, timeout=1.0)["counts"] == {}
    assert_balanced(client("c", "tcp", VIP, PORT, 200), 200)


def test_detach_leaves_nothing_attached(dp, topo):
    """detach() works from the pins alone (as teardown runs it) and bpftool agrees; re-attached after."""
    ours = {prog_id for ids in dp.attached().values() for prog_id in ids}
    assert len(ours) == len(dp.functions)
    SocketDatapath(PIN_DIR).detach()
    shown = subprocess.run(["bpftool", "-j", "cgroup", "show", CGROUP_ROOT], capture_output=True, text=True,
                           check=True).stdout
    still = {p["id"] for p in json.loads(shown.strip() or "[]")} & ours
    assert not still, f"still attached: {still}"
    assert client("c", "tcp", VIP, PORT, 3, timeout=1.0)["counts"] == {}
    dp.attach()
    assert client("c", "tcp", VIP, PORT, 20)["errors"] == []
