"""Faults across three nodes on etcd (SPEC §8), on the real kernel: a dead agent, etcd away, bad
claims, bad values in the store, an unreachable store, TLS with the wrong credentials.

A node's datapath keeps enforcing without its agent and without etcd; a node gone for longer than
its lease TTL leaves the other nodes' ipcaches and `node list`; one back within the TTL never
leaves. Every fault is one line from the agent, never a crash.

The lab's leases are short (TTL 5 s, below the 15 s after which `node list` calls a silent node
stale): a killed node is listed `alive` with a growing heartbeat age until its lease expires, then
it is gone; it is never shown stale. Each test leaves the lab as it found it (`healthy`: etcd up,
the lab's configs, every agent running), then removes what it made, also when it fails.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import threading
import time
import uuid

import pytest

from lab import Lab, LabNode
from lab.pki import Pki
from tests.datapath.lab_fixtures import (
    Workloads,
    connects,
    eventually,
    ipcache,
    one_error_line,
    reconfigured,
    refused_start,
    write_config,
)

TTL = 5  # store_lease_ttl of the lab's nodes


@pytest.fixture(scope="module")
def flab(lab_factory) -> Lab:
    return lab_factory(nodes=3, store="etcd", store_lease_ttl=TTL)


@pytest.fixture
def work(flab):
    w = Workloads(flab)
    try:
        yield w
    finally:
        w.cleanup()


def restore(lab: Lab) -> None:
    """etcd up, the lab's configs, every agent running and connected to the store."""
    if not (lab.etcd and lab.etcd.alive()):
        lab.start_etcd()
    for node in lab.nodes:
        if not node.agent_running():
            write_config(node)
            node.start_agent()
    for node in lab.nodes:
        eventually(lambda node=node: node.cli_json("status")["store_status"]["connected"], f"{node.name} connected",
                   timeout=60)


@pytest.fixture
def healthy(flab, work):
    """The lab as a test found it, again at the test's end, before its workloads are removed."""
    restore(flab)
    try:
        yield flab
    finally:
        restore(flab)


def tag() -> str:
    return uuid.uuid4().hex[:5]


def allow_policy(name: str, server: str, client: str) -> str:
    return f"""
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {{name: {name}, namespace: default}}
spec:
  endpointSelector: {{matchLabels: {{app: {server}}}}}
  ingress:
  - fromEndpoints: [{{matchLabels: {{app: {client}}}}}]
    toPorts: [{{ports: [{{port: "8080", protocol: TCP}}]}}]
"""


def denied(node: LabNode, src: str, dst: str) -> bool:
    return node.cli_json("policy", "trace", "--from-label", src, "--to-label", dst, "--dport", "8080/tcp")[
        "verdict"] == "DENIED"


