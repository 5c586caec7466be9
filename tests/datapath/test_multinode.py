"""Three nodes on one etcd, on the real kernel (the node lab, lab/): what crosses nodes.

Identities agree on every node, also when agents allocate at the same moment; an endpoint of one
node is in every node's ipcache while it exists; policy by labels holds across nodes in both
directions, with Cilium's and Kubernetes' policy kinds, and the dropping node's flow and every
node's `policy trace` say so; NetworkPolicy ipBlocks match other nodes' pods by address; named
ports resolve against other nodes' endpoints; endpoint names are per node; a Service balances over
backends on other nodes. Faults (a dead agent, etcd away, TLS, bad claims and values) are in
test_multinode_faults.py.

One lab for the module; each test removes what it made (`Workloads`), also when it fails.
"""

from __future__ import annotations

import ipaddress
import json
import subprocess
import threading
import uuid

import pytest

from agent.client import AgentClient
from agent.identity import MAX_CLUSTER, MIN_CLUSTER, REMOTE_NODE, _labels_key
from agent.labels import security_labels
from lab import Lab, LabNode
from lab.lab import MESHAGENT, REPO
from tests.datapath.lab_fixtures import PY, Workloads, connects, eventually, in_endpoint, ipcache, read_line


@pytest.fixture(scope="module")
def elab(lab_factory) -> Lab:
    """Three nodes, their agents ready, on the lab's etcd."""
    return lab_factory(nodes=3, store="etcd")


@pytest.fixture
def work(elab):
    w = Workloads(elab)
    try:
        yield w
    finally:
        w.cleanup()


def tag() -> str:
    return uuid.uuid4().hex[:5]


