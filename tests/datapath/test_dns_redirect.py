"""Every DNS query an endpoint sends reaches the node's DNS proxy, end to end: a real agent (the Node
fixture) with its DNS proxy, the kernel's redirect (bpf/lib/dns.h), real resolvers (glibc's
getaddrinfo, dnslib over UDP and TCP) in processes started every way an endpoint's are.

    node netns   the agent; the "outside world's" DNS server (tests/dnsserver.py) on the node's
                 loopback, 127.0.0.1:UPSTREAM_PORT, the node's dns_upstreams: it knows EXTERNAL
                 alone and answers the rest NXDOMAIN
    client       role=client, namespace default
    web          app=web, namespace default, behind Service web
    cart         app=cart, namespace shop, behind Service cart

The host's /etc/resolv.conf names whatever it names (a VM resolver, 127.0.0.53): a process started
with `meshagent exec` keeps it; processes started with plain nsenter get a resolv.conf of the test's
own (a bind mount in a mount namespace of their own) naming an arbitrary address, since the redirect
works for any. The redirect without an agent: test_dns_socket_redirect.py.

Everything is removed by the Node fixture (agent, endpoints, namespaces, processes by PID) and the
test's temporary files, also on failure.
"""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from dataclasses import dataclass

import pytest

from tests.datapath.conftest import Node

PY = sys.executable
DNSTOOL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "dnstool.py")
UPSTREAM_PORT = 5399
EXTERNAL, EXTERNAL_IP = "api.example.test", "198.51.100.80"
ANY_RESOLVER = "192.0.2.53"  # TEST-NET-1: nothing there; the redirect takes the query to the proxy

SERVICES = """
apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec:
  selector: {app: web}
  ports: [{port: 80}]
---
apiVersion: v1
kind: Service
metadata: {name: cart, namespace: shop}
spec:
  selector: {app: cart}
  ports: [{port: 80}]
"""


@dataclass
class Mesh:
    node: Node
    eps: dict[str, dict]
    tmp: str

    def vip(self, name: str, namespace: str = "default") -> str:
        for item in self.node.cli_json("service", "list"):
            if (item["name"], item["namespace"]) == (name, namespace):
                return item["vip"]
        raise AssertionError(f"no service {namespace}/{name}")

    def netns(self, ep: str) -> str:
        return f"/run/netns/{self.node.netns_of(self.eps[ep])}"

    def nsenter(self, ep: str, *argv: str, nameserver: str | None = ANY_RESOLVER, options: str = "",
                timeout: float = 60) -> dict:
        """Run dnstool in endpoint ``ep`` entered with nsenter alone (no `ip netns exec`, so no
        hosts file is mounted), with a resolv.conf naming ``nameserver`` (None: the host's) and
        ``options`` (resolv.conf's)."""
        cmd = ["nsenter", f"--net={self.netns(ep)}"]
        if nameserver is not None:
            conf = os.path.join(self.tmp, f"resolv-{uuid.uuid4().hex[:6]}.conf")
            with open(conf, "w") as f:
                f.write(f"nameserver {nameserver}\noptions timeout:2 attempts:2 {options}\n")
            cmd += ["unshare", "--mount", "--propagation", "private", "sh", "-c",
                    f'mount --bind "{conf}" /etc/resolv.conf && exec "$@"', "sh"]
        proc = subprocess.run([*cmd, PY, DNSTOOL, *argv], capture_output=True, text=True, timeout=timeout)
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout)

    def exec(self, ep: str, *argv: str) -> dict:
        """Run dnstool through `meshagent exec` (ip netns exec: the host's resolv.conf, the endpoint's
        hosts file mounted over /etc/hosts)."""
        proc = self.node.cli("exec", self.eps[ep]["name"], "--", PY, DNSTOOL, *argv)
        return json.loads(proc.stdout)


