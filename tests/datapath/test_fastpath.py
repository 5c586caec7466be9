"""The socket fast path (bpf/lib/sockmap.h) on the real kernel: sk_msg redirect between the two
sockets of a same-node connection, and every way it falls back to TCP.

Topology (tests/datapath/topology.py), all in namespaces this module creates and deletes:

    node   fpn-<tag>: the router IP 10.244.9.1 on lo, where a server stands in for the L7 processor
    a, b   endpoints 10.244.9.11 and .12, registered in endpoint_netns
    u      10.244.9.13, not registered: its sockets are never added

Servers (tests/datapath/fastpath_tool.py) listen in b, in the node namespace and on a's loopback.
Correctness is byte for byte: every transfer is checked by sha256 on the far side and by content
on the near side. The per-outcome counters (fastpath_metrics) show which path the bytes took.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from agent.datapath.sockets import SocketDatapath, netns_cookie
from tests.datapath.topology import PIN_ROOT, Topology, remove_redirect_pins

TAG = uuid.uuid4().hex[:6]
PIN_DIR = f"{PIN_ROOT}/fp-{TAG}"
TOOL = str(Path(__file__).with_name("fastpath_tool.py"))
POD_CIDR = "10.244.9.0/24"
ROUTER = "10.244.9.1"
IPS = {"a": "10.244.9.11", "b": "10.244.9.12", "u": "10.244.9.13"}
SERVERS = {"b": (IPS["b"], 7000), "node": (ROUTER, 15001), "a": ("127.0.0.1", 7001)}
NODE_LOOPBACK = ("127.0.0.1", 7002)  # in the node's namespace: never accelerated
DUAL_STACK = ("::", 7003)  # in b: an AF_INET6 server whose IPv4 clients are IPv4-mapped
MiB = 1 << 20
BUDGET = 16 * MiB  # FASTPATH_QUEUE_BUDGET
# Small maps: test_full_map_falls_back_to_tcp fills them. Closed sockets leave the sockhash at once.
MAP_SIZES = {"LB_BACKEND_MAP_SIZE": 64, "LB_REVNAT_MAP_SIZE": 64, "LB_SERVICE_MAP_SIZE": 64,
             "ENDPOINT_NETNS_MAP_SIZE": 64, "FASTPATH_MAP_SIZE": 8, "FASTPATH_FLOW_MAP_SIZE": 1024}


class FastpathTopology(Topology):
    def __init__(self) -> None:
        super().__init__(f"fp{TAG}", f"fpn-{TAG}", ROUTER)
        self.dp: SocketDatapath | None = None

    def setup(self) -> None:
        self.setup_node()
        for name, ip in IPS.items():
            self.add_endpoint(name, f"fp{name}-{TAG}", ip)
        for where, (ip, port) in [*SERVERS.items(), ("node", NODE_LOOPBACK), ("b", DUAL_STACK)]:
            proc = self.spawn(where, [sys.executable, TOOL, "serve", ip, str(port)])
            assert json.loads(proc.stdout.readline()) == {"ready": True}
        self.dp = SocketDatapath(PIN_DIR, MAP_SIZES)
        self.dp.load()
        self.dp.attach()
        for ep_id, name in enumerate(("a", "b"), start=1):
            self.dp.set_endpoint_netns(netns_cookie(f"/run/netns/{self.netns_of(name)}"), ep_id=ep_id,
                                       identity=1000 + ep_id)
        self.dp.set_fastpath(True, node_netns=netns_cookie(f"/run/netns/{self.node}"), pod_cidr=POD_CIDR)

    def cleanup(self) -> None:
        super().cleanup()
        remove_redirect_pins(PIN_DIR)

    # ---- helpers -------------------------------------------------------------------------------

    def tool(self, where: str, *args: object, timeout: float = 60) -> dict:
        proc = subprocess.run(["ip", "netns", "exec", self.netns_of(where), sys.executable, TOOL, *map(str, args)],
                              capture_output=True, text=True, timeout=timeout)
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout)

    def counters(self) -> dict[str, dict[str, int]]:
        return self.dp.fastpath()["counters"]

    def bpf_config(self):
        return self.dp.bpf["config_map"]


@pytest.fixture(scope="module")
def topo():
    with FastpathTopology().session() as t:
        yield t


def delta(before: dict, after: dict, outcome: str, field: str = "bytes") -> int:
    return after[outcome][field] - before[outcome][field]


# ---- the fast path carries the bytes, all of them, in order ------------------------------------


@pytest.mark.parametrize("client,server", [("a", "b"), ("a", "node"), ("a", "a")],
                         ids=["endpoint-to-endpoint", "endpoint-to-node-namespace", "loopback-in-endpoint"])
def test_one_mib_each_way_byte_for_byte(topo, client, server):
    before = topo.counters()
    ip, port = SERVERS[server]
    got = topo.tool(client, "sink", ip, port, MiB, MiB)
    assert got == {"sent_ok": True, "server_saw": MiB, "received_ok": True, "received": MiB}
    after = topo.counters()
    assert delta(before, after, "redirected") >= 2 * MiB, after


def test_dual_stack_server_and_ipv4_client_pair_up(topo):
    """An AF_INET6 server on [::] (iperf3's default, most servers') accepts an AF_INET client as
    ::ffff:a.b.c.d; both sockets join, keyed by the IPv4 addresses, and the bytes are redirected."""
    before = topo.counters()
    got = topo.tool("a", "sink", IPS["b"], DUAL_STACK[1], MiB, MiB)
    assert got == {"sent_ok": True, "server_saw": MiB, "received_ok": True, "received": MiB}
    after = topo.counters()
    assert delta(before, after, "redirected") >= 2 * MiB, after


def test_both_ends_are_in_the_map(topo):
    """While a connection is open, both of its sockets are in the sockhash, keyed by their own view
    of the connection, and have fast-path state without a fallback."""
    ip, port = SERVERS["b"]
    proc = topo.spawn("a", [sys.executable, TOOL, "rounds", ip, str(port), "20", "50"])
    try:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            in_map = topo.dp.fastpath_sockets()
            server_side = [k for k in in_map if k[:2] == (ip, port)]
            if server_side:
                break
            time.sleep(0.02)
        assert len(server_side) == 1, in_map
        _, _, client_ip, client_port = server_side[0]
        assert (client_ip, client_port, ip, port) in in_map, in_map
        state = {(s["local"], s["remote"]): s for s in topo.dp.fastpath()["sockets"]}
        for local, remote in ((f"{ip}:{port}", f"{client_ip}:{client_port}"),
                              (f"{client_ip}:{client_port}", f"{ip}:{port}")):
            assert state[(local, remote)]["path"] == "redirect", state[(local, remote)]
        assert json.loads(proc.stdout.readline()) == {"rounds": 20, "ok": 20}
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.parametrize("send,recv", [(0, 1), (1, 0), (100, 3 * MiB), (3 * MiB, 100)],
                         ids=["nothing-then-answer", "one-byte-no-answer", "answer-after-half-close",
                              "large-write-then-half-close"])
def test_half_close_keeps_the_other_direction(topo, send, recv):
    """The client shuts down writing after its data; the server sees EOF only after every byte and
    can still answer, and the client reads the answer to its EOF."""
    ip, port = SERVERS["b"]
    got = topo.tool("a", "sink", ip, port, send, recv)
    assert got == {"sent_ok": True, "server_saw": send, "received_ok": True, "received": recv}


def test_write_beyond_the_queue_budget_falls_back_in_order(topo):
    """The reader starts late: the first budget's worth of one large write is redirected into its
    queue, the rest goes by TCP (and waits for TCP's window), and the reader still gets every byte
    in order: it reads the redirected queue first."""
    before = topo.counters()
    ip, port = SERVERS["b"]
    got = topo.tool("a", "sink", ip, port, BUDGET + 4 * MiB, 10, 1000)
    assert got["sent_ok"] and got["received_ok"], got
    after = topo.counters()
    assert delta(before, after, "redirected") >= BUDGET - MiB, after
    assert delta(before, after, "pass_queue_full", "messages") >= 1, after
    assert delta(before, after, "pass_fallen_back") > 0, after


def test_writer_returns_to_the_fast_path_once_the_reader_caught_up(topo):
    """A burst larger than the budget while the reader sleeps sends the writer to TCP; once the
    reader has read everything (TCP's bytes too), the writer's next messages are redirected again.
    Every byte comes back in order across both switches."""
    ip, port = SERVERS["b"]
    proc = subprocess.Popen(["ip", "netns", "exec", topo.netns_of("a"), sys.executable, TOOL, "burst", ip, str(port),
                             str(BUDGET + 2 * MiB), "1000"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, start_new_session=True)
    topo.procs.append(proc)
    try:
        before = topo.counters()
        assert json.loads(proc.stdout.readline()) == {"burst_ok": True, "received": BUDGET + 2 * MiB}
        middle = topo.counters()
        assert delta(before, middle, "pass_queue_full", "messages") >= 1, middle
        proc.stdin.write("go\n")
        proc.stdin.flush()
        assert json.loads(proc.stdout.readline()) == {"rounds": 20, "ok": 20}
        after = topo.counters()
        # 20 requests and 20 echoes, all redirected: both sides are back on the fast path.
        assert delta(middle, after, "redirected", "messages") >= 40, after
        assert delta(middle, after, "pass_fallen_back", "messages") == 0, after
    finally:
        proc.kill()
        proc.wait()


def test_both_directions_streaming_at_once_stay_correct(topo):
    """Both ends write a large stream at the same time while the server starts reading late: each
    goes to TCP and back while the other is still redirecting to it. Every byte arrives, in order,
    both ways."""
    ip, port = SERVERS["b"]
    for _ in range(3):
        got = topo.tool("a", "duplex", ip, port, BUDGET + 24 * MiB, 700)
        assert got == {"client_got_ok": True, "server_got": "ok"}, got


# ---- flow control and closing peers ------------------------------------------------------------


def test_a_reader_that_stops_reading_stops_the_writer(topo):
    """sk_msg redirect has no flow control of its own (the kernel queued 512 MiB into a socket that
    nobody read before the budget existed); with the budget the writer blocks as with TCP."""
    ip, port = SERVERS["b"]
    got = topo.tool("a", "stall", ip, port)
    assert got["blocked_after"] is not None, got
    assert got["blocked_after"] < BUDGET + 32 * MiB, got


def test_peer_closing_mid_stream_fails_the_writer(topo):
    ip, port = SERVERS["b"]
    got = topo.tool("a", "close-after", ip, port, 100_000)
    assert got["error"] in ("BrokenPipeError", "ConnectionResetError"), got
    assert got["sent"] >= 100_000


def test_reader_closing_mid_stream_leaves_the_server_serving(topo):
    ip, port = SERVERS["b"]
    got = topo.tool("a", "flood", ip, port, 8 * MiB, MiB)
    assert got == {"read_ok": True, "read": MiB}
    again = topo.tool("a", "sink", ip, port, 1000, 1000)
    assert again["sent_ok"] and again["received_ok"], again


# ---- who takes the fast path -------------------------------------------------------------------


def test_unregistered_namespace_is_left_alone(topo):
    ip, port = SERVERS["b"]
    got = topo.tool("u", "sink", ip, port, 100_000, 100_000)
    assert got["sent_ok"] and got["received_ok"], got
    sockets = topo.dp.fastpath()["sockets"]
    assert not [s for s in sockets if s["local"].startswith(IPS["u"] + ":")], sockets


def test_full_map_falls_back_to_tcp(topo):
    """Four open connections fill the 8-socket sockhash; the sockets of a fifth cannot be added (or
    only one of them can), and it works byte for byte on TCP while the four go on redirecting."""
    ip, port = SERVERS["b"]
    held = [topo.spawn("a", [sys.executable, TOOL, "rounds", ip, str(port), "40", "50"]) for _ in range(4)]
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and len(topo.dp.fastpath_sockets()) < 8:
            time.sleep(0.05)
        assert len(topo.dp.fastpath_sockets()) == 8
        got = topo.tool("a", "sink", ip, port, 2 * MiB, 2 * MiB)
        assert got == {"sent_ok": True, "server_saw": 2 * MiB, "received_ok": True, "received": 2 * MiB}
        for proc in held:
            assert json.loads(proc.stdout.readline()) == {"rounds": 40, "ok": 40}
    finally:
        for proc in held:
            proc.kill()
            proc.wait()


def test_loopback_of_the_node_namespace_is_left_alone(topo):
    """The node's namespace is usually the host's: its own loopback traffic is not the mesh's."""
    before = topo.counters()
    got = topo.tool("node", "sink", *NODE_LOOPBACK, MiB, MiB)
    assert got["sent_ok"] and got["received_ok"], got
    after = topo.counters()
    assert all(delta(before, after, o, "messages") == 0 for o in after), after


def test_disabled_fast_path_adds_nothing(topo):
    cfg = topo.dp.bpf["fastpath_config"][0]
    topo.dp.set_fastpath(False, node_netns=cfg.node_netns, pod_cidr=POD_CIDR)
    try:
        before = topo.counters()
        ip, port = SERVERS["b"]
        got = topo.tool("a", "sink", ip, port, MiB, MiB)
        assert got["sent_ok"] and got["received_ok"], got
        after = topo.counters()
        assert all(delta(before, after, o, "messages") == 0 for o in after), after
    finally:
        topo.dp.set_fastpath(True, node_netns=cfg.node_netns, pod_cidr=POD_CIDR)


def _bump_revision(topo) -> int:
    config = topo.bpf_config()
    value = config[0]
    value.policy_revision += 1
    config[0] = value
    return value.policy_revision


def _rounds_across_a_policy_change(topo, server: str, rounds: int) -> tuple[dict, dict]:
    """``rounds`` echo rounds from a to ``server`` with a policy revision bump among them, every one
    of which must come back intact; the fast-path counters before and after."""
    ip, port = SERVERS[server]
    before = topo.counters()
    proc = topo.spawn("a", [sys.executable, TOOL, "rounds", ip, str(port), str(rounds), "20"])
    try:
        time.sleep(0.3)
        _bump_revision(topo)
        assert json.loads(proc.stdout.readline()) == {"rounds": rounds, "ok": rounds}
    finally:
        proc.kill()
        proc.wait()
    return before, topo.counters()


def test_policy_change_sends_open_connections_back_through_tc(topo):
    """A policy revision bump mid-connection: the connection continues on the TCP path, where
    conntrack re-checks policy (lib/conntrack.h), without losing or reordering a byte. No TC
    program runs in this topology, so nothing confirms it and it stays there."""
    before, after = _rounds_across_a_policy_change(topo, "b", 40)
    assert delta(before, after, "redirected", "messages") > 0, after
    assert delta(before, after, "pass_policy_changed", "messages") >= 1, after


def test_confirmed_connection_returns_to_the_fast_path(topo):
    """What TC's fastpath_confirm does after re-checking a connection whose allow stands (here by
    hand: this topology has no TC programs): once both endpoint sides carry the new revision, the
    connection is redirected again, in order."""
    ip, port = SERVERS["b"]
    proc = topo.spawn("a", [sys.executable, TOOL, "rounds", ip, str(port), "60", "20"])
    try:
        time.sleep(0.3)
        revision = _bump_revision(topo)
        time.sleep(0.3)
        stalled = topo.counters()
        flows = topo.dp.bpf["fastpath_flows"]
        mine = [(k, v) for k, v in flows.items() if port in (k.local_port, k.remote_port) and not k.netns]
        assert mine and all(v.revision != revision for _, v in mine)
        for k, v in mine:
            v.revision = revision
            flows[k] = v
        assert json.loads(proc.stdout.readline()) == {"rounds": 60, "ok": 60}
    finally:
        proc.kill()
        proc.wait()
    after = topo.counters()
    assert delta(stalled, after, "redirected", "messages") > 0, after


def test_policy_change_leaves_loopback_inside_an_endpoint_alone(topo):
    """A loopback pair inside an endpoint never crosses TC, so no policy applies to it and a policy
    change does not send it anywhere."""
    before, after = _rounds_across_a_policy_change(topo, "a", 30)
    assert delta(before, after, "pass_policy_changed", "messages") == 0, after
    assert delta(before, after, "redirected", "messages") >= 60, after


def test_reloaded_datapath_keeps_open_connections_working(topo):
    """An agent restart loads and attaches new programs over the pinned sockhash; sockets already
    in it keep the program they were added with, new ones get the new one."""
    ip, port = SERVERS["b"]
    proc = topo.spawn("a", [sys.executable, TOOL, "rounds", ip, str(port), "30", "20"])
    try:
        time.sleep(0.2)
        fresh = SocketDatapath(PIN_DIR, MAP_SIZES)
        fresh.load()
        fresh.attach()
        topo.dp = fresh
        assert json.loads(proc.stdout.readline()) == {"rounds": 30, "ok": 30}
    finally:
        proc.kill()
        proc.wait()
    before = topo.counters()
    got = topo.tool("a", "sink", ip, port, MiB, MiB)
    assert got["sent_ok"] and got["received_ok"], got
    assert delta(before, topo.counters(), "redirected") >= 2 * MiB
