"""Named ports on the real kernel: endpoints name their ports (`endpoint add --port NAME=PORT`), and a
NetworkPolicy or CiliumNetworkPolicy that says `port: NAME` admits each endpoint's own number."""

from __future__ import annotations

import os

import pytest

from agent.client import AgentClient, AgentError
from tests.datapath.conftest import REPO
from tests.datapath.test_policy import NETTOOL, PY, tcp_ok, udp_ok


@pytest.fixture(scope="module")
def node(node_factory):
    """A node without the DNS proxy: UDP 53 is a port like any other in these tests, and the proxy's
    redirect would take every port-53 datagram of an endpoint (bpf/lib/dns.h)."""
    return node_factory(extra={"dns_proxy": False})


@pytest.fixture(scope="module")
def world(node):
    """web-1 names http 8080, web-2 names http 9090 (two identities: inst differs); both serve 8080,
    8081 and 9090. A client names nothing."""
    eps = {
        "web1": node.add_endpoint("web1", "app=web,inst=one", "--port", "http=8080", "--port", "metrics=9100"),
        "web2": node.add_endpoint("web2", "app=web,inst=two", "--port", "http=9090", "--port", "dns=53/UDP"),
        "client": node.add_endpoint("client", "role=client"),
    }
    for name in ("web1", "web2"):
        serve(node, eps[name], 8080, 8081, 9090)
    return eps


def serve(node, ep: dict, *ports: int) -> None:
    for port in ports:
        srv = node.spawn([*node.in_ep(ep), PY, NETTOOL, "serve-tcp", str(port)])
        assert srv.stdout.readline().strip() == "ready"


@pytest.fixture
def clean_policies(node):
    yield
    for kind in ("CiliumNetworkPolicy", "NetworkPolicy"):
        for item in node.cli_json("get", kind)["items"]:
            node.cli("delete", kind, item["metadata"]["name"], "-n", item["metadata"].get("namespace", "default"))


NP_INGRESS_HTTP = """
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: web-http, namespace: default}
spec:
  podSelector: {matchLabels: {app: web}}
  policyTypes: [Ingress]
  ingress:
  - from: [{podSelector: {matchLabels: {role: client}}}]
    ports: [{port: http}]
"""


def test_endpoint_list_shows_the_ports(node, world):
    assert world["web1"]["ports"] == [{"name": "http", "port": 8080, "protocol": "TCP"},
                                      {"name": "metrics", "port": 9100, "protocol": "TCP"}]
    listed = {e["name"]: e for e in node.cli_json("endpoint", "list")}
    assert listed[world["web2"]["name"]]["ports"] == [{"name": "http", "port": 9090, "protocol": "TCP"},
                                                      {"name": "dns", "port": 53, "protocol": "UDP"}]
    assert listed[world["client"]["name"]]["ports"] == []
    table = node.cli("endpoint", "list").stdout.splitlines()
    assert table[0].split()[-1] == "PORTS"
    (row,) = [line for line in table if world["web1"]["name"] in line.split()]
    assert row.split()[-1] == "http=8080/TCP,metrics=9100/TCP"


def test_np_named_port_admits_each_endpoint_own_number(node, world, clean_policies):
    node.apply(NP_INGRESS_HTTP)
    client, web1, web2 = world["client"], world["web1"], world["web2"]
    assert tcp_ok(node, client, web1, 8080)
    assert not tcp_ok(node, client, web1, 8081)
    assert not tcp_ok(node, client, web1, 9090)  # web-2's http, not web-1's
    assert tcp_ok(node, client, web2, 9090)
    assert not tcp_ok(node, client, web2, 8080)
    trace = node.cli_json("policy", "trace", "--from-label", "role=client", "--to-label", "inst=one",
                          "--dport", "8080/tcp")
    assert trace["verdict"] == "ALLOWED"
    (step,) = [s for s in trace["steps"] if s["direction"] == "ingress"]
    assert step["named_ports"] == [f"port http resolved to 8080/TCP on {web1['name']} (spec.ingress[0])"]
    text = node.cli("policy", "trace", "--from-label", "role=client", "--to-label", "inst=one",
                    "--dport", "8080/tcp").stdout
    assert f"port http resolved to 8080/TCP on {web1['name']}" in text