@pytest.fixture(scope="module")
def mesh(node_factory):
    node = node_factory(start=False, extra={"dns_upstreams": [f"127.0.0.1:{UPSTREAM_PORT}"]})
    upstream = node.spawn(["nsenter", f"--net=/run/netns/{node.netns}", PY, "-m", "tests.dnsserver", "--port",
                           str(UPSTREAM_PORT), "--record", f"{EXTERNAL}={EXTERNAL_IP}:60"])
    assert upstream.stdout.readline().strip() == "ready", upstream.stderr.read()
    node.start_agent()
    eps = {
        "client": node.add_endpoint("client", "role=client"),
        "web": node.add_endpoint("web", "app=web"),
        "cart": node.add_endpoint("cart", "app=cart", "--namespace", "shop"),
    }
    node.apply(SERVICES)
    tmp = tempfile.mkdtemp(prefix="meshagent-dnsredir-")
    try:
        yield Mesh(node, eps, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def test_service_names_resolve_for_a_process_entered_with_nsenter(mesh):
    """No hosts file, a resolver address nothing answers at: the proxy answers every form."""
    vip = mesh.vip("web")
    names = ("web", "web.default", "web.default.svc", "web.default.svc.cluster.local")
    assert mesh.nsenter("client", "gai", *names) == {n: [vip] for n in names}


@pytest.mark.parametrize("nameserver", ["127.0.0.53", "10.0.2.3", None])
def test_any_resolver_address_reaches_the_proxy(mesh, nameserver):
    """A loopback stub's address, a VM resolver's, and the host's own resolv.conf (None)."""
    out = mesh.nsenter("client", "gai", "web.default.svc.cluster.local", EXTERNAL, nameserver=nameserver)
    assert out == {"web.default.svc.cluster.local": [mesh.vip("web")], EXTERNAL: [EXTERNAL_IP]}


def test_glibc_over_tcp(mesh):
    """resolv.conf's use-vc: glibc asks over TCP, connect() is redirected, getpeername() agrees."""
    out = mesh.nsenter("client", "gai", "web", EXTERNAL, options="use-vc")
    assert out == {"web": [mesh.vip("web")], EXTERNAL: [EXTERNAL_IP]}


def test_service_names_resolve_for_meshagent_exec(mesh):
    vip = mesh.vip("web")
    out = mesh.exec("client", "gai", "web", "web.default.svc.cluster.local", "cart.shop")
    assert out == {"web": [vip], "web.default.svc.cluster.local": [vip], "cart.shop": [mesh.vip("cart", "shop")]}


def test_a_name_in_another_namespace(mesh):
    """From namespace default, shop's Service by its namespaced and full names; not by its short
    name, which is default's (forwarded, and the outside world does not know it)."""
    vip = mesh.vip("cart", "shop")
    out = mesh.nsenter("client", "gai", "cart.shop", "cart.shop.svc.cluster.local", "cart")
    assert out["cart.shop"] == [vip] and out["cart.shop.svc.cluster.local"] == [vip]
    assert out["cart"].startswith("error"), out
    assert mesh.nsenter("cart", "gai", "cart")["cart"] == [vip], "the short name from its own namespace"


def test_reverse_lookups_of_a_vip_and_an_endpoint(mesh):
    vip, web_ip = mesh.vip("web"), mesh.eps["web"]["ip"]
    out = mesh.nsenter("client", "gai-reverse", vip, web_ip)
    assert out[vip] == "web.default.svc.cluster.local", out
    assert out[web_ip] == f"{web_ip.replace('.', '-')}.default.pod.cluster.local", out  # Kubernetes' pod name


def test_an_external_name_is_forwarded(mesh):
    assert mesh.nsenter("client", "gai", EXTERNAL) == {EXTERNAL: [EXTERNAL_IP]}
    assert mesh.nsenter("client", "gai", "nowhere.example.test")["nowhere.example.test"].startswith("error")


def host_resolver() -> str:
    """The first IPv4 nameserver of the host's resolv.conf, or an address of our own when it has none."""
    with open("/etc/resolv.conf") as f:
        for line in f:
            words = line.split()
            if words[:1] == ["nameserver"] and len(words) > 1 and "." in words[1]:
                return words[1]
    return "127.0.0.53"


@pytest.mark.parametrize("mode", ["udp", "udp-connected", "tcp"])
@pytest.mark.parametrize("resolver", [ANY_RESOLVER, host_resolver()])
def test_udp_and_tcp_queries_see_their_own_resolver_as_the_peer(mesh, mode, resolver):
    out = mesh.nsenter("client", "query", mode, resolver, "53", "web.default.svc.cluster.local", "A")
    assert out["error"] is None and out["rcode"] == 0 and out["answers"] == [mesh.vip("web")], out
    peers = {out["recvfrom"], out["getpeername"]} - {None}
    assert peers == {f"{resolver}:53"}, out


def test_a_process_started_before_a_service_resolves_it(mesh):
    """Names stay fresh: `meshagent exec` mounted the hosts file of its start; the name of a Service
    applied afterwards comes from the proxy."""
    proc = mesh.node.spawn([sys.executable, "-m", "cli.main", "--socket", mesh.node.config["api_socket"], "exec",
                            mesh.eps["client"]["name"], "--", PY, DNSTOOL, "gai-loop"], stdin=subprocess.PIPE)
    assert proc.stdout.readline().strip() == "ready", proc.stderr.read()
    proc.stdin.write("late.default.svc.cluster.local\n")
    proc.stdin.flush()
    assert json.loads(proc.stdout.readline())["late.default.svc.cluster.local"].startswith("error")
    mesh.node.apply(SERVICES.split("---")[0].replace("name: web", "name: late"))
    vip = mesh.vip("late")
    for name in ("late", "late.default.svc.cluster.local"):
        proc.stdin.write(name + "\n")
        proc.stdin.flush()
        assert json.loads(proc.stdout.readline()) == {name: [vip]}
    proc.stdin.close()
    proc.wait(10)
    hosts = open(f"/etc/netns/{mesh.node.netns_of(mesh.eps['client'])}/hosts").read()
    assert "late" not in hosts and "localhost" in hosts, "with the proxy the hosts file names no service"


CNP_EGRESS_WEB_ONLY = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: client-egress, namespace: default}
spec:
  endpointSelector: {matchLabels: {role: client}}
  egress:
  - toEndpoints: [{matchLabels: {app: web}}]
    toPorts: [{ports: [{port: "80", protocol: TCP}]}]