def enforcing(pairs: list[tuple[dict, dict, bool]]) -> list[str]:
    """Try every (client, server, allowed) at once; what did not go as the policy says."""
    wrong: list[str] = []

    def check(client: dict, server: dict, allowed: bool) -> None:
        if connects(client, server["ip"], 8080, timeout=3 if allowed else 1.5) != allowed:
            wrong.append(f"{client['name']} -> {server['name']} {'refused' if allowed else 'got through'}")

    threads = [threading.Thread(target=check, args=pair) for pair in pairs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return wrong


def lease_of(node: LabNode) -> int:
    return node.cli_json("status")["store_status"]["lease"]["id"]


def ttl_left(lab: Lab, lease: int) -> int:
    """What etcd says is left of ``lease`` (whole seconds; -1 once it expired)."""
    return json.loads(lab.etcdctl("lease", "timetolive", format(lease, "x"), "-w", "json").stdout)["ttl"]


def kill_after_a_keepalive(lab: Lab, node: LabNode) -> int:
    """SIGKILL the node's agent just after it refreshed its lease (so at least TTL - 1 s of it is
    left); returns the lease."""
    lease = lease_of(node)
    eventually(lambda: ttl_left(lab, lease) >= TTL - 1, f"{node.name}'s lease refreshed", timeout=3 * TTL)
    assert node.kill_agent()
    return lease


def guarded_servers(work: Workloads, lab: Lab, t: str) -> dict:
    """A server on n3 behind a policy that admits app=ok-<t>; clients ok and bad on n1 and on n3."""
    n1, _, n3 = lab.nodes
    eps = {"srv": work.endpoint(n3, f"srv-{t}", f"app=srv-{t}")}
    for node in (n1, n3):
        for role in ("ok", "bad"):
            eps[f"{role}@{node.name}"] = work.endpoint(node, f"{role}-{t}", f"app={role}-{t}")
    work.serve(eps["srv"], 8080)
    work.apply(n1, allow_policy(f"pol-{t}", f"srv-{t}", f"ok-{t}"))
    eventually(lambda: denied(n3, f"app=bad-{t}", f"app=srv-{t}"), "the policy in n3's kernel")
    return eps


def pairs_to(eps: dict, server: str, *nodes: LabNode) -> list[tuple[dict, dict, bool]]:
    return [(eps[f"{role}@{node.name}"], eps[server], role == "ok") for node in nodes for role in ("ok", "bad")]


# ---- a node's agent dies -------------------------------------------------------------------------


def test_a_killed_agent_s_datapath_keeps_enforcing_and_its_node_leaves_with_its_lease(flab, healthy, work):
    n1, n2, n3 = flab.nodes
    t = f"k{tag()}"
    eps = guarded_servers(work, flab, t)
    assert enforcing(pairs_to(eps, "srv", n1, n3)) == []
    srv = f"{eps['srv']['ip']}/32"

    kill_after_a_keepalive(flab, n3)
    # n3's lease lives on for a while: the other nodes still route to it, and n3's kernel enforces
    assert enforcing(pairs_to(eps, "srv", n1, n3)) == []
    assert srv in ipcache(n1), "n3's lease expired during the checks: they proved nothing across nodes"
    listed = {row["name"]: row for row in n1.cli_json("node", "list")}
    assert listed[n3.name]["health"] == "alive"  # until the lease expires: TTL < the stale threshold

    for node in (n1, n2):  # the lease expires: n3's endpoints, route and record go from every node
        eventually(lambda node=node: srv not in ipcache(node), f"n3's endpoint gone from {node.name}'s ipcache",
                   timeout=6 * TTL)
        eventually(lambda node=node: n3.name not in {r["name"] for r in node.cli_json("node", "list")},
                   f"n3 gone from {node.name}'s node list")
        assert f"{n3.ip}/32" not in ipcache(node)
        eventually(lambda node=node: n3.pod_cidr not in node.ns(["ip", "route", "show", "proto", "201"]).stdout,
                   f"{node.name}'s route to n3's pods removed")
    assert enforcing(pairs_to(eps, "srv", n3)) == []  # n3's own datapath, agent and lease gone, still enforces


def test_an_agent_back_within_its_lease_ttl_never_loses_its_endpoints(flab, healthy, work):
    n1, n2, n3 = flab.nodes
    name = f"stay-{tag()}"
    ep = work.endpoint(n3, name, f"app={name}")
    key = f"/meshagent/endpoints/{n3.name}/{name}"

    def created() -> int:
        return int(json.loads(flab.etcdctl("get", key, "-w", "json").stdout)["kvs"][0]["create_revision"])

    before = created()
    eventually(lambda: ipcache(n1).get(f"{ep['ip']}/32") == ep["identity"], "the endpoint in n1's ipcache")
    gaps: list[float] = []
    watching = threading.Event()
    watching.set()

    def watch() -> None:  # n1's ipcache, all along
        while watching.is_set():
            with contextlib.suppress(Exception):
                if f"{ep['ip']}/32" not in ipcache(n1):
                    gaps.append(time.monotonic())
            time.sleep(0.1)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        lease = kill_after_a_keepalive(flab, n3)
        n3.start_agent()
        assert lease_of(n3) == lease
        deadline = time.monotonic() + TTL + 2  # past the old lease's expiry, had nobody kept it alive
        while time.monotonic() < deadline:
            time.sleep(0.2)
    finally:
        watching.clear()
        watcher.join(10)
    assert not gaps, "n3's endpoint left n1's ipcache during the restart"
    assert created() == before, "the endpoint's record was deleted and made again"
    assert "adopted lease" in open(n3.log_path).read()


# ---- etcd goes away ------------------------------------------------------------------------------


def test_every_node_keeps_enforcing_while_etcd_is_away_and_resyncs_when_it_is_back(flab, healthy, work):
    n1, n2, n3 = flab.nodes
    t = f"e{tag()}"
    eps = {"srv@n2": work.endpoint(n2, f"srv-{t}", f"app=srv-{t}"),
           "srv@n3": work.endpoint(n3, f"srv-{t}", f"app=srv-{t}"),
           f"ok@{n1.name}": work.endpoint(n1, f"ok-{t}", f"app=ok-{t}"),
           f"bad@{n1.name}": work.endpoint(n1, f"bad-{t}", f"app=bad-{t}")}
    for server in ("srv@n2", "srv@n3"):
        work.serve(eps[server], 8080)
    work.apply(n1, allow_policy(f"pol-{t}", f"srv-{t}", f"ok-{t}"))
    for node in (n2, n3):
        eventually(lambda node=node: denied(node, f"app=bad-{t}", f"app=srv-{t}"), f"the policy in {node.name}")
    pairs = pairs_to(eps, "srv@n2", n1) + pairs_to(eps, "srv@n3", n1)
    assert enforcing(pairs) == []
    pids = [node.agent.pid for node in flab.nodes]
    policy = allow_policy(f"later-{t}", f"srv-{t}", f"bad-{t}")

    stopped = time.time()
    assert flab.stop_etcd()
    for node in flab.nodes:
        st = eventually(lambda node=node: (s := node.cli_json("status")["store_status"]) and not s["connected"] and s,
                        f"{node.name} sees etcd away")
        assert st["error"] and stopped - 1 <= st["since"] <= time.time()
        since = time.strftime("%H:%M:%S", time.localtime(st["since"]))
        assert f"Store:                {flab.store_url}: unreachable since {since} (" in node.cli("status").stdout
    assert enforcing(pairs) == []

    for refused in (n1.apply(policy, check=False), n3.cli("endpoint", "add", f"new-{t}", "--labels", "app=new",
                                                          check=False)):
        assert refused.returncode == 1 and refused.stderr.count("\n") == 1, refused.stderr
        pattern = rf"Error: etcd store {re.escape(flab.store_url)}: unreachable since \d\d:\d\d:\d\d "
        assert re.match(pattern, refused.stderr), refused.stderr
    assert not os.path.exists(f"/run/netns/{n3.name}-new-{t}")
    assert f"new-{t}" not in {e["name"] for e in n3.cli_json("endpoint", "list")}
    assert enforcing(pairs) == []

    flab.start_etcd()
    for node in flab.nodes:  # the same agents take the store again
        eventually(lambda node=node: node.cli_json("status")["store_status"]["connected"], f"{node.name} back",
                   timeout=60)
    assert [node.agent.pid for node in flab.nodes] == pids
    for node in flab.nodes:  # what was refused was not made
        assert f"later-{t}" not in node.cli("get", "CiliumNetworkPolicy").stdout
        assert f"new-{t}" not in {e["name"] for e in node.cli_json("endpoint", "list")}
    assert enforcing(pairs) == []

    work.apply(n2, policy)  # a change made now reaches every node
    for node in flab.nodes:
        eventually(lambda node=node: not denied(node, f"app=bad-{t}", f"app=srv-{t}"), f"the change in {node.name}")
    late = work.endpoint(n3, f"late-{t}", f"app=late-{t}")
    for node in (n1, n2):
        eventually(lambda node=node: ipcache(node).get(f"{late['ip']}/32") == late["identity"],
                   f"an endpoint made after the outage in {node.name}'s ipcache")
    assert enforcing([(c, s, True) for c, s, _ in pairs]) == []


# ---- claims, values and stores that are wrong ------------------------------------------------------


def test_a_node_claiming_a_live_node_s_name_or_an_overlapping_pod_cidr_is_refused_in_one_line(flab, healthy):
    n1, n2, n3 = flab.nodes
    with reconfigured(n3, node_name=n1.name):  # n3's state directory: another node id
        error = one_error_line(refused_start(n3))
    assert error.startswith(f"Error: node name {n1.name} is already held by another node (node IP {n1.ip}, "), error
    with reconfigured(n3, pod_cidr="10.151.0.0/16"):
        error = one_error_line(refused_start(n3))
    assert error == f"Error: pod_cidr 10.151.0.0/16 overlaps node {n1.name}'s {n1.pod_cidr}; give each node a " \
                    "pod CIDR of its own", error
    for node in (n1, n2):
        rows = {row["name"]: row for row in node.cli_json("node", "list")}
        assert (rows[n1.name]["node_ip"], rows[n1.name]["pod_cidr"]) == (n1.ip, n1.pod_cidr)
        assert node.ready()


def test_an_unreachable_store_at_a_first_start_is_one_line(flab, healthy, tmp_path):
    n3 = flab.node(3)
    nowhere = "etcd://192.168.77.99:2379"  # on the underlay, where nothing answers
    with reconfigured(n3, store=nowhere, state_dir=str(tmp_path / "fresh")):
        error = one_error_line(refused_start(n3))
    assert error.startswith(f"Error: etcd store {nowhere}: unreachable (no connection within 2 s), and there is no "
                            f"cached state in {tmp_path / 'fresh'}/store-cache-{n3.name}.json to start from"), error


def agent_errors(node: LabNode, since: int) -> list[str]:
    """The agent's log lines after byte ``since`` that are worse than a warning."""
    with open(node.log_path) as f:
        f.seek(since)
        return [line for line in f.read().splitlines() if re.search(r" (ERROR|CRITICAL) |Traceback", line)]


@contextlib.contextmanager
def stored_raw(lab: Lab, values: dict[str, str]):
    """Raw values under the store's prefix (etcdctl put), deleted at the end."""
    try:
        for key, value in values.items():
            lab.etcdctl("put", f"/meshagent/{key}", value)
        yield
    finally:
        for key in values:
            lab.etcdctl("del", f"/meshagent/{key}", check=False)


def test_values_that_are_not_records_are_warnings_on_every_node(flab, healthy, work):
    n1, n2, n3 = flab.nodes
    logs = {node.name: os.path.getsize(node.log_path) for node in flab.nodes}
    bad = {"nodes/x": "notjson", f"endpoints/{n2.name}/bad": "notjson", "nodes/y": '{"a": 1}',
           f"nodes/{n2.name}-z": json.dumps({"name": f"{n2.name}-z", "node_ip": "nowhere", "pod_cidr": "x"})}
    with stored_raw(flab, bad):
        name = f"after-{tag()}"
        ep = work.endpoint(n2, name, f"app={name}")  # the store still works, and so do the other nodes
        for node in (n1, n3):
            eventually(lambda node=node: ipcache(node).get(f"{ep['ip']}/32") == ep["identity"],
                       f"an endpoint made after the bad values in {node.name}'s ipcache")
        for node in flab.nodes:
            assert node.agent_running() and node.ready()
            assert sorted(r["name"] for r in node.cli_json("node", "list")) == sorted(n.name for n in flab.nodes)
        for node in flab.nodes:
            log = open(node.log_path).read()[logs[node.name]:]
            assert "skipped key nodes/x" in log and f"skipped key endpoints/{n2.name}/bad" in log, node.name
            assert agent_errors(node, logs[node.name]) == [], node.name


# ---- TLS to etcd ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls_lab(lab_factory) -> Lab:
    return lab_factory(nodes=2, store="etcd", tls=True)


def test_nodes_on_etcd_over_tls_share_endpoints_and_policy(tls_lab):
    n1, n2 = tls_lab.nodes
    w = Workloads(tls_lab)
    try:
        for node in tls_lab.nodes:
            st = node.cli_json("status")["store_status"]
            assert st["connected"] and st["lease"], st
        t = tag()
        server = w.endpoint(n2, f"srv-{t}", f"app=srv-{t}")
        ok = w.endpoint(n1, f"ok-{t}", f"app=ok-{t}")
        bad = w.endpoint(n1, f"bad-{t}", f"app=bad-{t}")
        w.serve(server, 8080)
        w.apply(n1, allow_policy(f"pol-{t}", f"srv-{t}", f"ok-{t}"))
        eventually(lambda: denied(n2, f"app=bad-{t}", f"app=srv-{t}"), "the policy in n2's kernel")
        assert ipcache(n1)[f"{server['ip']}/32"] == server["identity"]
        assert ipcache(n2)[f"{ok['ip']}/32"] == ok["identity"]
        assert enforcing([(ok, server, True), (bad, server, False)]) == []
    finally:
        w.cleanup()


@pytest.mark.parametrize("case", ["wrong CA", "client certificate of another CA"])
def test_a_node_with_the_wrong_tls_credentials_refuses_to_start_in_one_line(tls_lab, case):
    n1, n2 = tls_lab.nodes
    other = Pki(os.path.join(tls_lab.workdir, f"pki-other-{tag()}"), "another")
    theirs = other.issue(n2.name)
    overrides = {"store_ca": theirs.ca} if case == "wrong CA" else {"store_cert": theirs.cert,
                                                                    "store_key": theirs.key}
    with reconfigured(n2, **overrides):
        error = one_error_line(refused_start(n2))
    assert error.startswith(f"Error: etcd store {tls_lab.store_url}: TLS with etcd failed ("), error
    assert error.endswith("check store_ca, store_cert and store_key in the node config against etcd's certificates")
    if case == "wrong CA":
        assert "etcd's certificate is not trusted by store_ca" in error
    assert n2.ready() and n1.ready()  # (reconfigured started it again on the lab's config)