def test_np_named_egress_resolves_against_each_peer(node, world, clean_policies):
    node.apply("""
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: client-out, namespace: default}
spec:
  podSelector: {matchLabels: {role: client}}
  policyTypes: [Egress]
  egress:
  - to: [{podSelector: {matchLabels: {app: web}}}]
    ports: [{port: http}]
""")
    client, web1, web2 = world["client"], world["web1"], world["web2"]
    assert tcp_ok(node, client, web1, 8080)
    assert tcp_ok(node, client, web2, 9090)
    assert not tcp_ok(node, client, web1, 9090)
    assert not tcp_ok(node, client, web2, 8080)
    drop = node.flows("--verdict", "DROPPED", "--from-ip", client["ip"], "--to-ip", web2["ip"])[-1]
    assert drop["traffic_direction"] == "EGRESS" and drop["policy"]["name"] == "default/client-out"


def test_cnp_named_port(node, world, clean_policies):
    node.apply("""
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: web1-http, namespace: default}
spec:
  endpointSelector: {matchLabels: {inst: one}}
  ingress:
  - fromEndpoints: [{matchLabels: {role: client}}]
    toPorts: [{ports: [{port: HTTP, protocol: TCP}]}]
""")
    assert tcp_ok(node, world["client"], world["web1"], 8080)
    assert not tcp_ok(node, world["client"], world["web1"], 9090)
    assert tcp_ok(node, world["client"], world["web2"], 8081)  # not selected: open


def test_an_unknown_name_admits_nothing_and_trace_says_why(node, world, clean_policies):
    node.apply(NP_INGRESS_HTTP.replace("port: http", "port: metrics"))  # web-2 names no metrics
    assert not tcp_ok(node, world["client"], world["web2"], 9090)
    trace = node.cli_json("policy", "trace", "--from-label", "role=client", "--to-label", "inst=two",
                          "--dport", "9090/tcp")
    (step,) = [s for s in trace["steps"] if s["direction"] == "ingress"]
    assert step["verdict"] == "DENIED"
    assert step["named_ports"] == [f"{world['web2']['name']} has no port named metrics (TCP) (spec.ingress[0]): "
                                   "no entry"]


def test_an_endpoint_added_after_the_policy_gets_its_port(node, world, clean_policies):
    node.apply(NP_INGRESS_HTTP.replace("{app: web}", "{app: late}").replace("web-http", "late-http") + """---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: client-to-late, namespace: default}
spec:
  podSelector: {matchLabels: {role: client}}
  policyTypes: [Egress]
  egress:
  - to: [{podSelector: {matchLabels: {app: late}}}]
    ports: [{port: http}]
""")
    late = node.add_endpoint("late", "app=late", "--port", "http=7070")
    try:
        serve(node, late, 7070, 7071)
        assert tcp_ok(node, world["client"], late, 7070)  # the client's egress and late's ingress both resolve
        assert not tcp_ok(node, world["client"], late, 7071)
    finally:
        node.cli("endpoint", "delete", late["name"])


def _bad(node, *ports: str):
    return node.cli("endpoint", "add", f"{node.tag}-badport", "--labels", "app=bad",
                    *[a for p in ports for a in ("--port", p)], check=False)


def _snapshot(node):
    return node.cli_json("endpoint", "list"), node.cli_json("identity", "list"), node.cli_json("bpf", "policy", "list")