"""
CNP_EGRESS_DNS = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: client-dns, namespace: default}
spec:
  endpointSelector: {matchLabels: {role: client}}
  egress:
  - toPorts: [{ports: [{port: "53", protocol: UDP}, {port: "53", protocol: TCP}]}]
"""


def test_a_query_under_default_deny_egress_reaches_the_proxy(mesh):
    """Egress default deny (web:80 allowed only): the redirected query still gets an answer from the
    proxy at once, not a drop and a resolver timeout, and is reported as REDIRECTED; with port 53
    allowed the proxy answers the name."""
    node = mesh.node
    node.apply(CNP_EGRESS_WEB_ONLY)
    try:
        out = mesh.nsenter("client", "query", "udp", ANY_RESOLVER, "53", "web.default.svc.cluster.local", "A")
        assert out["error"] is None and out["recvfrom"] == f"{ANY_RESOLVER}:53", "an answer, not a drop"
        router = str(next(ipaddress.IPv4Network(node.pod_cidr).hosts()))
        flows = node.flows("--from-ip", mesh.eps["client"]["ip"], "--verdict", "REDIRECTED")
        assert any(f["IP"]["destination"] == router and f["l4"]["UDP"]["destination_port"] == 15053
                   for f in flows if "UDP" in f.get("l4", {})), flows
        node.apply(CNP_EGRESS_DNS)
        out = mesh.nsenter("client", "query", "tcp", ANY_RESOLVER, "53", "web.default.svc.cluster.local", "A")
        assert out["rcode"] == 0 and out["answers"] == [mesh.vip("web")], out
    finally:
        node.delete(CNP_EGRESS_WEB_ONLY)
        node.delete(CNP_EGRESS_DNS)


def test_with_the_proxy_off_dns_is_left_alone(node_factory):
    """dns_proxy: false: no redirect (a query to an address nothing answers at goes unanswered, an
    endpoint serving DNS on 53 is reached), and the service names are in the hosts file."""
    node = node_factory(extra={"dns_proxy": False})
    client = node.add_endpoint("client", "role=client")
    dns = node.add_endpoint("dns", "app=dns")
    node.apply(SERVICES.split("---")[0])
    srv = node.spawn(["nsenter", f"--net=/run/netns/{node.netns_of(dns)}", PY, DNSTOOL, "serve", "0.0.0.0", "53",
                      "198.51.100.4"])
    assert srv.stdout.readline().strip() == "ready"

    def query(server: str) -> dict:
        proc = subprocess.run(["nsenter", f"--net=/run/netns/{node.netns_of(client)}", PY, DNSTOOL, "query", "udp",
                               server, "53", "x.example.test", "A"], capture_output=True, text=True, timeout=30)
        return json.loads(proc.stdout)

    assert query(ANY_RESOLVER)["error"] == "TimeoutError"
    out = query(dns["ip"])
    assert out["answers"] == ["198.51.100.4"] and out["recvfrom"] == f"{dns['ip']}:53"
    hosts = open(f"/etc/netns/{node.netns_of(client)}/hosts").read()
    assert "web.default.svc.cluster.local" in hosts
    assert json.loads(node.cli("exec", client["name"], "--", PY, DNSTOOL, "gai", "web").stdout)["web"] == \
        [next(i["vip"] for i in node.cli_json("service", "list") if i["name"] == "web")]