def add_at_once(work: Workloads, calls: list[tuple[LabNode, str, dict]]) -> list[dict]:
    """`endpoint add` of every (node, name, labels) sent to the agents at the same moment (through
    their API sockets, released by one barrier); each endpoint's record as the agent answered."""
    barrier = threading.Barrier(len(calls))
    results: list[object] = [None] * len(calls)

    def add(i: int, node: LabNode, name: str, labels: dict) -> None:
        client = AgentClient(node.api_socket, timeout=120)
        barrier.wait(60)
        try:
            results[i] = client.call("endpoint_add", name=name, labels=labels)
        except Exception as e:  # reported below, with the others
            results[i] = e

    for node, name, _ in calls:
        work.endpoints.append((node, name))
    threads = [threading.Thread(target=add, args=(i, *call)) for i, call in enumerate(calls)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    failed = [r for r in results if not isinstance(r, dict)]
    assert not failed, f"endpoint adds failed: {failed}"
    return results  # type: ignore[return-value]


def identities(node: LabNode) -> dict[int, dict]:
    """`meshagent identity list` of ``node``: the allocated (not reserved) identities."""
    return {item["id"]: item["labels"] for item in node.cli_json("identity", "list") if not item["reserved"]}


def first_candidate(labels: dict) -> int:
    """The number IdentityAllocator tries first for ``labels`` (from the hash of the label set)."""
    span = MAX_CLUSTER - MIN_CLUSTER + 1
    return MIN_CLUSTER + int(_labels_key(security_labels(labels, "default", "default")), 16) % span


def trace(node: LabNode, src: str, dst: str, dport: str) -> dict:
    return node.cli_json("policy", "trace", "--from-label", src, "--to-label", dst, "--dport", dport)


# ---- nodes ----------------------------------------------------------------------------------------


def test_every_node_lists_the_others_routes_to_their_pods_and_knows_their_addresses(elab):
    for node in elab.nodes:
        listed = {row["name"]: row for row in node.cli_json("node", "list")}
        assert set(listed) == {n.name for n in elab.nodes}
        for other in elab.nodes:
            row = listed[other.name]
            assert (row["node_ip"], row["pod_cidr"], row["health"], row["self"]) == (
                other.ip, other.pod_cidr, "alive", other is node), row
        routes = json.loads(node.ns(["ip", "-j", "route", "show", "proto", "201"]).stdout)
        assert {r["dst"]: r["gateway"] for r in routes} == {o.pod_cidr: o.ip for o in elab.nodes if o is not node}
        cache = ipcache(node)
        for other in elab.nodes:
            router = str(next(ipaddress.IPv4Network(other.pod_cidr).hosts()))
            want = 1 if other is node else REMOTE_NODE  # host, or reserved:remote-node
            assert cache[f"{other.ip}/32"] == want and cache[f"{router}/32"] == want, other
        status = node.cli_json("status")
        assert status["store_status"]["backend"] == "etcd" and status["store_status"]["connected"] is True
        assert status["store_status"]["lease"]["id"]
        assert sorted(p["name"] for p in status["peers"]) == sorted(o.name for o in elab.nodes if o is not node)
        assert f"Store:                {elab.store_url}: connected" in node.cli("status").stdout


# ---- identities -----------------------------------------------------------------------------------


def test_one_label_set_gets_one_identity_on_every_node_even_allocated_at_once(elab, work):
    t = tag()
    for round_ in range(3):
        labels = {"app": f"same-{t}-{round_}"}
        added = add_at_once(work, [(node, f"same-{t}-{round_}", labels) for node in elab.nodes])
        numbers = {ep["identity"] for ep in added}
        assert len(numbers) == 1, f"one label set, several identities: {added}"
        number = numbers.pop()
        for node in elab.nodes:
            assert identities(node)[number] == security_labels(labels, "default", "default"), node
    for node in elab.nodes:  # no label set twice, no number twice
        seen = [json.dumps(lbls, sort_keys=True) for lbls in identities(node).values()]
        assert len(seen) == len(set(seen))


def test_label_sets_that_race_for_one_number_get_two(elab, work):
    """Two label sets whose hashes pick the same first number, allocated on two nodes at once."""
    t = tag()
    by_candidate: dict[int, dict] = {}
    pairs = []
    for i in range(20000):
        labels = {"app": f"race-{t}-{i}"}
        first = by_candidate.setdefault(first_candidate(labels), labels)
        if first is not labels:
            pairs.append((first, labels))
            if len(pairs) == 2:
                break
    assert len(pairs) == 2
    n1, n2 = elab.node(1), elab.node(2)
    for k, (a, b) in enumerate(pairs):
        ep_a, ep_b = add_at_once(work, [(n1, f"race-{t}-{k}a", a), (n2, f"race-{t}-{k}b", b)])
        assert ep_a["identity"] != ep_b["identity"], (ep_a, ep_b)
        assert first_candidate(a) in (ep_a["identity"], ep_b["identity"])
        for node in elab.nodes:
            known = identities(node)
            assert known[ep_a["identity"]]["app"] == a["app"] and known[ep_b["identity"]]["app"] == b["app"]


# ---- endpoints across nodes -----------------------------------------------------------------------


def test_an_endpoint_of_node_2_is_in_node_1_s_ipcache_until_it_is_deleted(elab, work):
    n1, n2, n3 = elab.nodes
    name = f"far-{tag()}"
    ep = work.endpoint(n2, name, f"app={name}")
    assert ipaddress.IPv4Address(ep["ip"]) in ipaddress.IPv4Network(n2.pod_cidr)
    for node in (n1, n3):
        eventually(lambda node=node: ipcache(node).get(f"{ep['ip']}/32") == ep["identity"],
                   f"{ep['ip']} -> {ep['identity']} in {node.name}'s ipcache")
    n2.cli("endpoint", "delete", name)
    for node in (n1, n3):
        eventually(lambda node=node: f"{ep['ip']}/32" not in ipcache(node),
                   f"{ep['ip']} gone from {node.name}'s ipcache")


def test_endpoint_names_are_per_node(elab, work):
    n1, n2, n3 = elab.nodes
    webs = {node.name: work.endpoint(node, "web", "app=names-web") for node in (n2, n3)}
    assert webs[n2.name]["ip"] != webs[n3.name]["ip"]
    assert webs[n2.name]["identity"] == webs[n3.name]["identity"]
    for node in (n2, n3):
        ep = webs[node.name]
        assert ipaddress.IPv4Address(ep["ip"]) in ipaddress.IPv4Network(node.pod_cidr)
        out = subprocess.run([*MESHAGENT, "--node", node.name, "exec", "web", "--", "ip", "-4", "-o", "addr", "show",
                              "dev", "eth0"], cwd=REPO, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        assert f"inet {ep['ip']}/32" in out.stdout, out.stdout
        assert [e["ip"] for e in node.cli_json("endpoint", "list") if e["name"] == "web"] == [ep["ip"]]
    for ep in webs.values():
        eventually(lambda ep=ep: ipcache(n1).get(f"{ep['ip']}/32") == ep["identity"], f"{ep['ip']} in n1's ipcache")
    nope = subprocess.run([*MESHAGENT, "--node", n1.name, "exec", "web", "--", "true"], cwd=REPO, capture_output=True,
                          text=True, timeout=60)
    assert nope.returncode == 1 and nope.stderr.count("\n") == 1, nope.stderr
    assert f"unknown endpoint 'web' on node {n1.name}" in nope.stderr


# ---- policy across nodes --------------------------------------------------------------------------

POLICIES = {
    "CiliumNetworkPolicy": """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {{name: {name}, namespace: default}}
spec:
  endpointSelector: {{matchLabels: {{app: {server}}}}}
  ingress:
  - fromEndpoints: [{{matchLabels: {{app: {client}}}}}]
    toPorts: [{{ports: [{{port: "8080", protocol: TCP}}]}}]
""",
    "NetworkPolicy": """
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {{name: {name}, namespace: default}}
spec:
  podSelector: {{matchLabels: {{app: {server}}}}}
  policyTypes: [Ingress]
  ingress:
  - from: [{{podSelector: {{matchLabels: {{app: {client}}}}}}}]
    ports: [{{port: 8080, protocol: TCP}}]
""",
}


def dropped(node: LabNode, src: dict, dst: dict) -> list[dict]:
    return node.flows("--verdict", "DROPPED", "--from-ip", src["ip"], "--to-ip", dst["ip"])


@pytest.mark.parametrize("kind", sorted(POLICIES))
@pytest.mark.parametrize("client_index,server_index", [(1, 2), (2, 1)], ids=["n1-to-n2", "n2-to-n1"])
def test_ingress_policy_by_labels_holds_across_nodes(elab, work, kind, client_index, server_index):
    cnode, snode = elab.node(client_index), elab.node(server_index)
    t = f"{'knp' if kind == 'NetworkPolicy' else 'cnp'}{client_index}{server_index}-{tag()}"
    server = work.endpoint(snode, f"srv-{t}", f"app=srv-{t}")
    good = work.endpoint(cnode, f"ok-{t}", f"app=ok-{t}")
    bad = work.endpoint(cnode, f"bad-{t}", f"app=bad-{t}")
    work.serve(server, 8080)
    for ep in (good, bad):  # no policy yet: both reach the server on the other node
        eventually(lambda ep=ep: connects(ep, server["ip"], 8080), f"{ep['name']} -> the server before the policy")

    # applied on the client's node; the server's node enforces it (it learns it from the store)
    work.apply(cnode, POLICIES[kind].format(name=f"pol-{t}", server=f"srv-{t}", client=f"ok-{t}"))
    eventually(lambda: trace(snode, f"app=bad-{t}", f"app=srv-{t}", "8080/tcp")["verdict"] == "DENIED",
               f"the policy in {snode.name}'s kernel")
    assert connects(good, server["ip"], 8080)
    assert not connects(bad, server["ip"], 8080, timeout=2)

    flow = eventually(lambda: dropped(snode, bad, server), f"the DROPPED flow on {snode.name}")[-1]
    assert flow["node_name"] == snode.name and flow["traffic_direction"] == "INGRESS"
    assert flow["source"]["pod_name"] == bad["name"] and flow["source"]["identity"] == bad["identity"]
    assert "k8s:app=bad-" + t in flow["source"]["labels"]
    assert flow["destination"]["pod_name"] == server["name"]
    assert flow["policy"]["kind"] == kind and flow["policy"]["name"] == f"default/pol-{t}", flow["policy"]
    assert {"name": f"pol-{t}", "namespace": "default", "kind": kind}.items() <= flow["ingress_denied_by"][0].items()

    for node in (cnode, snode):  # the same verdicts from either node's `policy trace`
        denied = trace(node, f"app=bad-{t}", f"app=srv-{t}", "8080/tcp")
        allowed = trace(node, f"app=ok-{t}", f"app=srv-{t}", "8080/tcp")
        assert (denied["verdict"], allowed["verdict"]) == ("DENIED", "ALLOWED"), node.name
        ingress = next(s for s in denied["steps"] if s["direction"] == "ingress")
        assert ingress["node"] == snode.name and f"pol-{t}" in ingress["rule"]
        where = f"kernel of node {snode.name}" if node is snode else f"node {snode.name} enforces it"
        assert where in ingress["source"], ingress


def test_egress_policy_on_the_client_s_node_knows_endpoints_of_other_nodes(elab, work):
    n1, n2, n3 = elab.nodes
    t = f"eg-{tag()}"
    client = work.endpoint(n1, f"cli-{t}", f"app=cli-{t}")
    ok = work.endpoint(n2, f"ok-{t}", f"app=ok-{t}")
    no = work.endpoint(n3, f"no-{t}", f"app=no-{t}")
    for ep in (ok, no):
        work.serve(ep, 8080)
        eventually(lambda ep=ep: connects(client, ep["ip"], 8080), f"the client -> {ep['name']} before the policy")
    work.apply(n3, f"""
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {{name: pol-{t}, namespace: default}}
spec:
  endpointSelector: {{matchLabels: {{app: cli-{t}}}}}
  egress:
  - toEndpoints: [{{matchLabels: {{app: ok-{t}}}}}]
    toPorts: [{{ports: [{{port: "8080", protocol: TCP}}]}}]
""")
    eventually(lambda: trace(n1, f"app=cli-{t}", f"app=no-{t}", "8080/tcp")["verdict"] == "DENIED",
               "the egress policy in n1's kernel")
    assert connects(client, ok["ip"], 8080)
    assert not connects(client, no["ip"], 8080, timeout=2)
    flow = eventually(lambda: dropped(n1, client, no), "the DROPPED flow on n1")[-1]
    assert flow["traffic_direction"] == "EGRESS" and flow["node_name"] == n1.name
    assert flow["destination"]["pod_name"] == no["name"] and flow["destination"]["identity"] == no["identity"]
    assert flow["policy"]["name"] == f"default/pol-{t}"
    for node in elab.nodes:
        assert trace(node, f"app=cli-{t}", f"app=no-{t}", "8080/tcp")["verdict"] == "DENIED", node.name
        assert trace(node, f"app=cli-{t}", f"app=ok-{t}", "8080/tcp")["verdict"] == "ALLOWED", node.name


def test_named_ports_resolve_against_endpoints_of_other_nodes(elab, work):
    """An egress rule's `port: http` on n1 takes each peer's own number, the peers on n2 and n3; their
    ingress rule takes their own (examples/named-ports.yaml, across nodes)."""
    n1, n2, n3 = elab.nodes
    t = f"np-{tag()}"
    client = work.endpoint(n1, f"cli-{t}", f"app=cli-{t}")
    web2 = work.endpoint(n2, f"web2-{t}", f"app=web-{t},on=n2", "--port", "http=8080")
    web3 = work.endpoint(n3, f"web3-{t}", f"app=web-{t},on=n3", "--port", "http=9090")
    for ep in (web2, web3):
        for port in (8080, 9090):
            work.serve(ep, port)
    work.apply(n1, f"""
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {{name: out-{t}, namespace: default}}
spec:
  podSelector: {{matchLabels: {{app: cli-{t}}}}}
  policyTypes: [Egress]
  egress: [{{to: [{{podSelector: {{matchLabels: {{app: web-{t}}}}}}}], ports: [{{port: http}}]}}]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {{name: in-{t}, namespace: default}}
spec:
  podSelector: {{matchLabels: {{app: web-{t}}}}}
  ingress: [{{from: [{{podSelector: {{matchLabels: {{app: cli-{t}}}}}}}], ports: [{{port: http}}]}}]
""")
    eventually(lambda: trace(n1, f"app=cli-{t}", "on=n3", "8080/tcp")["verdict"] == "DENIED",
               "the egress policy in n1's kernel")
    eventually(lambda: trace(n3, f"app=cli-{t}", "on=n3", "8080/tcp")["verdict"] == "DENIED",
               "the ingress policy in n3's kernel")
    assert connects(client, web2["ip"], 8080) and connects(client, web3["ip"], 9090)
    assert not connects(client, web2["ip"], 9090, timeout=2)
    assert not connects(client, web3["ip"], 8080, timeout=2)
    ok = trace(n1, f"app=cli-{t}", "on=n3", "9090/tcp")
    assert ok["verdict"] == "ALLOWED"
    for step in ok["steps"]:  # n1 reads its kernel for the egress, computes n3's ingress from the store
        assert step["named_ports"] == [f"port http resolved to 9090/TCP on {web3['name']} "
                                       f"(spec.{step['direction']}[0])"], step


def test_networkpolicy_ipblocks_match_endpoints_of_other_nodes_by_address(elab, work):
    """Kubernetes' ipBlock: addresses, pods of other nodes included (their /32s have identities in every
    ipcache, which a CiliumNetworkPolicy CIDR rule would leave unmatched). The client's egress on n1
    and the server's ingress on n2 each match the other side's address."""
    n1, n2, n3 = elab.nodes
    t = f"ipb-{tag()}"
    client = work.endpoint(n1, f"cli-{t}", f"app=cli-{t}")
    other = work.endpoint(n1, f"oth-{t}", f"app=oth-{t}")
    ok = work.endpoint(n2, f"ok-{t}", f"app=ok-{t}")
    no = work.endpoint(n3, f"no-{t}", f"app=no-{t}")
    for ep in (ok, no):
        work.serve(ep, 8080)
        eventually(lambda ep=ep: connects(client, ep["ip"], 8080), f"the client -> {ep['name']} before the policy")
    work.apply(n3, f"""
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {{name: out-{t}, namespace: default}}
spec:
  podSelector: {{matchLabels: {{app: cli-{t}}}}}
  policyTypes: [Egress]
  egress: [{{to: [{{ipBlock: {{cidr: 10.0.0.0/8, except: [{no['ip']}/32]}}}}]}}]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {{name: in-{t}, namespace: default}}
spec:
  podSelector: {{matchLabels: {{app: ok-{t}}}}}
  ingress: [{{from: [{{ipBlock: {{cidr: {client['ip']}/32}}}}], ports: [{{port: 8080}}]}}]
""")
    for node in (n1, n2):
        eventually(lambda node=node: trace(node, f"app=oth-{t}", f"app=ok-{t}", "8080/tcp")["verdict"] == "DENIED",
                   f"the policies in {node.name}'s kernel")
    eventually(lambda: trace(n1, f"app=cli-{t}", f"app=no-{t}", "8080/tcp")["verdict"] == "DENIED",
               "the except in n1's kernel")
    assert connects(client, ok["ip"], 8080)
    assert not connects(client, no["ip"], 8080, timeout=2)
    assert not connects(other, ok["ip"], 8080, timeout=2)

    allowed = eventually(lambda: [f for f in n2.flows("--from-ip", client["ip"], "--to-ip", ok["ip"], "--verdict",
                                                      "FORWARDED") if f["event_type"] == "flow-new"],
                         "the allowed flow on n2")[-1]
    assert allowed["policy"]["path"] == "spec.ingress[0].from[0].ipBlock", allowed["policy"]
    flow = eventually(lambda: dropped(n1, client, no), "the DROPPED flow on n1")[-1]
    assert flow["traffic_direction"] == "EGRESS" and flow["policy"]["name"] == f"default/out-{t}"
    for node in elab.nodes:  # every node's trace: n1's and n2's kernels, or computed from the store
        assert trace(node, f"app=cli-{t}", f"app=no-{t}", "8080/tcp")["verdict"] == "DENIED", node.name
        assert trace(node, f"app=oth-{t}", f"app=ok-{t}", "8080/tcp")["verdict"] == "DENIED", node.name
        good = trace(node, f"app=cli-{t}", f"app=ok-{t}", "8080/tcp")
        assert good["verdict"] == "ALLOWED", node.name
        steps = {s["direction"]: s for s in good["steps"]}
        assert steps["egress"]["by_address"] == {"address": ok["ip"], "prefix": "10.0.0.0/8"}, node.name
        assert steps["ingress"]["by_address"] == {"address": client["ip"], "prefix": f"{client['ip']}/32"}
        assert "spec.ingress[0].from[0].ipBlock" in steps["ingress"]["rule"]


# ---- services across nodes ------------------------------------------------------------------------

NAMED_SERVER = """
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1])))
s.listen(64)
print("ready", flush=True)
while True:
    c, _ = s.accept()
    c.sendall(sys.argv[2].encode())
    c.close()
"""

COUNTING_CLIENT = """
import collections, json, socket, sys
seen = collections.Counter()
for _ in range(int(sys.argv[3])):
    with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5) as c:
        seen[c.recv(64).decode()] += 1
print(json.dumps(seen))
"""


def test_a_service_balances_over_backends_on_two_other_nodes(elab, work):
    n1, n2, n3 = elab.nodes
    t = f"lb-{tag()}"
    client = work.endpoint(n1, f"cli-{t}", f"app=cli-{t}")
    for node in (n2, n3):
        backend = work.endpoint(node, f"be-{t}", f"app=be-{t}")
        server = work.spawn(in_endpoint(backend, [PY, "-c", NAMED_SERVER, "8080", node.name]), stdout=subprocess.PIPE,
                            text=True)
        assert read_line(server, 30) == "ready"
    work.apply(n1, f"""
apiVersion: v1
kind: Service
metadata: {{name: svc-{t}, namespace: default}}
spec:
  selector: {{app: be-{t}}}
  ports: [{{port: 80, targetPort: 8080, protocol: TCP}}]
""")

    def views() -> list[dict]:
        return [next((s for s in node.cli_json("service", "list") if s["name"] == f"svc-{t}"), {})
                for node in elab.nodes]

    seen = eventually(lambda: (v := views()) and all(len(s.get("backends", ())) == 2 for s in v) and v,
                      "the service with both backends on every node")
    assert len({s["vip"] for s in seen}) == 1, f"the nodes disagree on the VIP: {seen}"
    vip = seen[0]["vip"]
    out = subprocess.run(in_endpoint(client, [PY, "-c", COUNTING_CLIENT, vip, "80", "40"]), capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    counts = json.loads(out.stdout)
    assert set(counts) == {n2.name, n3.name} and sum(counts.values()) == 40, counts