@pytest.mark.parametrize(("ports", "needle"), [
    (["http"], "write NAME=PORT[/PROTO]"),
    (["http=0"], "0 is not a port number 1-65535"),
    (["http=70000"], "70000 is not a port number 1-65535"),
    (["http=80/ICMP"], "protocol 'ICMP' is not one of TCP, UDP, SCTP"),
    (["Web_Http=80"], "port name 'Web_Http' is invalid"),
    (["a-very-long-port-name=80"], "a port name has 1-15 characters"),
    (["http=80", "http=81"], "port name http is given twice"),
    (["http=80", "web=80/TCP"], "port 80/TCP is given twice, as http and web"),
])
def test_bad_port_flag_is_refused_in_one_line(node, world, ports, needle):
    before = _snapshot(node)
    proc = _bad(node, *ports)
    assert proc.returncode == 2, proc.stderr  # a usage error: caught before the agent is asked
    errors = [line for line in proc.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and needle in errors[0] and "Traceback" not in proc.stderr, proc.stderr
    assert _snapshot(node) == before
    assert not os.path.exists(f"/run/netns/{node.name}-{node.tag}-badport")


@pytest.mark.parametrize(("ports", "needle"), [
    ([{"name": "http", "port": 80}, {"name": "http", "port": 81}], "port name http is given twice"),
    ([{"name": "http", "port": 80}, {"name": "web", "port": 80, "protocol": "tcp"}], "port 80/TCP is given twice"),
    ([{"name": "Http", "port": 80}], "port name 'Http' is invalid: a port name has only a-z, 0-9 and '-'"),
    ([{"name": "http", "port": 0}], "argument ports[0].port: 0 is out of range 1-65535"),
    ([{"name": "http", "port": 80, "protocol": "GRE"}], "argument ports[0].protocol: 'GRE' is not one of"),
])
def test_bad_ports_from_the_api_are_refused_by_the_agent(node, world, ports, needle):
    """A client other than the CLI gets the same refusals from the agent, and nothing is made."""
    before = _snapshot(node)
    with pytest.raises(AgentError) as err:
        AgentClient(node.config["api_socket"]).call("endpoint_add", name=f"{node.tag}-badport",
                                                    labels={"app": "bad"}, ports=ports)
    assert needle in str(err.value) and "\n" not in str(err.value)
    assert err.value.culprit == "request"
    assert _snapshot(node) == before
    assert not os.path.exists(f"/run/netns/{node.name}-{node.tag}-badport")


def test_the_example_does_what_its_comments_say(node, clean_policies):
    """examples/named-ports.yaml with the endpoints its comment makes."""
    made = []
    try:
        web1 = node.add_endpoint("shop-web-1", "app=web,replica=1", "--namespace", "shop", "--port", "http=8080",
                                 "--port", "metrics=9100")
        made.append(web1)
        web2 = node.add_endpoint("shop-web-2", "app=web,replica=2", "--namespace", "shop", "--port", "http=8081")
        made.append(web2)
        dns = node.add_endpoint("shop-dns", "app=dns", "--namespace", "shop", "--port", "dns=53/UDP",
                                "--port", "dns-tcp=53")
        made.append(dns)
        front = node.add_endpoint("shop-front", "app=front", "--namespace", "shop")
        made.append(front)
        for ep in (web1, web2):
            serve(node, ep, 8080, 8081, 9100)
        srv = node.spawn([*node.in_ep(dns), PY, NETTOOL, "serve-udp", "53"])
        assert srv.stdout.readline().strip() == "ready"
        node.cli("apply", "-f", str(REPO / "examples" / "named-ports.yaml"))
        assert tcp_ok(node, front, web1, 8080) and tcp_ok(node, front, web2, 8081)
        assert tcp_ok(node, front, web1, 9100)  # metrics: the CNP lets it in, front's egress lets it out
        assert udp_ok(node, front, dns, 53)
        assert not tcp_ok(node, front, web1, 8081)  # web-2's http is not web-1's
        assert not tcp_ok(node, front, web2, 9100)  # web-2 names no metrics
        text = node.cli("policy", "trace", "--from-label", "app=front", "--to-label", "replica=1",
                        "--dport", "8080/tcp").stdout
        assert f"port http resolved to 8080/TCP on {web1['name']} (spec.ingress[0])" in text
    finally:
        for ep in made:
            node.cli("endpoint", "delete", ep["name"], check=False)
